"""A `Repository` on PostgreSQL through psycopg 3 and an async connection pool.

Same tables and rules as the SQLite store: each version is a row keyed by (`namespace:id`,
version), and a persist is one transaction that inserts the next version only if the read
version is still the latest, and records the command id beside it. Two writers racing for one
version meet on the primary key; the loser gets `ConcurrencyError`, or the first outcome when
it is a repeat of the command that won.

psycopg is imported when a repository is built, so `cqrs_resilience.stores` imports without it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeAlias

from .._codec import DEFAULT_MAX_STATE_BYTES, AggregateCodec
from .._errors import StoreClosedError, StoreConfigurationError
from .._idempotency import WriteKey, is_repeat
from .._repository import A, Outcome, Repository, ids_asked, persist_checked
from . import _sql
from ._errors import (
    map_postgres_connect_error,
    postgres_errors,
    safe_target,
)
from ._lifecycle import StoreLifecycle

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
_HAS_SCHEMA = "SELECT " + " AND ".join(f"to_regclass('{t}') IS NOT NULL" for t in _sql.TABLES)
# Concurrent CREATE TABLE IF NOT EXISTS can still collide in the catalog; take turns.
_SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('cqrs_resilience.stores.schema'))"
_INSERT_NEXT = _sql.for_psycopg(_sql.INSERT_NEXT)
_LATEST_VERSION = _sql.for_psycopg(_sql.LATEST_VERSION)
_ONE_VERSION = _sql.for_psycopg(_sql.ONE_VERSION)
_LOOKUP_WRITE = _sql.for_psycopg(_sql.LOOKUP_WRITE)
_RECORD_WRITE = _sql.for_psycopg(_sql.RECORD_WRITE)
# A command's first write records its key in the same round trip.
_RECORD_WRITE_AND_COMMAND = (
    "WITH command AS ("
    + _sql.for_psycopg(_sql.RECORD_COMMAND)
    + ") "
    + _sql.for_psycopg(_sql.RECORD_WRITE)
)
_WAS_PROCESSED = _sql.for_psycopg(_sql.WAS_PROCESSED)
_LATEST = """SELECT DISTINCT ON (aggregate_id) aggregate_id, version, state
    FROM aggregate_versions WHERE aggregate_id = ANY(%s) ORDER BY aggregate_id, version DESC"""


class PostgresRepository(StoreLifecycle, Repository[A]):
    """Aggregates of `aggregate_type` in PostgreSQL, reached by a DSN or a pool you pass in.

    Given a DSN, the repository owns its pool (`min_size`, `max_size`, `pool_timeout` seconds
    to wait for a free connection) and closes it. Given an `AsyncConnectionPool`, it uses it
    and leaves closing it to you. Tables are created on `open()` or first use when missing.
    `uow` is accepted for the `Repository` protocol and ignored: each persist commits on its own.

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
    ) -> None:
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict, make_conninfo
            from psycopg_pool import AsyncConnectionPool
        except ImportError as exc:
            raise ImportError(_INSTALL_HINT) from exc

        self._codec = AggregateCodec(aggregate_type, namespace, max_state_bytes=max_state_bytes)
        self.aggregate_type = aggregate_type
        self.namespace = self._codec.namespace
        self._unique_violation = psycopg.errors.UniqueViolation
        self._owns_pool = isinstance(dsn_or_pool, str)
        if isinstance(dsn_or_pool, str):
            params = _parse_dsn(dsn_or_pool)
            self._conninfo = (
                dsn_or_pool
                if "connect_timeout" in params
                else make_conninfo(dsn_or_pool, connect_timeout=10)
            )
            self.target = safe_target(params)
            self._pool: Pool = AsyncConnectionPool(
                self._conninfo,
                open=False,
                min_size=min_size,
                max_size=max_size,
                timeout=pool_timeout,
                kwargs={"autocommit": True},
                name=f"cqrs-resilience {self.target}",
            )
        elif isinstance(dsn_or_pool, AsyncConnectionPool):
            self._conninfo = ""
            self._pool = dsn_or_pool
            conninfo = dsn_or_pool.conninfo
            self.target = (
                safe_target(conninfo_to_dict(conninfo))
                if isinstance(conninfo, str)
                else (f"pool {dsn_or_pool.name!r}")
            )
        else:
            raise TypeError(
                f"dsn_or_pool must be a DSN string or a psycopg_pool.AsyncConnectionPool, "
                f"got {type(dsn_or_pool).__name__}"
            )
        self._ready = False
        self._closed = False
        self._opening = asyncio.Lock()

    async def open(self) -> None:
        """Check the server takes us, create missing tables, start the pool. Idempotent."""
        if self._closed:
            raise StoreClosedError(f"PostgreSQL {self.target}: open: the repository is closed")
        async with self._opening:
            if self._ready:
                return
            if self._owns_pool:
                # A direct connection reports why it failed; a pool would only time out.
                import psycopg

                try:
                    conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                except psycopg.Error as exc:
                    raise map_postgres_connect_error(exc, self.target) from exc
                with postgres_errors(f"PostgreSQL {self.target}: creating tables"):
                    async with conn:
                        await _ensure_schema(conn)
                await self._pool.open()
            else:
                with postgres_errors(f"PostgreSQL {self.target}: creating tables"):
                    await self._pool.open()
                    async with self._pool.connection() as conn:
                        await _ensure_schema(conn)
            self._ready = True

    async def close(self) -> None:
        """Stop serving (later calls raise `StoreClosedError`); close the pool if it is ours."""
        if self._closed:
            return
        self._closed = True
        if self._owns_pool:
            await self._pool.close()

    async def retrieve(self, ids: Sequence[str], uow: Any = None) -> list[A]:
        storable = self._codec.storable_id
        wanted = [(i, self._codec.key(i)) for i in ids_asked(ids) if storable(i)]
        if not wanted:
            return []
        async with self._cursor(f"retrieve of {len(wanted)} aggregate(s)") as cur:
            await cur.execute(_LATEST, (list(dict.fromkeys(key for _, key in wanted)),))
            rows = {row[0]: (row[1], row[2]) for row in await cur.fetchall()}
        return [self._codec.decode(rows[k][1], i, rows[k][0]) for i, k in wanted if k in rows]

    async def retrieve_version(self, aggregate_id: str, version: int) -> A | None:
        if not self._codec.storable_id(aggregate_id) or not 0 < version <= 2**31 - 1:
            return None
        doing = f"retrieve of aggregate {aggregate_id!r} version {version}"
        async with self._cursor(doing) as cur:
            args = {"id": self._codec.key(aggregate_id), "version": version}
            await cur.execute(_ONE_VERSION, args)
            row = await cur.fetchone()
        return None if row is None else self._codec.decode(row[0], aggregate_id, version)

    async def persist(self, aggregate: A, uow: Any = None, *, command_id: str | None = None) -> A:
        async def write(key: str, encoded: bytes, recorded: WriteKey | None) -> Outcome:
            doing = f"persist of aggregate {aggregate.id!r} at version {aggregate.version}"
            async with self._cursor(doing) as cur:
                return await self._write(
                    cur, key, aggregate.id, aggregate.version, encoded, recorded
                )

        return await persist_checked(self._codec, aggregate, command_id, write)

    async def _write(
        self,
        cur: Cursor,
        key: str,
        aggregate_id: str,
        expected: int,
        encoded: bytes,
        recorded: WriteKey | None,
    ) -> Outcome:
        args = _sql.write_args(key, expected, encoded, recorded)
        try:
            async with cur.connection.transaction():
                if recorded is not None:
                    outcome = await self._recorded(cur, args, aggregate_id, recorded)
                    if outcome is not None:
                        return outcome
                if (await cur.execute(_INSERT_NEXT, args)).rowcount == 1:
                    if recorded is not None:
                        first = recorded.whole_command and args["known"] is None
                        await cur.execute(
                            _RECORD_WRITE_AND_COMMAND if first else _RECORD_WRITE, args
                        )
                    return Outcome("stored", expected + 1)
        except self._unique_violation as exc:
            # Another transaction committed this version, this write or this command id first.
            if exc.diag.table_name not in _sql.TABLES:
                raise
        # Lost a race: unless what won was an earlier attempt of this very write.
        if recorded is not None:
            outcome = await self._recorded(cur, args, aggregate_id, recorded)
            if outcome is not None:
                return outcome
        await cur.execute(_LATEST_VERSION, args)
        row = await cur.fetchone()
        return Outcome("conflict", row[0] if row is not None else 0)

    async def _recorded(
        self, cur: Cursor, args: dict[str, Any], aggregate_id: str, recorded: WriteKey
    ) -> Outcome | None:
        """The first outcome when this write is a repeat; None when it is new."""
        await cur.execute(_LOOKUP_WRITE, args)
        row = await cur.fetchone()
        assert row is not None
        args["known"], first, version, state = row
        return (
            Outcome("repeat", version, state)
            if is_repeat(recorded, aggregate_id, args["known"], first)
            else None
        )

    async def was_processed(self, command_id: str, aggregate_id: str) -> bool:
        """Whether `command_id` already wrote `aggregate_id`."""
        doing = f"lookup of command {command_id!r} on aggregate {aggregate_id!r}"
        async with self._cursor(doing) as cur:
            args = {"command_id": command_id, "id": self._codec.key(aggregate_id)}
            await cur.execute(_WAS_PROCESSED, args)
            return await cur.fetchone() is not None

    @asynccontextmanager
    async def _cursor(self, doing: str) -> AsyncIterator[Cursor]:
        """A tuple-row cursor on a pooled connection (a pool passed in may make other rows)."""
        if self._closed:
            raise StoreClosedError(f"PostgreSQL {self.target}: {doing}: the repository is closed")
        if not self._ready:
            await self.open()
        from psycopg.rows import tuple_row

        with postgres_errors(f"PostgreSQL {self.target}: {doing}"):
            async with (
                self._pool.connection() as conn,
                conn.cursor(row_factory=tuple_row) as cur,
            ):
                yield cur


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
