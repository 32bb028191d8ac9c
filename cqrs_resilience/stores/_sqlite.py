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
together (group commit: see `_write`).

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
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, nullcontext, suppress
from contextvars import ContextVar
from typing import Any, NamedTuple, TypeVar, TypeVarTuple

from .._clock import SYSTEM_CLOCK, Clock
from .._codec import DEFAULT_MAX_STATE_BYTES, AggregateCodec
from .._errors import StoreClosedError, VersionPrunedError
from .._idempotency import WriteKey, is_repeat
from .._repository import A, Outcome, Repository, ids_asked, persist_checked
from .._retention import DEFAULT_KEEP_COMMANDS_S, DEFAULT_KEEP_VERSIONS, PRUNE_BATCH, Retention
from .._turns import PROCESS_TURNS
from . import _sql
from ._errors import sqlite_errors
from ._lifecycle import StoreLifecycle

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
INLINE_READ_BYTES = 64 * 1024
"""The largest state read on the event loop; bigger ones are read on the reader thread."""
_NO_CAP = 2**62
# Reads that leave a state out (NULL) when it is bigger than :cap, without loading it.
_LATEST_CAPPED = """SELECT version, CASE WHEN length(state) <= :cap THEN state END
    FROM aggregate_versions WHERE aggregate_id = :id ORDER BY version DESC LIMIT 1"""
_ONE_VERSION_CAPPED = """SELECT CASE WHEN length(state) <= :cap THEN state END
    FROM aggregate_versions WHERE aggregate_id = :id AND version = :version"""

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
        self._loop_connection: sqlite3.Connection | None = None  # on `_loop_thread` only
        self._loop_thread: int | None = None
        self._ready = False
        self._closed = False
        self._gate: asyncio.Lock | None = None  # held by a locked resolution turn
        self._queued: list[_Queued] = []  # writes waiting for the writer thread's next commit
        self._queued_lock = threading.Lock()
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
                self._disconnect_loop_reader()
                await loop.run_in_executor(self._reader, self._disconnect_reader)
                await loop.run_in_executor(self._executor, self._disconnect)
        finally:
            self._executor.shutdown(wait=False)
            self._reader.shutdown(wait=False)

    async def retrieve(self, ids: Sequence[str], uow: Any = None) -> list[A]:
        storable = self._codec.storable_id
        wanted = [(i, self._codec.key(i)) for i in ids_asked(ids) if storable(i)]
        doing = f"retrieve of {len(wanted)} aggregate(s)"
        rows = await self._read(doing, self._latest, [key for _, key in wanted], inline=True)
        return [self._codec.decode(rows[k][1], i, rows[k][0]) for i, k in wanted if k in rows]

    async def retrieve_version(self, aggregate_id: str, version: int) -> A | None:
        if not self._codec.storable_id(aggregate_id):
            return None
        doing = f"retrieve of aggregate {aggregate_id!r} version {version}"
        key = self._codec.key(aggregate_id)
        state, oldest = await self._read(doing, self._one_version, key, version, inline=True)
        if state is not None:
            return self._codec.decode(state, aggregate_id, version)
        if oldest is not None:
            raise VersionPrunedError(aggregate_id, version, oldest)
        return None

    async def persist(self, aggregate: A, uow: Any = None, *, command_id: str | None = None) -> A:
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
        """Count a write of `aggregate_id` while it is under way (see `_settled`)."""
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
        doing = f"lookup of command {command_id!r} on aggregate {aggregate_id!r}"
        key = self._codec.key(aggregate_id)
        return await self._read(doing, self._was_processed, command_id, key, inline=True)

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
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        async with self._gate_lock():  # FIFO: queued behind a turn that is waiting, too
            if self._closed:
                raise StoreClosedError(f"SQLite {self.path}: {doing}: the repository is closed")
            with self._queued_lock:
                self._queued.append(_Queued(args, aggregate_id, recorded, future))
                first = len(self._queued) == 1
            if first:  # else the commit already queued takes this write too
                self._executor.submit(self._commit_queued)
        with sqlite_errors(f"SQLite {self.path}: {doing}"):
            return await future

    async def _read(
        self,
        doing: str,
        fn: Callable[[sqlite3.Connection, *Ts, int], T],
        *args: *Ts,
        inline: bool = False,
    ) -> T:
        """`fn(connection, *args, cap)` on the reading connection; inside this task's turn, on
        the writing one (in the turn's transaction, so the round reads its own writes).

        With `inline`, first on the event loop's own connection with `cap` =
        `INLINE_READ_BYTES`: `fn` raises `_Elsewhere` for a bigger state, and a busy database
        raises too; either way the read runs again on the reader thread, with no cap."""
        if _IN_TURN.get() is self:
            return await self._submit(doing, self._on_writer, fn, *args)
        if not self._ready:
            await self.open()  # the writer creates the tables a reader needs
        if self._closed:
            raise StoreClosedError(f"SQLite {self.path}: {doing}: the repository is closed")
        if inline:
            conn = self._loop_reader()
            if conn is not None:
                try:
                    return fn(conn, *args, INLINE_READ_BYTES)
                except (_Elsewhere, sqlite3.Error):
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

    def _disconnect_reader(self) -> None:
        conn, self._read_connection = self._read_connection, None
        if conn is not None:
            conn.close()

    def _on_reader(self, fn: Callable[[sqlite3.Connection, *Ts, int], T], args: tuple[*Ts]) -> T:
        if self._read_connection is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {round(self.busy_timeout * 1000)}")
            self._read_connection = conn
        return fn(self._read_connection, *args, _NO_CAP)

    def _on_writer(self, fn: Callable[[sqlite3.Connection, *Ts, int], T], *args: *Ts) -> T:
        return fn(self._connect(), *args, _NO_CAP)

    def _loop_reader(self) -> sqlite3.Connection | None:
        """The event loop's read-only connection, which never waits for a lock; None on any
        thread but the first that asked (connections stay with one thread)."""
        if self._loop_connection is not None:
            return self._loop_connection if threading.get_ident() == self._loop_thread else None
        if self._loop_thread is not None:
            return None
        self._loop_thread = threading.get_ident()
        try:
            conn = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA query_only = ON")
        except sqlite3.Error:
            return None  # the reader thread reads, as before
        self._loop_connection = conn
        return conn

    def _disconnect_loop_reader(self) -> None:
        conn, self._loop_connection = self._loop_connection, None
        if conn is not None:
            conn.close()

    def _latest(
        self, conn: sqlite3.Connection, keys: list[str], cap: int
    ) -> dict[str, tuple[int, bytes]]:
        """The latest (version, state) of each stored key among `keys`: an index probe each."""
        unique = list(dict.fromkeys(keys))
        if len(unique) > 1 and cap != _NO_CAP:
            raise _Elsewhere  # a snapshot of several: in a transaction, on a thread
        found: dict[str, tuple[int, bytes]] = {}
        # Several queries read one snapshot only inside a transaction.
        with _transaction(conn, "BEGIN") if len(unique) > 1 else nullcontext():
            for key in unique:
                row = conn.execute(_LATEST_CAPPED, {"id": key, "cap": cap}).fetchone()
                if row is not None:
                    found[key] = (row[0], _within_cap(row[1]))
        return found

    def _one_version(
        self, conn: sqlite3.Connection, key: str, version: int, cap: int
    ) -> tuple[object, int | None]:
        """The state at `version`, or (None, the oldest version kept) if it was pruned."""
        args = {"id": key, "version": version, "cap": cap}
        row = conn.execute(_ONE_VERSION_CAPPED, args).fetchone()
        if row is not None:
            return _within_cap(row[0]), None
        oldest, latest = conn.execute(_sql.VERSION_RANGE, args).fetchone()
        pruned = oldest is not None and 0 < version < oldest and version <= latest
        return None, oldest if pruned else None

    def _begin_turn(self) -> None:
        self._connect().execute("BEGIN IMMEDIATE")

    def _end_turn(self, commit: bool) -> None:
        conn = self._connect()
        if conn.in_transaction:
            conn.execute("COMMIT" if commit else "ROLLBACK")

    def _was_processed(self, conn: sqlite3.Connection, command_id: str, key: str, cap: int) -> bool:
        args = {"command_id": command_id, "id": key}
        return conn.execute(_sql.WAS_PROCESSED, args).fetchone() is not None

    def _persist(
        self, args: dict[str, Any], aggregate_id: str, recorded: WriteKey | None
    ) -> Outcome:
        conn = self._connect()
        with _transaction(conn):
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

    def _commit_queued(self) -> None:
        """Write every queued persist in one transaction; tell each its outcome on its loop.

        A write that fails on its own (a reused idempotency key) is rolled back to its
        savepoint and fails alone; a database error fails them all, and nothing is written."""
        with self._queued_lock:
            queued, self._queued = self._queued, []
        results: list[tuple[bool, Any]] = []
        try:
            conn = self._connect()
            if len(queued) == 1:
                one = queued[0]
                results.append(_outcome_of(self._persist, one.args, one.aggregate_id, one.key))
            else:
                with _transaction(conn):
                    for write in queued:
                        results.append(
                            _outcome_of(self._persist, write.args, write.aggregate_id, write.key)
                        )
                        if isinstance(results[-1][1], sqlite3.Error):
                            raise results[-1][1]
        except BaseException as exc:  # nothing committed: every write fails with the error
            results = [(False, exc)] * len(queued)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Queued, tuple[bool, Any]]]] = {}
        for write, result in zip(queued, results, strict=True):
            by_loop.setdefault(write.future.get_loop(), []).append((write, result))
        for loop, outcomes in by_loop.items():
            with suppress(RuntimeError):  # a closed loop: nobody waits for these outcomes
                loop.call_soon_threadsafe(_deliver, outcomes)

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


class _Queued(NamedTuple):
    """A persist waiting for the writer thread's next commit."""

    args: dict[str, Any]
    aggregate_id: str
    key: WriteKey | None
    future: asyncio.Future[Outcome]


def _outcome_of(
    persist: Callable[[dict[str, Any], str, WriteKey | None], Outcome],
    args: dict[str, Any],
    aggregate_id: str,
    key: WriteKey | None,
) -> tuple[bool, Any]:
    try:
        return True, persist(args, aggregate_id, key)
    except Exception as exc:
        return False, exc


def _deliver(outcomes: list[tuple[_Queued, tuple[bool, Any]]]) -> None:
    """Hand each waiting persist its outcome (on its event loop)."""
    for write, (ok, value) in outcomes:
        if write.future.done():  # its caller was cancelled
            continue
        if ok:
            write.future.set_result(value)
        else:
            write.future.set_exception(value)


class _Elsewhere(Exception):
    """An inline read that must run on the reader thread instead (a state over the cap)."""


def _within_cap(state: bytes | None) -> bytes:
    """A state a capped read returned; None (left out for its size) reads elsewhere."""
    if state is None:
        raise _Elsewhere
    return state


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """Commit when the block completes, roll back when it raises: nothing half-written.

    Inside a resolution turn's transaction it is a savepoint, committed with the turn.
    """
    if conn.in_transaction:
        conn.execute("SAVEPOINT cqrs_write")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK TO cqrs_write")
            raise
        finally:
            conn.execute("RELEASE cqrs_write")
        return
    conn.execute(begin)
    try:
        yield
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
