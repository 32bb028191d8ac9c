"""A `Repository` on one SQLite file: stdlib `sqlite3`, WAL, each version a row.

The database, not Python, enforces the version check: a persist is one `BEGIN IMMEDIATE`
transaction that inserts row (`namespace:id`, version + 1) only when the latest stored version
is the one the aggregate was read at, records the command id beside it, and prunes what the
retention settings no longer keep. Several processes may share the file; a writer that finds it
locked for longer than `busy_timeout` gets a `TransientError`.

Each repository owns two connections, each on its own worker thread, so the event loop never
waits for a lock and no connection is used from two threads: one writes, the other reads (in
WAL mode readers see the last commit and never wait for a writer). A read of one aggregate
whose state is at most `INLINE_READ_BYTES` runs on the event loop itself, on a third,
read-only connection that never waits: it is an index probe and a small row, cheaper than the
two thread switches it saves; a bigger state, several ids, or a database busy for any reason,
is read on the reader thread instead. Writes that queue while the writer thread is busy commit
together (group commit: `_sqlite_commit`).

Resolution turns (`turn()`) are adaptive. A round first takes this process's turn for the
aggregate only: its reads and merge run while other aggregates' writes go on, and a first
attempt on the same aggregate yields to it (a `ConcurrencyError` at once, so it becomes a round
and takes its turn) instead of racing it. The round first waits for this process's writes of
the aggregate that were already under way, so it reads what they wrote instead of losing to
them: within one process a round cannot lose. When it loses anyway (another process wrote the
aggregate meanwhile), the aggregate counts as contested for `CONTESTED_S`, and its rounds take
SQLite's own writer lock too: a `BEGIN IMMEDIATE` transaction that the round's reads and writes
run in, so no writer in any process can slip in between the round reading the latest state and
writing the merge. Other writes on this repository then wait for the round, other reads do
not.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar, TypeVarTuple

from .._clock import SYSTEM_CLOCK, Clock
from .._codec import DEFAULT_MAX_STATE_BYTES, AggregateCodec
from .._errors import StoreClosedError, VersionPrunedError
from .._idempotency import WriteKey, is_repeat
from .._repository import A, Outcome, Repository, ids_asked, lookup_possible, persist_checked
from .._retention import DEFAULT_KEEP_COMMANDS_S, DEFAULT_KEEP_VERSIONS, PRUNE_BATCH, Retention
from .._turns import PROCESS_TURNS
from . import _sql
from ._errors import sqlite_errors
from ._lifecycle import StoreLifecycle
from ._sqlite_commit import GroupCommit, transaction
from ._sqlite_reads import (
    INLINE_READ_BYTES,
    NO_CAP,
    Elsewhere,
    LoopReader,
    latest,
    one_version,
    was_processed,
)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_SCHEMA = _sql.schema("BLOB", " WITHOUT ROWID")
# The (repository, aggregate id) of the unlocked resolution turn this task is in, if any.
_OPEN_TURN: ContextVar[tuple[Any, str] | None] = ContextVar(
    "cqrs_resilience.sqlite_open_turn", default=None
)
_SCHEMA_NAMES = (*_sql.TABLES, *_sql.INDEXES)
CONTESTED_S = 5.0
"""How long an aggregate whose round lost to another process keeps taking the writer lock."""
_CONTESTED_KEPT = 1024  # marks kept before the ones that ran out are swept
# The repository whose locked resolution turn this task (and the tasks it starts) is in.
_IN_TURN: ContextVar[SQLiteRepository[Any] | None] = ContextVar(
    "cqrs_resilience.sqlite_turn", default=None
)


class SQLiteRepository(StoreLifecycle, Repository[A]):
    """Aggregates of `aggregate_type` in the SQLite file at `path`, shareable across processes.

    `busy_timeout` (seconds) is how long a write waits for another writer before it raises
    `TransientError`. `uow` is accepted for the `Repository` protocol and ignored: each persist
    commits on its own. `keep_versions`, `keep_commands_s` and `max_state_bytes` bound what is
    kept (see `cqrs_resilience._retention`); `clock.time()` stamps idempotency records.

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
        keep_versions: int | None = DEFAULT_KEEP_VERSIONS,
        keep_commands_s: float | None = DEFAULT_KEEP_COMMANDS_S,
        clock: Clock | None = None,
    ) -> None:
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout must be >= 0 seconds, got {busy_timeout}")
        self.retention = Retention(keep_versions, keep_commands_s)
        self.clock = clock or SYSTEM_CLOCK
        self._codec = AggregateCodec(aggregate_type, namespace, max_state_bytes=max_state_bytes)
        self.aggregate_type = aggregate_type
        self.namespace = self._codec.namespace
        self.path = os.fspath(path)
        self.busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cqrs-sqlite")
        self._connection: sqlite3.Connection | None = None  # used on the worker thread only
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cqrs-sqlite-read")
        self._read_connection: sqlite3.Connection | None = None  # on the reader thread only
        self._loop_reader = LoopReader(self.path)
        self._ready = False
        self._closed = False
        self._gate: asyncio.Lock | None = None  # held by a locked resolution turn
        self._commits: GroupCommit[Outcome] = GroupCommit(self._executor, self._connect)
        self._contested: dict[str, float] = {}  # aggregate id -> when a round last lost
        self._writing: dict[str, int] = {}  # aggregate id -> its writes under way here
        self._settling: dict[str, asyncio.Future[None]] = {}  # a round waiting for them

    async def open(self) -> None:
        """Connect and create the tables if missing; the first call of any method does it too."""
        await self._run("open", self._connect)
        self._ready = True

    async def close(self) -> None:
        """Close the connection; later calls raise `StoreClosedError`. Closing twice is fine."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            with sqlite_errors(f"SQLite {self.path}: close"):
                self._loop_reader.close()
                await loop.run_in_executor(self._reader, self._disconnect_reader)
                await loop.run_in_executor(self._executor, self._disconnect)
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
        doing = f"persist of aggregate {aggregate.id!r} at version {aggregate.version}"
        open_turn = _OPEN_TURN.get()
        round_ = open_turn is not None and open_turn == (self, aggregate.id)
        # A first attempt yields to a round of this process on the same aggregate.
        yields = (
            not round_
            and _IN_TURN.get() is not self
            and PROCESS_TURNS.held((id(self), aggregate.id))
        )

        async def write(key: str, encoded: bytes, recorded: WriteKey | None) -> Outcome:
            args = _sql.write_args(key, aggregate.version, encoded, recorded, self.clock.time())
            with self._under_way(aggregate.id):
                outcome = await self._write(doing, args, aggregate.id, recorded)
            if round_ and outcome.kind == "conflict":  # lost to another process
                self._contest(aggregate.id)
            return outcome

        return await persist_checked(
            self._codec, aggregate, command_id, write, turns=self, yields=yields
        )

    @asynccontextmanager
    async def turn(self, aggregate_id: Any) -> AsyncIterator[None]:
        """Hold the turn to resolve a conflict on `aggregate_id`: this process's turn, and for
        a contested aggregate SQLite's writer lock as well, which the round's reads and writes
        then run under (committed when the block ends, rolled back when it raises)."""
        async with PROCESS_TURNS.turn((id(self), aggregate_id)):
            await self._settled(aggregate_id)
            if not self._contested_now(aggregate_id):
                opened = _OPEN_TURN.set((self, aggregate_id))
                try:
                    yield
                finally:
                    _OPEN_TURN.reset(opened)
                return
            gate = self._gate_lock()
            async with gate:
                await self._submit("resolution turn", self._begin_turn)
                token = _IN_TURN.set(self)
                try:
                    yield
                except BaseException:
                    _IN_TURN.reset(token)
                    await self._submit("resolution turn", self._end_turn, False)
                    raise
                _IN_TURN.reset(token)
                await self._submit("resolution turn", self._end_turn, True)

    @contextmanager
    def _under_way(self, aggregate_id: str) -> Iterator[None]:
        """Count a write of `aggregate_id` while it is under way (see `_settled`).

        It counts while its caller waits: a cancelled caller's write may still land after, and
        a round then loses to it and locks the aggregate's rounds for a while (slower, never
        wrong). Counting until the writer thread reports would hang a round on a later event
        loop when this one closed before the report."""
        writing = self._writing
        writing[aggregate_id] = writing.get(aggregate_id, 0) + 1
        try:
            yield
        finally:
            left = writing[aggregate_id] - 1
            if left:
                writing[aggregate_id] = left
            else:
                del writing[aggregate_id]
                waiter = self._settling.pop(aggregate_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    async def _settled(self, aggregate_id: Any) -> None:
        """Wait until this repository's writes of `aggregate_id` that began before the round
        took its turn have ended (first attempts begun since yield to the round), so the
        round reads the state they left instead of losing to them."""
        while aggregate_id in self._writing:
            waiter = self._settling.get(aggregate_id)
            if waiter is None or waiter.done():  # done: a round waiting before was cancelled
                waiter = self._settling[aggregate_id] = asyncio.get_running_loop().create_future()
            await waiter

    def _contest(self, aggregate_id: str) -> None:
        """Mark `aggregate_id` contested; forget the marks that ran out, so many aggregates
        contested once each do not pile up."""
        now = self.clock.monotonic()
        contested = self._contested
        if len(contested) >= _CONTESTED_KEPT:
            for stale in [k for k, lost in contested.items() if now - lost >= CONTESTED_S]:
                del contested[stale]
        contested[aggregate_id] = now

    def _contested_now(self, aggregate_id: Any) -> bool:
        lost = self._contested.get(aggregate_id)
        if lost is None:
            return False
        if self.clock.monotonic() - lost < CONTESTED_S:
            return True
        del self._contested[aggregate_id]
        return False

    async def was_processed(self, command_id: str, aggregate_id: str) -> bool:
        """Whether `command_id` already wrote `aggregate_id`."""
        if not lookup_possible(self._codec, command_id, aggregate_id):
            return False
        doing = f"lookup of command {command_id!r} on aggregate {aggregate_id!r}"
        key = self._codec.key(aggregate_id)
        return await self._read(doing, was_processed, command_id, key)

    # --- on the event loop ----------------------------------------------------------------

    async def _run(self, doing: str, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """`fn(*args)` on the worker thread, after any open resolution turn ends (unless this
        task is in it). The worker runs jobs in order, so a job queued before a turn began
        also ends before it."""
        if _IN_TURN.get() is self:
            return await self._submit(doing, fn, *args)
        async with self._gate_lock():  # FIFO: queued behind a turn that is waiting, too
            future = self._executor_job(doing, fn, *args)
        with sqlite_errors(f"SQLite {self.path}: {doing}"):
            return await future

    async def _write(
        self, doing: str, args: dict[str, Any], aggregate_id: str, recorded: WriteKey | None
    ) -> Outcome:
        """One persist's transaction. Persists queued while the writer thread is busy are
        committed together when it gets to them (group commit: one lock and one sync for all),
        each in a savepoint of its own, and each told its outcome only once they committed."""
        if _IN_TURN.get() is self:
            return await self._submit(doing, self._persist, args, aggregate_id, recorded)
        async with self._gate_lock():  # FIFO: queued behind a turn that is waiting, too
            if self._closed:
                raise StoreClosedError(f"SQLite {self.path}: {doing}: the repository is closed")
            write = functools.partial(self._persist, args, aggregate_id, recorded)
            future = self._commits.add(write)
        with sqlite_errors(f"SQLite {self.path}: {doing}"):
            return await future

    async def _read(
        self, doing: str, fn: Callable[[sqlite3.Connection, *Ts, int], T], *args: *Ts
    ) -> T:
        """`fn(connection, *args, cap)`: first on the event loop's own connection, with `cap` =
        `INLINE_READ_BYTES` (`fn` raises `Elsewhere` for a bigger state, as a busy database
        raises too), then on the reading connection with no cap. Inside this task's turn, on
        the writing one (in the turn's transaction, so the round reads its own writes)."""
        if _IN_TURN.get() is self:
            return await self._submit(doing, self._on_writer, fn, *args)
        if not self._ready:
            await self.open()  # the writer creates the tables a reader needs
        if self._closed:
            raise StoreClosedError(f"SQLite {self.path}: {doing}: the repository is closed")
        conn = self._loop_reader.connection()
        if conn is not None:
            try:
                return fn(conn, *args, INLINE_READ_BYTES)
            except (Elsewhere, sqlite3.Error):
                pass  # the reader thread reads it, and maps any error it meets again
        future = asyncio.get_running_loop().run_in_executor(self._reader, self._on_reader, fn, args)
        with sqlite_errors(f"SQLite {self.path}: {doing}"):
            return await future

    async def _submit(self, doing: str, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        future = self._executor_job(doing, fn, *args)
        with sqlite_errors(f"SQLite {self.path}: {doing}"):
            return await future

    def _executor_job(self, doing: str, fn: Callable[[*Ts], T], *args: *Ts) -> asyncio.Future[T]:
        if self._closed:
            raise StoreClosedError(f"SQLite {self.path}: {doing}: the repository is closed")
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _gate_lock(self) -> asyncio.Lock:
        if self._gate is None:
            self._gate = asyncio.Lock()
        return self._gate

    # --- on the worker thread -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._connection is not None:
            return self._connection
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

    def _on_writer(self, fn: Callable[[sqlite3.Connection, *Ts, int], T], *args: *Ts) -> T:
        return fn(self._connect(), *args, NO_CAP)

    def _begin_turn(self) -> None:
        self._connect().execute("BEGIN IMMEDIATE")

    def _end_turn(self, commit: bool) -> None:
        conn = self._connect()
        if conn.in_transaction:
            conn.execute("COMMIT" if commit else "ROLLBACK")

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
                    return Outcome("repeat", version, state)
            if conn.execute(_sql.INSERT_NEXT, args).rowcount != 1:
                return Outcome("conflict", conn.execute(_sql.LATEST_VERSION, args).fetchone()[0])
            if recorded is not None:
                conn.execute(_sql.RECORD_WRITE, args)
                if recorded.whole_command and command is None:
                    conn.execute(_sql.RECORD_COMMAND, args)
            self._prune(conn, args)
            return Outcome("stored", args["expected"] + 1)

    def _prune(self, conn: sqlite3.Connection, args: dict[str, Any]) -> None:
        """Drop what retention no longer keeps, in the writing transaction."""
        oldest = self.retention.oldest_kept(args["expected"] + 1)
        if oldest > 1:
            conn.execute(_sql.PRUNE_VERSIONS, {"id": args["id"], "oldest": oldest})
        cutoff = self.retention.records_cutoff(args["now"])
        if cutoff is not None:
            batch = {"cutoff": cutoff, "batch": PRUNE_BATCH}
            conn.execute(_sql.PRUNE_WRITES, batch)
            conn.execute(_sql.PRUNE_COMMANDS, batch)
