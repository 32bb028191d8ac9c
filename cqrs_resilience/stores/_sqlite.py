"""A `Repository` on one SQLite file: stdlib `sqlite3`, WAL, every version kept as a row.

The database, not Python, enforces the version check: a persist is one `BEGIN IMMEDIATE`
transaction that inserts row (`namespace:id`, version + 1) only when the latest stored version
is the one the aggregate was read at, and records the command id beside it. Several processes
may share the file; a writer that finds it locked for longer than `busy_timeout` gets a
`TransientError`.

Each repository owns one connection on one worker thread, so the event loop never blocks on
disk or locks and the connection is never used from two threads.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any, Literal, NamedTuple, TypeVar, TypeVarTuple

from .._errors import ConcurrencyError
from .._idempotency import current_command_id
from .._repository import A, Repository, ids_asked
from ._codec import AggregateCodec
from ._errors import StoreClosedError, sqlite_errors
from ._lifecycle import StoreLifecycle

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS aggregate_versions (
        aggregate_id TEXT NOT NULL,
        version INTEGER NOT NULL CHECK (version > 0),
        state BLOB NOT NULL,
        PRIMARY KEY (aggregate_id, version)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS processed_commands (
        command_id TEXT NOT NULL,
        aggregate_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        PRIMARY KEY (command_id, aggregate_id)
    ) WITHOUT ROWID""",
)
_TABLES = ("aggregate_versions", "processed_commands")
# Inserts nothing unless :expected is still the latest version; the primary key backs this up.
_INSERT_NEXT = """INSERT INTO aggregate_versions (aggregate_id, version, state)
    SELECT :id, :expected + 1, :state
    WHERE (SELECT COALESCE(MAX(version), 0) FROM aggregate_versions WHERE aggregate_id = :id)
        = :expected"""
_LATEST_VERSION = "SELECT COALESCE(MAX(version), 0) FROM aggregate_versions WHERE aggregate_id = ?"
_FIRST_OUTCOME = """SELECT p.version, v.state FROM processed_commands AS p
    LEFT JOIN aggregate_versions AS v ON v.aggregate_id = p.aggregate_id AND v.version = p.version
    WHERE p.command_id = ? AND p.aggregate_id = ?"""
_RECORD = "INSERT INTO processed_commands (command_id, aggregate_id, version) VALUES (?, ?, ?)"
_ONE_VERSION = "SELECT state FROM aggregate_versions WHERE aggregate_id = ? AND version = ?"
_WAS_PROCESSED = "SELECT 1 FROM processed_commands WHERE command_id = ? AND aggregate_id = ?"
# SQLite caps bound parameters per statement (999 in old builds).
_IDS_PER_QUERY = 500


class _Outcome(NamedTuple):
    kind: Literal["stored", "repeat", "conflict"]
    version: int
    state: bytes | None = None


class SQLiteRepository(StoreLifecycle, Repository[A]):
    """Aggregates of `aggregate_type` in the SQLite file at `path`, shareable across processes.

    `busy_timeout` (seconds) is how long a write waits for another writer before it raises
    `TransientError`. `uow` is accepted for the `Repository` protocol and ignored: each persist
    commits on its own.

    One file can hold many aggregate types: rows are keyed by `f"{namespace}:{id}"`, so an
    `Order` "1" and a `User` "1" never meet. `namespace` defaults to the type's `__name__`; pass
    the same one on purpose to share a stream, e.g. `namespace="Order"` after renaming `Order`
    to keep reading its rows. It must be a non-empty string without ":". Callers only ever see
    the bare ids.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        aggregate_type: type[A],
        *,
        busy_timeout: float = 5.0,
        namespace: str | None = None,
    ) -> None:
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout must be >= 0 seconds, got {busy_timeout}")
        self._codec = AggregateCodec(aggregate_type, namespace)
        self.aggregate_type = aggregate_type
        self.namespace = self._codec.namespace
        self.path = os.fspath(path)
        self.busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cqrs-sqlite")
        self._connection: sqlite3.Connection | None = None  # used on the worker thread only
        self._closed = False

    async def open(self) -> None:
        """Connect and create the tables if missing; the first call of any method does it too."""
        await self._run("open", self._connect)

    async def close(self) -> None:
        """Close the connection; later calls raise `StoreClosedError`. Closing twice is fine."""
        if self._closed:
            return
        self._closed = True
        try:
            with sqlite_errors(f"SQLite {self.path}: close"):
                await asyncio.get_running_loop().run_in_executor(self._executor, self._disconnect)
        finally:
            self._executor.shutdown(wait=False)

    async def retrieve(self, ids: Sequence[str], uow: Any = None) -> list[A]:
        wanted = [(i, self._codec.key(i)) for i in ids_asked(ids)]
        doing = f"retrieve of {len(wanted)} aggregate(s)"
        rows = await self._run(doing, self._latest, [key for _, key in wanted])
        return [self._codec.decode(rows[k][1], i, rows[k][0]) for i, k in wanted if k in rows]

    async def retrieve_version(self, aggregate_id: str, version: int) -> A | None:
        doing = f"retrieve of aggregate {aggregate_id!r} version {version}"
        key = self._codec.key(aggregate_id)
        state = await self._run(doing, self._one_version, key, version)
        return None if state is None else self._codec.decode(state, aggregate_id, version)

    async def persist(self, aggregate: A, uow: Any = None, *, command_id: str | None = None) -> A:
        command_id = command_id or current_command_id.get()
        stored, encoded = self._codec.next_version(aggregate)
        doing = f"persist of aggregate {aggregate.id!r} at version {aggregate.version}"
        key = self._codec.key(aggregate.id)
        outcome = await self._run(doing, self._persist, key, aggregate.version, encoded, command_id)
        if outcome.kind == "stored":
            return stored
        if outcome.kind == "repeat":
            return self._codec.decode(outcome.state, aggregate.id, outcome.version)
        raise ConcurrencyError(
            aggregate_id=aggregate.id,
            expected_version=aggregate.version,
            actual_version=outcome.version,
        )

    async def was_processed(self, command_id: str, aggregate_id: str) -> bool:
        """Whether `command_id` already wrote `aggregate_id`."""
        doing = f"lookup of command {command_id!r} on aggregate {aggregate_id!r}"
        key = self._codec.key(aggregate_id)
        return await self._run(doing, self._was_processed, command_id, key)

    # --- on the event loop ----------------------------------------------------------------

    async def _run(self, doing: str, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        if self._closed:
            raise StoreClosedError(f"SQLite {self.path}: {doing}: the repository is closed")
        with sqlite_errors(f"SQLite {self.path}: {doing}"):
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- on the worker thread -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._connection is not None:
            return self._connection
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {round(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            present = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN (?, ?)",
                _TABLES,
            ).fetchone()[0]
            if present < len(_TABLES):
                # Only a store that lacks its tables takes the write lock to create them.
                with _transaction(conn):
                    for statement in _SCHEMA:
                        conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        self._connection = conn
        return conn

    def _disconnect(self) -> None:
        conn, self._connection = self._connection, None
        if conn is not None:
            conn.close()

    def _latest(self, keys: list[str]) -> dict[str, tuple[int, bytes]]:
        """The latest (version, state) of each stored key among `keys`."""
        conn = self._connect()
        unique = list(dict.fromkeys(keys))
        found: dict[str, tuple[int, bytes]] = {}
        chunks = [unique[i : i + _IDS_PER_QUERY] for i in range(0, len(unique), _IDS_PER_QUERY)]
        # Several queries read one snapshot only inside a transaction.
        with _transaction(conn, "BEGIN") if len(chunks) > 1 else nullcontext():
            for chunk in chunks:
                marks = ", ".join("?" * len(chunk))
                # SQLite takes the bare `state` from the row holding MAX(version).
                rows = conn.execute(
                    "SELECT aggregate_id, MAX(version), state FROM aggregate_versions"
                    f" WHERE aggregate_id IN ({marks}) GROUP BY aggregate_id",
                    chunk,
                )
                found.update((row[0], (row[1], row[2])) for row in rows)
        return found

    def _one_version(self, key: str, version: int) -> object:
        row = self._connect().execute(_ONE_VERSION, (key, version)).fetchone()
        return None if row is None else row[0]

    def _was_processed(self, command_id: str, key: str) -> bool:
        conn = self._connect()
        return conn.execute(_WAS_PROCESSED, (command_id, key)).fetchone() is not None

    def _persist(self, key: str, expected: int, encoded: bytes, command_id: str | None) -> _Outcome:
        conn = self._connect()
        with _transaction(conn):
            if command_id is not None:
                done = conn.execute(_FIRST_OUTCOME, (command_id, key)).fetchone()
                if done is not None:
                    return _Outcome("repeat", done[0], done[1])
            row = {"id": key, "expected": expected, "state": encoded}
            if conn.execute(_INSERT_NEXT, row).rowcount != 1:
                actual = conn.execute(_LATEST_VERSION, (key,)).fetchone()[0]
                return _Outcome("conflict", actual)
            if command_id is not None:
                conn.execute(_RECORD, (command_id, key, expected + 1))
            return _Outcome("stored", expected + 1)


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """Commit when the block completes, roll back when it raises: nothing half-written."""
    conn.execute(begin)
    try:
        yield
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
