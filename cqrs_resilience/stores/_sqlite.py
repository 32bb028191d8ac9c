"""A `Repository` on one SQLite file: stdlib `sqlite3`, WAL, each version a row.

The database, not Python, enforces the version check: a persist is one `BEGIN IMMEDIATE`
transaction that inserts row (`namespace:id`, version + 1) only when the latest stored version
is the one the aggregate was read at, records the command id beside it, and prunes what the
retention settings no longer keep (old versions a batch at a time). Several processes may
share the file; a writer that finds it locked for longer than `busy_timeout` gets a
`TransientError`.

Threads, event loops and transactions, the rules every method here follows:

- Every transaction is begun and ended (committed or rolled back) by one thread, in one call.
  The writer connection belongs to the writer thread, which runs each write as one job that
  holds its whole transaction (`_sqlite_commit`: writes queued while it is busy commit
  together). No transaction spans an await, so whatever happens to the coroutine waiting for a
  write (cancelled, timed out, its event loop closed), no connection is left inside one.
- The reader connection belongs to the reader thread; a small read of one aggregate runs on
  the event loop's own read-only connection, which belongs to the first thread that reads
  (`_sqlite_reads`). Reads see the last commit and hold no lock.
- Work and outcomes cross between the event loops and those threads only through executors and
  `call_soon_threadsafe`. The repository keeps no asyncio object, so any number of event loops,
  in any threads, one after another or at once, can use it.

Conflict resolution on one aggregate runs one command at a time per event loop (`_turns`):
a resolution first lets the writes queued before it commit (it queues a write that does
nothing and waits for it), so it reads what they wrote and cannot lose to them; a first
attempt that begins while it runs yields to it (a `ConcurrencyError` at once). Across
repositories and processes, an aggregate whose resolution lost to another writer takes leases
for a while (`_sqlite_leases`).
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, TypeVar, TypeVarTuple

from .._checks import setting
from .._clock import SYSTEM_CLOCK, Clock
from .._codec import DEFAULT_MAX_STATE_BYTES, AggregateCodec
from .._errors import StoreClosedError, TransientError, VersionPrunedError
from .._idempotency import WriteKey, claim_of, is_repeat
from .._messages import require_command_id
from .._repository import A, Outcome, Repository, ids_asked, lookup_possible, persist_checked
from .._response_store import RecordedResponse, record_args
from .._retention import DEFAULT_KEEP_COMMANDS_S, DEFAULT_KEEP_VERSIONS, PRUNE_BATCH, Retention
from .._turns import PROCESS_TURNS
from . import _sql, _sqlite_leases
from ._errors import sqlite_errors
from ._lifecycle import StoreLifecycle
from ._sqlite_commit import GroupCommit, WriterClosedError, transaction
from ._sqlite_leases import CONTESTED_S, Contested
from ._sqlite_reads import (
    INLINE_READ_BYTES,
    NO_CAP,
    Elsewhere,
    LoopReader,
    latest,
    one_version,
    response_of,
    was_processed,
)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

__all__ = ["CONTESTED_S", "SQLiteRepository"]

_SCHEMA = (*_sql.schema("BLOB", " WITHOUT ROWID"), _sqlite_leases.SCHEMA)
_SCHEMA_NAMES = (*_sql.TABLES, *_sql.INDEXES, _sqlite_leases.TABLE)
# The (repository, aggregate id) whose conflict resolution this task (and the tasks it
# starts) is running, if any.
_RESOLVING: ContextVar[tuple[Any, Any] | None] = ContextVar(
    "cqrs_resilience.sqlite_resolving", default=None
)
MAX_BUSY_TIMEOUT_S = 2_147_483
"""SQLite's limit: it takes the busy timeout as a 32-bit count of milliseconds."""


class SQLiteRepository(StoreLifecycle, Repository[A]):
    """Aggregates of `aggregate_type` in the SQLite file at `path`, shareable across processes.

    `busy_timeout` (seconds) is how long a write waits for another writer before it raises
    `TransientError`, and how long conflict resolution waits for another process's. `uow` is
    accepted for the `Repository` protocol and ignored: each persist commits on its own.
    `keep_versions`, `keep_commands_s` and `max_state_bytes` bound what is kept (see
    `cqrs_resilience._retention`); `clock.time()` stamps idempotency records.

    One file can hold many aggregate types: rows are keyed by `f"{namespace}:{id}"`, so an
    `Order` "1" and a `User` "1" never meet. `namespace` defaults to the type's `__name__`; pass
    the same one on purpose to share a stream, e.g. `namespace="Order"` after renaming `Order`
    to keep reading its rows. It must be a non-empty string without ":". Callers only ever see
    the bare ids.

    Any number of event loops and threads may use one repository, at once or one after
    another (several `asyncio.run` calls, a loop per thread).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        aggregate_type: type[A],
        *,
        busy_timeout: float = 5.0,
        namespace: str | None = None,
        max_state_bytes: int = DEFAULT_MAX_STATE_BYTES,
        keep_versions: int | None = DEFAULT_KEEP_VERSIONS,
        keep_commands_s: float | None = DEFAULT_KEEP_COMMANDS_S,
        clock: Clock | None = None,
    ) -> None:
        self.busy_timeout = setting(
            "busy_timeout",
            busy_timeout,
            f"a number of seconds from 0 to {MAX_BUSY_TIMEOUT_S:,} (SQLite's limit)",
            lambda v: 0 <= v <= MAX_BUSY_TIMEOUT_S,
        )
        self.retention = Retention(keep_versions, keep_commands_s)
        self.clock = clock or SYSTEM_CLOCK
        self._codec = AggregateCodec(aggregate_type, namespace, max_state_bytes=max_state_bytes)
        self.max_state_bytes = max_state_bytes
        self.aggregate_type = aggregate_type
        self.namespace = self._codec.namespace
        self.path = os.fspath(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cqrs-sqlite")
        self._connection: sqlite3.Connection | None = None  # the writer thread's only
        self._disconnected = False  # set on the writer thread: never connect again
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cqrs-sqlite-read")
        self._read_connection: sqlite3.Connection | None = None  # the reader thread's only
        self._loop_reader = LoopReader(self.path)
        self._ready = False
        self._closed = False
        self._commits = GroupCommit(self._executor, self._connect)
        self._owner = uuid.uuid4().hex  # whose leases are whose (`_lease_owner`)
        self._contested = Contested()

    async def open(self) -> None:
        """Connect and create the tables if missing; the first call of any method does it too."""
        await self._on_thread(self._executor, "open", self._connect)
        self._ready = True

    async def close(self) -> None:
        """Close the connections; later calls raise `StoreClosedError`. Closing twice is fine.
        Writes already queued are committed first."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            with sqlite_errors(f"SQLite {self.path}: close"):
                self._loop_reader.close()
                await loop.run_in_executor(self._reader, self._disconnect_reader)
                await self._commits.close(self._disconnect)
        finally:
            self._executor.shutdown(wait=False)
            self._reader.shutdown(wait=False)

    async def retrieve(self, ids: Sequence[str], uow: Any = None) -> list[A]:
        storable = self._codec.storable_id
        wanted = [(i, self._codec.key(i)) for i in ids_asked(ids) if storable(i)]
        doing = f"retrieve of {len(wanted)} aggregate(s)"
        rows = await self._read(doing, latest, [key for _, key in wanted])
        return [self._codec.decode(rows[k][1], i, rows[k][0]) for i, k in wanted if k in rows]

    async def retrieve_version(self, aggregate_id: str, version: int) -> A | None:
        if not self._codec.storable_version(version) or not self._codec.storable_id(aggregate_id):
            return None
        doing = f"retrieve of aggregate {aggregate_id!r} version {version}"
        key = self._codec.key(aggregate_id)
        state, oldest = await self._read(doing, one_version, key, version)
        if state is not None:
            return self._codec.decode(state, aggregate_id, version)
        if oldest is not None:
            raise VersionPrunedError(aggregate_id, version, oldest)
        return None

    async def persist(self, aggregate: A, uow: Any = None, *, command_id: str | None = None) -> A:
        self._codec.require(aggregate)  # before anything reads its id
        aggregate_id = aggregate.id
        doing = f"persist of aggregate {aggregate_id!r} at version {aggregate.version}"
        resolving = _RESOLVING.get() == (self, aggregate_id)
        # A first attempt yields to a resolution of this event loop on the same aggregate.
        yields = not resolving and PROCESS_TURNS.held((id(self), aggregate_id))

        async def write(key: str, encoded: bytes, recorded: WriteKey | None) -> Outcome:
            now = self.clock.time()
            args = _sql.write_args(key, aggregate.version, encoded, recorded, now)
            args["resolving"] = resolving
            args["owner"] = self._lease_owner()
            claim = claim_of(recorded, self)
            if claim is not None:
                args.update(claim_owner=claim.owner, claim_expires=now + claim.lease_s)
            outcome: Outcome = await self._write(
                doing, functools.partial(self._persist, args, aggregate_id, recorded)
            )
            # Lost a resolution to another writer, or yielded to another's lease: contested.
            if outcome.kind == "conflict" and (resolving or outcome.version == aggregate.version):
                self._contested.mark(aggregate_id, self.clock.monotonic())
            return outcome

        return await persist_checked(
            self._codec, aggregate, command_id, write, turns=self, yields=yields
        )

    @asynccontextmanager
    async def turn(self, aggregate_id: Any) -> AsyncIterator[None]:
        """Hold the turn to resolve a conflict on `aggregate_id`: this event loop's turn, once
        the writes queued before it committed; for a contested aggregate, the lease too."""
        async with PROCESS_TURNS.turn((id(self), aggregate_id)):
            doing = f"conflict resolution on aggregate {aggregate_id!r}"
            leased = False
            if isinstance(aggregate_id, str) and self._contested.now(
                aggregate_id, self.clock.monotonic()
            ):
                leased = await self._take_lease(doing, aggregate_id)
            else:
                await self._write(doing, _nothing)  # queued behind the writes under way
            resolving = _RESOLVING.set((self, aggregate_id))
            try:
                yield
            finally:
                _RESOLVING.reset(resolving)
                if leased:
                    self._release_lease(aggregate_id)

    async def _take_lease(self, doing: str, aggregate_id: str) -> bool:
        """Take the aggregate's lease, waiting at most `busy_timeout` for another owner's to
        be released or expire; False: it goes on without one (see `_sqlite_leases`)."""
        key = self._codec.key(aggregate_id)
        deadline = self.clock.monotonic() + self.busy_timeout
        pause, longest = _sqlite_leases.POLL_S
        while True:
            now = self.clock.time()
            args = {
                "id": key,
                "owner": self._lease_owner(),
                "now": now,
                "expires": now + self.busy_timeout,
            }
            try:
                taken: bool = await self._write(doing, functools.partial(self._take, args))
            except TransientError:  # the file stayed locked for busy_timeout
                return False
            except asyncio.CancelledError:
                self._release_lease(aggregate_id)  # it may have been taken as we were cancelled
                raise
            left = deadline - self.clock.monotonic()
            if taken or left <= 0:
                return taken
            await self.clock.sleep(min(pause, left))
            pause = min(pause * 2, longest)

    def _lease_owner(self) -> str:
        """Who holds a lease: this repository on this event loop. Loops take turns with each
        other as processes do (within one loop, `_turns` keeps them)."""
        return f"{self._owner}:{id(asyncio.get_running_loop()):x}"

    def _release_lease(self, aggregate_id: str) -> None:
        """Give the lease back, without waiting: queued behind the resolution's own writes. If
        that cannot be done (the repository closed), the lease expires."""
        now = self.clock.time()
        args = {"id": self._codec.key(aggregate_id), "owner": self._lease_owner(), "now": now}
        try:
            released = self._commits.add(
                functools.partial(self._in_transaction, _sqlite_leases.RELEASE, args)
            )
        except WriterClosedError:  # closed: the lease expires
            return
        released.add_done_callback(_outcome_not_needed)

    async def recorded_response(self, command_id: str) -> RecordedResponse | None:
        """The response recorded for `command_id`, or its live claim, or None: one read."""
        require_command_id(command_id)
        doing = f"lookup of the response to command {command_id!r}"
        row = await self._read(doing, response_of, command_id, self.clock.time())
        return None if row is None else RecordedResponse(*row)

    async def record_response(
        self, command_id: str, fingerprint: bytes, response: bytes, keep_s: float | None
    ) -> RecordedResponse:
        """Record `response` unless one is recorded; the one recorded (this, or the first)."""
        require_command_id(command_id)
        keep_commands_s, now = self.retention.keep_commands_s, self.clock.time()
        args = record_args(command_id, fingerprint, response, keep_s, keep_commands_s, now)
        doing = f"recording the response to command {command_id!r}"
        recorded: RecordedResponse = await self._write(
            doing, functools.partial(self._record_response, args)
        )
        return recorded

    async def release_claim(self, command_id: str, owner: str) -> None:
        """Drop `owner`'s claim on the response of `command_id`, if it still holds it."""
        doing = f"releasing command {command_id!r}"
        args = {"command_id": command_id, "owner": owner}
        await self._write(doing, functools.partial(self._in_transaction, _sql.RELEASE_CLAIM, args))

    async def was_processed(self, command_id: str, aggregate_id: str) -> bool:
        """Whether `command_id` already wrote `aggregate_id`."""
        if not lookup_possible(self._codec, command_id, aggregate_id):
            return False
        doing = f"lookup of command {command_id!r} on aggregate {aggregate_id!r}"
        key = self._codec.key(aggregate_id)
        return await self._read(doing, was_processed, command_id, key)

    # --- on the event loop ----------------------------------------------------------------

    def _closed_error(self, doing: str) -> StoreClosedError:
        return StoreClosedError(f"SQLite {self.path}: {doing}: the repository is closed")

    async def _write(self, doing: str, job: Callable[[], T]) -> T:
        """`job()` on the writer thread, in the order jobs were queued, batched with the jobs
        queued while the writer is busy (group commit)."""
        try:
            future = self._commits.add(job)
        except WriterClosedError:
            raise self._closed_error(doing) from None
        with sqlite_errors(f"SQLite {self.path}: {doing}"):
            return await future

    async def _read(
        self, doing: str, fn: Callable[[sqlite3.Connection, *Ts, int], T], *args: *Ts
    ) -> T:
        """`fn(connection, *args, cap)`: first on the event loop's own connection, with `cap` =
        `INLINE_READ_BYTES` (`fn` raises `Elsewhere` for a bigger state, as a busy database
        raises too), then on the reader thread with no cap."""
        if not self._ready:
            await self.open()  # the writer creates the tables a reader needs
        if self._closed:
            raise self._closed_error(doing)
        conn = self._loop_reader.connection()
        if conn is not None:
            try:
                return fn(conn, *args, INLINE_READ_BYTES)
            except (Elsewhere, sqlite3.Error):
                pass  # the reader thread reads it, and maps any error it meets again
        return await self._on_thread(self._reader, doing, self._on_reader, fn, args)

    async def _on_thread(
        self, executor: Executor, doing: str, fn: Callable[[*Ts], T], *args: *Ts
    ) -> T:
        if self._closed:
            raise self._closed_error(doing)
        try:
            future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except RuntimeError:  # shut down: closed from another thread meanwhile
            raise self._closed_error(doing) from None
        with sqlite_errors(f"SQLite {self.path}: {doing}"):
            return await future

    # --- on the writer thread (and the reader's) ------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._connection is not None:
            return self._connection
        if self._disconnected:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {round(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            marks = ", ".join("?" * len(_SCHEMA_NAMES))
            present = conn.execute(
                f"SELECT count(*) FROM sqlite_master WHERE name IN ({marks})", _SCHEMA_NAMES
            ).fetchone()[0]
            if present < len(_SCHEMA_NAMES):
                # Only a store that lacks its tables takes the write lock to create them.
                with transaction(conn):
                    for statement in _SCHEMA:
                        conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        self._connection = conn
        return conn

    def _disconnect(self) -> None:
        self._disconnected = True
        conn, self._connection = self._connection, None
        if conn is not None:
            conn.close()

    def _disconnect_reader(self) -> None:
        conn, self._read_connection = self._read_connection, None
        if conn is not None:
            conn.close()

    def _on_reader(self, fn: Callable[[sqlite3.Connection, *Ts, int], T], args: tuple[*Ts]) -> T:
        if self._read_connection is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {round(self.busy_timeout * 1000)}")
            self._read_connection = conn
        return fn(self._read_connection, *args, NO_CAP)

    def _record_response(self, args: dict[str, Any]) -> RecordedResponse:
        conn = self._connect()
        with transaction(conn):
            if conn.execute(_sql.RECORD_RESPONSE, args).rowcount == 1:
                return RecordedResponse(args["fingerprint"], args["response"])
            fingerprint, response = conn.execute(_sql.RECORDED_RESPONSE, args).fetchone()
            return RecordedResponse(fingerprint, response)

    def _in_transaction(self, statement: str, args: dict[str, Any]) -> None:
        conn = self._connect()
        with transaction(conn):
            conn.execute(statement, args)

    def _take(self, args: dict[str, Any]) -> bool:
        conn = self._connect()
        with transaction(conn):
            return bool(conn.execute(_sqlite_leases.TAKE, args).rowcount == 1)

    def _persist(
        self, args: dict[str, Any], aggregate_id: str, recorded: WriteKey | None
    ) -> Outcome:
        conn = self._connect()
        with transaction(conn):
            if recorded is not None:
                command, first, version, state = conn.execute(_sql.LOOKUP_WRITE, args).fetchone()
                if is_repeat(recorded, aggregate_id, command, first):
                    if state is None:  # its version was pruned: the latest state answers
                        version, state = conn.execute(_sql.LATEST_STATE, args).fetchone()
                    if "claim_owner" in args:
                        conn.execute(_sql.CLAIM, args)
                    return Outcome("repeat", version, state)
            if conn.execute(_sqlite_leases.INSERT_NEXT, args).rowcount != 1:
                return Outcome("conflict", conn.execute(_sql.LATEST_VERSION, args).fetchone()[0])
            if recorded is not None:
                unrecorded = recorded.whole_command and command is None  # its first write
                conn.execute(_sql.RECORD_FIRST_WRITE if unrecorded else _sql.RECORD_WRITE, args)
                if "claim_owner" in args:
                    conn.execute(_sql.CLAIM, args)
            self._prune(conn, args)
            return Outcome("stored", args["expected"] + 1)

    def _prune(self, conn: sqlite3.Connection, args: dict[str, Any]) -> None:
        """Drop what retention no longer keeps, in the writing transaction."""
        oldest = self.retention.versions_to_prune(args["expected"] + 1)
        if oldest is not None:
            conn.execute(_sql.PRUNE_VERSIONS, {"id": args["id"], "oldest": oldest})
        cutoff = self.retention.records_cutoff(args["now"])
        if cutoff is not None:
            batch = {"cutoff": cutoff, "batch": PRUNE_BATCH}
            conn.execute(_sql.PRUNE_WRITES, batch)
            conn.execute(_sql.PRUNE_COMMANDS, batch)
            conn.execute(_sql.PRUNE_RESPONSES, {"now": args["now"], "batch": PRUNE_BATCH})


def _nothing() -> None:
    """A job that writes nothing: done once every job queued before it is."""


def _outcome_not_needed(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not report it as lost
