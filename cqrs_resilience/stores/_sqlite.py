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
from typing import Any, TypeVar, TypeVarTuple

from .._codec import DEFAULT_MAX_STATE_BYTES, AggregateCodec
from .._errors import StoreClosedError
from .._idempotency import WriteKey, is_repeat
from .._repository import A, Outcome, Repository, ids_asked, persist_checked
from . import _sql
from ._errors import sqlite_errors
from ._lifecycle import StoreLifecycle

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_SCHEMA = _sql.schema("BLOB", " WITHOUT ROWID")
# SQLite caps bound parameters per statement (999 in old builds).
_IDS_PER_QUERY = 500


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
        max_state_bytes: int = DEFAULT_MAX_STATE_BYTES,
    ) -> None:
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout must be >= 0 seconds, got {busy_timeout}")
        self._codec = AggregateCodec(aggregate_type, namespace, max_state_bytes=max_state_bytes)
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
        storable = self._codec.storable_id
        wanted = [(i, self._codec.key(i)) for i in ids_asked(ids) if storable(i)]
        doing = f"retrieve of {len(wanted)} aggregate(s)"
        rows = await self._run(doing, self._latest, [key for _, key in wanted])
        return [self._codec.decode(rows[k][1], i, rows[k][0]) for i, k in wanted if k in rows]

    async def retrieve_version(self, aggregate_id: str, version: int) -> A | None:
        if not self._codec.storable_id(aggregate_id):
            return None
        doing = f"retrieve of aggregate {aggregate_id!r} version {version}"
        key = self._codec.key(aggregate_id)
        state = await self._run(doing, self._one_version, key, version)
        return None if state is None else self._codec.decode(state, aggregate_id, version)

    async def persist(self, aggregate: A, uow: Any = None, *, command_id: str | None = None) -> A:
        doing = f"persist of aggregate {aggregate.id!r} at version {aggregate.version}"

        async def write(key: str, encoded: bytes, recorded: WriteKey | None) -> Outcome:
            return await self._run(
                doing, self._persist, key, aggregate.id, aggregate.version, encoded, recorded
            )

        return await persist_checked(self._codec, aggregate, command_id, write)

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
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN (?, ?, ?)",
                _sql.TABLES,
            ).fetchone()[0]
            if present < len(_sql.TABLES):
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
        args = {"id": key, "version": version}
        row = self._connect().execute(_sql.ONE_VERSION, args).fetchone()
        return None if row is None else row[0]

    def _was_processed(self, command_id: str, key: str) -> bool:
        args = {"command_id": command_id, "id": key}
        return self._connect().execute(_sql.WAS_PROCESSED, args).fetchone() is not None

    def _persist(
        self,
        key: str,
        aggregate_id: str,
        expected: int,
        encoded: bytes,
        recorded: WriteKey | None,
    ) -> Outcome:
        conn = self._connect()
        args = _sql.write_args(key, expected, encoded, recorded)
        with _transaction(conn):
            if recorded is not None:
                command, first, version, state = conn.execute(_sql.LOOKUP_WRITE, args).fetchone()
                if is_repeat(recorded, aggregate_id, command, first):
                    return Outcome("repeat", version, state)
            if conn.execute(_sql.INSERT_NEXT, args).rowcount != 1:
                return Outcome("conflict", conn.execute(_sql.LATEST_VERSION, args).fetchone()[0])
            if recorded is not None:
                conn.execute(_sql.RECORD_WRITE, args)
                if recorded.whole_command and command is None:
                    conn.execute(_sql.RECORD_COMMAND, args)
            return Outcome("stored", expected + 1)


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
