"""A `Repository` on PostgreSQL through psycopg 3 and an async connection pool.

Same tables and rules as the SQLite store: each version is a row keyed by (`namespace:id`,
version), and a persist is one transaction that inserts the next version only if the read
version is still the latest, and records the command id beside it. Two writers racing for one
version meet on the primary key; the loser gets `ConcurrencyError`, or the first outcome when
it is a repeat of the command that won.

Any number of event loops, one after another or at once on several threads, can use one
repository given a DSN: it keeps a pool per loop (`_postgres_pools`).

Connections: each operation (a read, a write, a response lookup) checks a connection out of
the running loop's pool for itself, runs on it, and gives it back before it returns
(`_Checkout`); a connection is never held between operations, nor by two tasks at once. A
resolution round (`turn`) holds one more connection for its whole block: a transaction holding
the aggregate's advisory lock, which its COMMIT releases. This process's turn for the
aggregate (`PROCESS_TURNS`), taken before it, passes to the next round of this process as the
block ends; that round asks for the advisory lock meanwhile and gets it once the COMMIT lands.

psycopg is imported when a repository is built, so `cqrs_resilience.stores` imports without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeAlias

from .._clock import SYSTEM_CLOCK, Clock
from .._codec import DEFAULT_MAX_STATE_BYTES, AggregateCodec
from .._errors import StoreClosedError, StoreConfigurationError, VersionPrunedError
from .._idempotency import WriteKey, claim_of, is_repeat
from .._messages import require_command_id
from .._repository import A, Outcome, Repository, ids_asked, lookup_possible, persist_checked
from .._response_store import RecordedResponse, record_args
from .._retention import DEFAULT_KEEP_COMMANDS_S, DEFAULT_KEEP_VERSIONS, PRUNE_BATCH, Retention
from .._turns import PROCESS_TURNS
from . import _sql
from ._errors import (
    map_postgres_connect_error,
    map_postgres_error,
    postgres_errors,
    safe_target,
)
from ._lifecycle import StoreLifecycle
from ._postgres_pools import GivenPool, LoopPools, cursor_of

if TYPE_CHECKING:
    from psycopg import AsyncConnection, AsyncCursor
    from psycopg.rows import TupleRow
    from psycopg_pool import AsyncConnectionPool

    Cursor: TypeAlias = AsyncCursor[TupleRow]
    Pool: TypeAlias = AsyncConnectionPool[Any]

_INSTALL_HINT = (
    "PostgresRepository needs psycopg 3 and psycopg-pool: pip install 'cqrs-resilience[postgres]'"
)
_SCHEMA = _sql.schema("BYTEA")
_HAS_SCHEMA = "SELECT " + " AND ".join(
    f"to_regclass('{name}') IS NOT NULL" for name in (*_sql.TABLES, *_sql.INDEXES)
)
# Concurrent CREATE TABLE IF NOT EXISTS can still collide in the catalog; take turns.
_SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('cqrs_resilience.stores.schema'))"
_ONE_VERSION = _sql.for_psycopg(_sql.ONE_VERSION)
_VERSION_RANGE = _sql.for_psycopg(_sql.VERSION_RANGE)
_LATEST_STATE = _sql.for_psycopg(_sql.LATEST_STATE)
_PRUNE_RECORDS = (
    "WITH writes AS ("
    + _sql.for_psycopg(_sql.PRUNE_WRITES)
    + "), responses AS ("
    + _sql.for_psycopg(_sql.PRUNE_RESPONSES)
    + ") "
    + _sql.for_psycopg(_sql.PRUNE_COMMANDS)
)
_RESPONSE = _sql.for_psycopg(_sql.RESPONSE)
_CLAIM = _sql.for_psycopg(_sql.CLAIM)
_RELEASE_CLAIM = _sql.for_psycopg(_sql.RELEASE_CLAIM)
# Records the response unless one is (one statement): the row inserted or updated, else the
# first response, which the statement's snapshot still shows.
_RECORD_RESPONSE = (
    "WITH recorded AS ("
    + _sql.for_psycopg(_sql.RECORD_RESPONSE)
    + " RETURNING fingerprint, response) SELECT fingerprint, response FROM recorded"
    " UNION ALL SELECT fingerprint, response FROM command_responses"
    " WHERE command_id = %(command_id)s AND NOT EXISTS (SELECT 1 FROM recorded)"
)
_WAS_PROCESSED = _sql.for_psycopg(_sql.WAS_PROCESSED)
# Advisory locks of resolution turns: (this class id, a hash of the aggregate's key).
_TURN_CLASS = 0x63717273  # "cqrs"
_TURN_LOCK = (
    "SELECT set_config('lock_timeout', %(lock_timeout)s, true),"
    f" pg_advisory_xact_lock({_TURN_CLASS}, hashtext(%(id)s))"
)
# A whole write in one statement, so in one round trip and atomically. It inserts the next
# version only if the write is not a repeat, its command id is not another command's, the read
# version is still the latest, and no resolution round holds the aggregate: a round holds the
# turn's lock exclusively, a first attempt tries it shared, so first attempts never wait for
# each other and yield to a round instead of waiting for it. Then it records the write, the
# command's own row on its first write, and prunes versions retention no longer keeps. It returns
# what Python needs to tell stored, repeat, reuse and conflict apart.
_WRITE_TEMPLATE = f"""WITH
    known AS (SELECT {_sql.for_psycopg(_sql.COMMAND_FINGERPRINT)} AS fingerprint),
    first AS (SELECT fingerprint, version FROM processed_writes
        WHERE command_id = %(command_id)s AND aggregate_id = %(id)s AND seq = %(seq)s),
    latest AS (SELECT COALESCE((SELECT MAX(version) FROM aggregate_versions
        WHERE aggregate_id = %(id)s), 0) AS version),
    allowed AS (SELECT 1 AS yes
        WHERE NOT EXISTS (SELECT 1 FROM first)
        AND NOT (%(whole)s AND EXISTS (SELECT 1 FROM known WHERE fingerprint <> %(fingerprint)s))
        AND (SELECT version FROM latest) = %(expected)s
        AND (%(in_turn)s
            OR pg_try_advisory_xact_lock_shared({_TURN_CLASS}, hashtext(%(id)s)))),
    inserted AS (INSERT INTO aggregate_versions (aggregate_id, version, state)
        SELECT %(id)s, %(expected)s + 1, %(state)s FROM allowed RETURNING version),
    recorded AS (INSERT INTO processed_writes
            (command_id, aggregate_id, seq, fingerprint, version, recorded_at)
        SELECT %(command_id)s, %(id)s, %(seq)s, %(fingerprint)s, version, %(now)s
        FROM inserted WHERE %(command_id)s IS NOT NULL),
    keyed AS (INSERT INTO processed_writes
            (command_id, aggregate_id, seq, fingerprint, version, recorded_at)
        SELECT %(command_id)s, '{_sql.COMMAND_ROW}', 0, %(fingerprint)s, 0, %(now)s FROM inserted
        WHERE %(whole)s AND (SELECT fingerprint FROM known) IS NULL),
{{claimed}}    pruned AS (DELETE FROM aggregate_versions
        WHERE aggregate_id = %(id)s AND version < %(oldest)s AND EXISTS (SELECT 1 FROM inserted))
SELECT (SELECT fingerprint FROM known), (SELECT fingerprint FROM first),
    (SELECT version FROM first), (SELECT version FROM inserted), (SELECT version FROM latest)"""
# The claim a write of a command `idempotent()` runs keeps on its response (see `_sql.CLAIM`).
_CLAIMED = """claimed AS (INSERT INTO command_responses (command_id, fingerprint, owner, expires_at)
        SELECT %(command_id)s, %(fingerprint)s, %(claim_owner)s::text, %(claim_expires)s::float8
        FROM inserted
        ON CONFLICT (command_id) DO UPDATE SET fingerprint = excluded.fingerprint,
            response = NULL, owner = excluded.owner, expires_at = excluded.expires_at
        WHERE command_responses.response IS NULL OR command_responses.expires_at <= %(now)s),
"""
_WRITE = _WRITE_TEMPLATE.format(claimed="")
_WRITE_CLAIMING = _WRITE_TEMPLATE.format(claimed="    " + _CLAIMED.strip() + "\n")
# The resolution rounds this task (and the tasks it starts) holds, by (store, key).
_HELD: ContextVar[Mapping[tuple[int, str], _Round]] = ContextVar(
    "cqrs_resilience.postgres_turns", default=MappingProxyType({})
)
# The newest row of each id: one index probe per id, however long its history. PostgreSQL
# plans it anew on every execution (a generic plan cannot know the array's length).
_LATEST = """SELECT k.id, v.version, v.state FROM unnest(%s::text[]) AS k(id)
    CROSS JOIN LATERAL (SELECT version, state FROM aggregate_versions
        WHERE aggregate_id = k.id ORDER BY version DESC LIMIT 1) AS v"""


class PostgresRepository(StoreLifecycle, Repository[A]):
    """Aggregates of `aggregate_type` in PostgreSQL, reached by a DSN or a pool you pass in.

    Given a DSN, the repository owns its pool (`min_size`, `max_size`, `pool_timeout` seconds
    to wait for a free connection) and closes it. Given an `AsyncConnectionPool`, it uses it
    and leaves closing it to you. Tables are created on `open()` or first use when missing.
    `uow` is accepted for the `Repository` protocol and ignored: each persist commits on its own.
    `keep_versions`, `keep_commands_s` and `max_state_bytes` bound what is kept (see
    `cqrs_resilience._retention`); `clock.time()` stamps idempotency records.

    Resolution turns are transaction-level advisory locks keyed by the aggregate, held on a
    pooled connection while the round runs; a first attempt that finds one held yields (its
    write becomes a round) rather than wait. `lock_timeout` (seconds) bounds the wait for a
    turn: past it, the round fails with `TransientError`.

    One database can hold many aggregate types: rows are keyed by `f"{namespace}:{id}"`, so an
    `Order` "1" and a `User` "1" never meet. `namespace` defaults to the type's `__name__`; pass
    the same one on purpose to share a stream, e.g. `namespace="Order"` after renaming `Order`
    to keep reading its rows. It must be a non-empty string without ":". Callers only ever see
    the bare ids.
    """

    def __init__(
        self,
        dsn_or_pool: str | Pool,
        aggregate_type: type[A],
        *,
        min_size: int = 1,
        max_size: int = 10,
        pool_timeout: float = 30.0,
        namespace: str | None = None,
        max_state_bytes: int = DEFAULT_MAX_STATE_BYTES,
        keep_versions: int | None = DEFAULT_KEEP_VERSIONS,
        keep_commands_s: float | None = DEFAULT_KEEP_COMMANDS_S,
        lock_timeout: float = 30.0,
        clock: Clock | None = None,
    ) -> None:
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict, make_conninfo
            from psycopg_pool import AsyncConnectionPool
        except ImportError as exc:
            raise ImportError(_INSTALL_HINT) from exc

        if not 0 < lock_timeout < float("inf"):
            raise ValueError(
                f"lock_timeout must be a positive number of seconds, got {lock_timeout}"
            )
        self.retention = Retention(keep_versions, keep_commands_s)
        self.clock = clock or SYSTEM_CLOCK
        self.lock_timeout = lock_timeout
        self._codec = AggregateCodec(aggregate_type, namespace, max_state_bytes=max_state_bytes)
        self.max_state_bytes = max_state_bytes
        self.aggregate_type = aggregate_type
        self.namespace = self._codec.namespace
        self._unique_violation = psycopg.errors.UniqueViolation
        self._driver_error = psycopg.Error
        self._pools: LoopPools | None = None  # given a DSN: a pool per event loop
        self._given: GivenPool | None = None  # given a pool: the caller's
        if isinstance(dsn_or_pool, str):
            params = _parse_dsn(dsn_or_pool)
            self._conninfo = (
                dsn_or_pool
                if "connect_timeout" in params
                else make_conninfo(dsn_or_pool, connect_timeout=10)
            )
            self.target = safe_target(params)
            options = {
                "open": False,
                "min_size": min_size,
                "max_size": max_size,
                "timeout": pool_timeout,
                "kwargs": {"autocommit": True},
                "name": f"cqrs-resilience {self.target}",
            }
            self._pools = LoopPools(self._conninfo, options, self.target)
        elif isinstance(dsn_or_pool, AsyncConnectionPool):
            self._conninfo = ""
            conninfo = dsn_or_pool.conninfo
            self.target = (
                safe_target(conninfo_to_dict(conninfo))
                if isinstance(conninfo, str)
                else (f"pool {dsn_or_pool.name!r}")
            )
            self._given = GivenPool(dsn_or_pool, self.target)
        else:
            raise TypeError(
                f"dsn_or_pool must be a DSN string or a psycopg_pool.AsyncConnectionPool, "
                f"got {type(dsn_or_pool).__name__}"
            )
        self._ready = False  # the server took us and the tables exist
        self._closed = False

    async def open(self) -> None:
        """Check the server takes us, create missing tables, open this event loop's pool.
        Idempotent."""
        if self._closed:
            raise StoreClosedError(f"PostgreSQL {self.target}: open: the repository is closed")
        await self._pool_here()

    async def close(self) -> None:
        """Stop serving (later calls raise `StoreClosedError`); close the pools if they are ours:
        this event loop's now, those of loops still running on other threads on their loop."""
        if self._closed:
            return
        self._closed = True
        if self._pools is not None:
            await self._pools.close()

    async def _pool_here(self) -> Pool:
        """The pool serving the running event loop, opened (the first one makes the tables)."""
        if self._given is not None:
            pool = self._given.here()
            if not self._ready:
                with postgres_errors(f"PostgreSQL {self.target}: creating tables"):
                    await pool.open()
                    async with pool.connection() as conn:
                        await _ensure_schema(conn)
                self._ready = True
            return pool
        assert self._pools is not None
        found = self._pools.here()
        if found is not None:
            return found
        if not self._ready:
            await self._check_server()
        return await self._pools.open_here()

    async def _check_server(self) -> None:
        """A direct connection reports why it failed (a pool would only time out); then the
        tables are created if missing."""
        import psycopg

        try:
            conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise map_postgres_connect_error(exc, self.target) from exc
        with postgres_errors(f"PostgreSQL {self.target}: creating tables"):
            async with conn:
                await _ensure_schema(conn)
        self._ready = True

    async def retrieve(self, ids: Sequence[str], uow: Any = None) -> list[A]:
        storable = self._codec.storable_id
        wanted = [(i, self._codec.key(i)) for i in ids_asked(ids) if storable(i)]
        if not wanted:
            return []
        keys = list(dict.fromkeys(key for _, key in wanted))
        if len(keys) == 1:
            row = await self._latest(keys[0], len(wanted))
            rows = {} if row is None else {keys[0]: row}
        else:
            async with self._cursor(f"retrieve of {len(wanted)} aggregate(s)") as cur:
                await cur.execute(_LATEST, (keys,))
                rows = {row[0]: (row[1], row[2]) for row in await cur.fetchall()}
        return [self._codec.decode(rows[k][1], i, rows[k][0]) for i, k in wanted if k in rows]

    async def _latest(self, key: str, asked: int) -> tuple[int, bytes] | None:
        """The latest (version, state) stored under `key`, or None: as a round this task holds
        on it read it with its lock, if the round has not read or written it since (no
        round trip); else read now."""
        held = self._round(key)
        if held is not None and held.unread:
            held.unread = False
            return held.latest
        async with self._cursor(f"retrieve of {asked} aggregate(s)") as cur:
            # A statement PostgreSQL plans once for all ids, where `_LATEST`'s array makes it
            # plan again on every execution.
            await cur.execute(_LATEST_STATE, {"id": key})
            row: tuple[int, bytes] | None = await cur.fetchone()
        return row

    async def retrieve_version(self, aggregate_id: str, version: int) -> A | None:
        if not self._codec.storable_version(version) or not self._codec.storable_id(aggregate_id):
            return None
        doing = f"retrieve of aggregate {aggregate_id!r} version {version}"
        async with self._cursor(doing) as cur:
            args = {"id": self._codec.key(aggregate_id), "version": version}
            await cur.execute(_ONE_VERSION, args)
            row = await cur.fetchone()
            if row is None:
                await cur.execute(_VERSION_RANGE, args)
                oldest, latest = await cur.fetchone() or (None, None)
                if oldest is not None and version < oldest and version <= latest:
                    raise VersionPrunedError(aggregate_id, version, oldest)
                return None
        return self._codec.decode(row[0], aggregate_id, version)

    async def persist(self, aggregate: A, uow: Any = None, *, command_id: str | None = None) -> A:
        self._codec.require(aggregate)  # before anything reads its id

        async def write(key: str, encoded: bytes, recorded: WriteKey | None) -> Outcome:
            doing = f"persist of aggregate {aggregate.id!r} at version {aggregate.version}"
            async with self._cursor(doing) as cur:
                return await self._write(cur, key, aggregate, encoded, recorded)

        # A first attempt yields to a round of this process on the same aggregate (a round
        # elsewhere is found by the write's try-lock).
        yields = self._round(self._codec.key(aggregate.id)) is None and (
            PROCESS_TURNS.held((id(self), aggregate.id))
        )
        return await persist_checked(
            self._codec, aggregate, command_id, write, turns=self, yields=yields
        )

    @asynccontextmanager
    async def turn(self, aggregate_id: Any) -> AsyncIterator[None]:
        """Hold the turn to resolve a conflict on `aggregate_id`: this process's turn, then a
        transaction-level advisory lock on a pooled connection, held while the block runs
        (the process's turn passes on as the block ends, the lock with the COMMIT after)."""
        key = self._codec.key(aggregate_id)
        lock = {"id": key, "lock_timeout": f"{self.lock_timeout}s"}
        process_turn = _ProcessTurn(PROCESS_TURNS.turn((id(self), aggregate_id)))
        async with (
            process_turn,
            self._cursor(f"waiting to resolve a conflict on aggregate {aggregate_id!r}") as cur,
        ):
            conn = cur.connection
            try:
                # BEGIN, the lock and a read of the aggregate in one round trip, which ends
                # with the pipeline (the lock held from then on); COMMIT in one more.
                # psycopg's `transaction()` would make it more: it waits for BEGIN on its own.
                # READ COMMITTED whatever the server's or the pool's default: the read must
                # see what the lock's last holder wrote, so its snapshot is taken once the
                # lock is granted, not when the transaction began (REPEATABLE READ would).
                async with conn.pipeline():
                    if conn.autocommit:
                        await cur.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                    else:  # psycopg begins one itself, at the pool's isolation level
                        await cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    await cur.execute(_TURN_LOCK, lock)
                    await cur.execute(_LATEST_STATE, {"id": key})
                held = _Round(await cur.fetchone())
                token = _HELD.set({**_HELD.get(), (id(self), key): held})
                try:
                    yield
                finally:
                    held.end()
                    _HELD.reset(token)
                await process_turn.release()  # the next round may ask for the lock now
                await conn.commit()
            except BaseException:
                # The lock ends with the transaction. A connection left in one (the rollback
                # failed, or was cancelled) is not idle: the pool rolls it back or discards it.
                if conn.info.transaction_status in _in_transaction():
                    with contextlib.suppress(Exception):
                        await conn.rollback()
                raise

    async def _write(
        self, cur: Cursor, key: str, aggregate: A, encoded: bytes, recorded: WriteKey | None
    ) -> Outcome:
        expected = aggregate.version
        now = self.clock.time()
        args = _sql.write_args(key, expected, encoded, recorded, now)
        args.setdefault("command_id", None)
        args.setdefault("seq", None)
        args.setdefault("fingerprint", None)
        args["whole"] = recorded is not None and recorded.whole_command
        held = self._round(key)
        if held is not None:
            held.unread = False  # this write makes what the round read under its lock stale
        args["in_turn"] = held is not None
        args["oldest"] = self.retention.oldest_kept(expected + 1)
        claim = claim_of(recorded, self)
        write = _WRITE
        if claim is not None:
            args.update(claim_owner=claim.owner, claim_expires=now + claim.lease_s)
            write = _WRITE_CLAIMING
        try:
            row = await self._execute_one(cur, write, args)
        except self._unique_violation as exc:
            # Another writer committed this version, this write or this command id first: the
            # same statement now sees what it did, and answers repeat, reuse or conflict.
            if exc.diag.table_name not in _sql.TABLES:
                raise
            row = await self._execute_one(cur, write, args)
        known, first, first_version, inserted, latest = row
        if recorded is not None and is_repeat(recorded, aggregate.id, known, first):
            if claim is not None:  # the command runs again: its resends wait for it
                await cur.execute(_CLAIM, args)
            return await self._first_outcome(cur, key, first_version)
        cutoff = self.retention.records_cutoff(now)
        if cutoff is not None:
            prune = {"cutoff": cutoff, "batch": PRUNE_BATCH, "now": now}
            await cur.execute(_PRUNE_RECORDS, prune)
        if inserted is not None:
            return Outcome("stored", inserted)
        return Outcome("conflict", latest)

    async def _execute_one(self, cur: Cursor, statement: str, args: dict[str, Any]) -> Any:
        """Run one statement atomically: as it is in autocommit, in a transaction otherwise."""
        if cur.connection.autocommit:
            await cur.execute(statement, args)
        else:
            async with cur.connection.transaction():
                await cur.execute(statement, args)
        return await cur.fetchone()

    async def _first_outcome(self, cur: Cursor, key: str, version: int) -> Outcome:
        """The state a repeated write first stored, or the latest if retention pruned it."""
        await cur.execute(_ONE_VERSION, {"id": key, "version": version})
        row = await cur.fetchone()
        if row is not None:
            return Outcome("repeat", version, row[0])
        await cur.execute(_LATEST_STATE, {"id": key})
        latest_version, state = await cur.fetchone() or (version, None)
        return Outcome("repeat", latest_version, state)

    async def recorded_response(self, command_id: str) -> RecordedResponse | None:
        """The response recorded for `command_id`, or its live claim, or None: one read."""
        require_command_id(command_id)
        async with self._cursor(f"lookup of the response to command {command_id!r}") as cur:
            await cur.execute(_RESPONSE, {"command_id": command_id, "now": self.clock.time()})
            row = await cur.fetchone()
        return None if row is None else RecordedResponse(*row)

    async def record_response(
        self, command_id: str, fingerprint: bytes, response: bytes, keep_s: float | None
    ) -> RecordedResponse:
        """Record `response` unless one is recorded; the one recorded (this, or the first)."""
        require_command_id(command_id)
        keep_commands_s, now = self.retention.keep_commands_s, self.clock.time()
        args = record_args(command_id, fingerprint, response, keep_s, keep_commands_s, now)
        async with self._cursor(f"recording the response to command {command_id!r}") as cur:
            row = await self._execute_one(cur, _RECORD_RESPONSE, args)
        fingerprint, response = row
        return RecordedResponse(fingerprint, response)

    async def release_claim(self, command_id: str, owner: str) -> None:
        """Drop `owner`'s claim on the response of `command_id`, if it still holds it."""
        async with self._cursor(f"releasing command {command_id!r}") as cur:
            await cur.execute(_RELEASE_CLAIM, {"command_id": command_id, "owner": owner})

    async def was_processed(self, command_id: str, aggregate_id: str) -> bool:
        """Whether `command_id` already wrote `aggregate_id`."""
        if not lookup_possible(self._codec, command_id, aggregate_id):
            return False
        doing = f"lookup of command {command_id!r} on aggregate {aggregate_id!r}"
        async with self._cursor(doing) as cur:
            args = {"command_id": command_id, "id": self._codec.key(aggregate_id)}
            await cur.execute(_WAS_PROCESSED, args)
            return await cur.fetchone() is not None

    def _round(self, key: str) -> _Round | None:
        """The resolution round on `key` this task runs in (or a task that started it), while
        the round runs: a task started in a round that outlives it writes as anyone else."""
        held = _HELD.get().get((id(self), key))
        return held if held is not None and held.running else None

    def _cursor(self, doing: str) -> _Checkout:
        """`async with`: a tuple-row cursor on a pooled connection, for one operation; errors
        name `doing` (see `_Checkout`)."""
        return _Checkout(self, doing)


class _Round:
    """A resolution round this process holds on one aggregate, `running` until its block
    ends, and the aggregate's latest (version, state) as the round read it with its lock
    (None: not stored), `unread` until the round reads or writes the aggregate or ends. While
    the round holds the lock, no other writer can store a version of the aggregate (a first
    attempt's write tries the lock, another round waits for it), so until the round writes
    it, that row is what a read would return."""

    __slots__ = ("latest", "running", "unread")

    def __init__(self, latest: tuple[int, bytes] | None) -> None:
        self.latest = latest
        self.unread = True
        self.running = True  # a task started in the round may outlive it

    def end(self) -> None:
        self.unread = self.running = False


class _ProcessTurn:
    """This process's turn for one aggregate, which a round gives up as soon as its block
    ends, before its COMMIT: the next round of this process asks for the database's lock
    meanwhile and gets it as that COMMIT releases it. The database's lock keeps the two
    apart; what the next round saves is a round trip of waiting on a contended aggregate."""

    __slots__ = ("_held", "_turn")

    def __init__(self, turn: AbstractAsyncContextManager[Any]) -> None:
        self._turn = turn
        self._held = False

    async def __aenter__(self) -> None:
        await self._turn.__aenter__()
        self._held = True

    async def release(self) -> None:
        if self._held:
            self._held = False
            await self._turn.__aexit__(None, None, None)

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()


class _Checkout:
    """One operation's pooled connection: what `pool.connection()` and `async with conn`
    together do, in one layer, which the write path pays twice a command.

    The block gets a tuple-row cursor (`cursor_of`). As it ends, a connection that is not in
    autocommit (a pool passed in) commits, or rolls back after an error, as psycopg's
    `async with conn` does; then the connection goes back to the pool. psycopg's errors,
    from the checkout to the return, become store errors naming what was being done.
    """

    __slots__ = ("_conn", "_doing", "_pool", "_repository")

    def __init__(self, repository: PostgresRepository[Any], doing: str) -> None:
        self._repository = repository
        self._doing = doing

    async def __aenter__(self) -> Cursor:
        repository = self._repository
        if repository._closed:
            raise StoreClosedError(
                f"PostgreSQL {repository.target}: {self._doing}: the repository is closed"
            )
        pool = self._pool = await repository._pool_here()
        try:
            conn = self._conn = await pool.getconn()
        except repository._driver_error as exc:
            raise self._mapped(exc) from exc
        return cursor_of(conn)

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any
    ) -> None:
        conn = self._conn
        try:
            try:
                if not conn.autocommit:
                    if kind is None:
                        await conn.commit()
                    else:
                        with contextlib.suppress(Exception):
                            await conn.rollback()
            finally:
                await self._pool.putconn(conn)
        except self._repository._driver_error as exc:
            raise self._mapped(exc) from exc
        if isinstance(error, self._repository._driver_error):
            raise self._mapped(error) from error

    def _mapped(self, error: Exception) -> Exception:
        return map_postgres_error(error, f"PostgreSQL {self._repository.target}: {self._doing}")


def _parse_dsn(dsn: str) -> dict[str, Any]:
    """The DSN's parameters; a malformed DSN is reported without quoting any of it."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        return conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        pass
    # Raised outside the handler so not even __context__ keeps the parser's message, which
    # quotes the string and so may quote a password.
    raise StoreConfigurationError(
        "invalid PostgreSQL connection string (not shown: it may hold a password)"
    )


def _in_transaction() -> tuple[Any, ...]:
    """psycopg's transaction statuses of a connection inside a transaction block."""
    from psycopg.pq import TransactionStatus

    return (TransactionStatus.INTRANS, TransactionStatus.INERROR)


async def _ensure_schema(conn: AsyncConnection[Any]) -> None:
    """Create the tables when missing; a role without CREATE rights works once they exist."""
    from psycopg.rows import tuple_row

    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(_HAS_SCHEMA)
        row = await cur.fetchone()
        if row is not None and row[0]:
            return
        async with conn.transaction():
            await cur.execute(_SCHEMA_LOCK)
            for statement in _SCHEMA:
                await cur.execute(statement)
