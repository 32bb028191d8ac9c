"""The two sides of the contention benchmark, and the stores they write to.

Per command, each side adds one line item to an order that already exists:

- **optimistic** (the library): read the order, send `AddLineItem` — the full state with the
  new item, at the version read — to a `ResilientCommandHandler` with a three-way MERGE; the
  store inserts version + 1 beside the older versions and records the command id;
- **pessimistic** (by hand, the usual alternative): one transaction that locks the order
  (`BEGIN IMMEDIATE` on SQLite, `SELECT ... FOR UPDATE` on PostgreSQL), reads it, appends the
  item and writes it back in place.

Both sides of a store get the same settings: SQLite in WAL mode with the default
`synchronous=FULL` and the same busy timeout (30 s, so no write gives up; the library's
default is 5 s), one connection per process on one worker thread (the library's design);
PostgreSQL through one autocommit pool per process of the same size, filled before the clock
starts. Both keep the order as msgpack of `DemoOrder`, decoded and encoded once per write on
the pessimistic side; the library's extra work (the client's own read, checking that a state
reads back, a fingerprint of each command, the idempotency rows) is its cost.

`prepare` creates the orders in an empty store through each side's own write path and keeps
that as a snapshot; `restore` brings the side back to the snapshot before every run.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import sqlite3
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import msgspec
from _one_thread import OneThread

from cqrs_resilience import (
    CommandResponse,
    ConflictConfig,
    ConflictResolutionPolicy,
    ExponentialBackoffPolicy,
    HookRegistry,
)
from cqrs_resilience._demo import AddLineItem, AddLineItemHandler, DemoOrder
from cqrs_resilience.stores import PostgresRepository, SQLiteRepository
from cqrs_resilience.stores._sql import TABLES

Side = Literal["optimistic", "pessimistic"]
SIDES: tuple[Side, ...] = ("optimistic", "pessimistic")
BUSY_TIMEOUT_S = 30.0  # SQLite, both sides
PG_SCHEMA = "cqrs_contention_bench"  # keeps the bench's tables apart from anything else there
SEED_PREFIX = "seed_"

POLICY = ExponentialBackoffPolicy(max_retries=20, initial_delay_ms=1, max_delay_ms=50)
CONFIG = ConflictConfig(
    policy=ConflictResolutionPolicy.MERGE, list_identity_key="id", max_attempts=1_000
)

T = TypeVar("T")
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(DemoOrder).decode


# The attempts of the command the current task is sending: [process calls so far].
_command_attempts: ContextVar[list[int]] = ContextVar("command_attempts")


class PatientHandler(AddLineItemHandler):
    """Lets the benchmark's commands ask for as many retries and rounds as they do, and
    counts each command's attempts."""

    max_retries_cap = POLICY.max_retries
    max_attempts_cap = CONFIG.max_attempts

    async def process(self, command: AddLineItem) -> CommandResponse[str]:
        _command_attempts.get()[0] += 1
        return await super().process(command)


class Writer(Protocol):
    """One process's way of adding line items."""

    async def add(self, order_id: str, item_id: str) -> int:
        """Add the item; the number of writes it took."""
        ...

    async def close(self) -> None: ...


def new_item(item_id: str) -> dict[str, Any]:
    return {"id": item_id, "qty": 1}


def appended(state: bytes, item_id: str) -> bytes:
    """The pessimistic side's write: the stored order with one more item, one version on."""
    order = _decode(state)
    order.items.append(new_item(item_id))
    order.version += 1
    return _encode(order)


class OptimisticWriter:
    """The library: read, then a full-state command at the version read."""

    def __init__(self, repository: Any, close: Callable[[], Any]) -> None:
        self.repository = repository
        self.handler = PatientHandler(repository, HookRegistry())
        self._close = close

    async def add(self, order_id: str, item_id: str) -> int:
        seen = msgspec.structs.asdict((await self.repository.retrieve([order_id]))[0])
        attempts = [0]
        token = _command_attempts.set(attempts)
        try:
            await self.handler.handle(
                AddLineItem(
                    order_id=order_id,
                    expected_version=seen["version"],
                    state={**seen, "items": [*seen["items"], new_item(item_id)]},
                    retry_policy=POLICY,
                    conflict_config=CONFIG,
                )
            )
        finally:
            _command_attempts.reset(token)
        return attempts[0]

    async def close(self) -> None:
        await self.repository.close()
        await self._close()


async def seed_repository(repository: Any, ids: list[str], writers: int) -> None:
    """Create the orders through the library's own write path."""

    async def create(share: list[str]) -> None:
        for order_id in share:
            await repository.persist(DemoOrder(id=order_id))

    await asyncio.gather(*(create(ids[w::writers]) for w in range(writers)))


async def stored_by_repository(repository: Any, ids: list[str]) -> dict[str, DemoOrder]:
    return {order.id: order for order in await repository.retrieve(ids)}


class SQLiteStore(msgspec.Struct, frozen=True, kw_only=True):
    """Each side's own SQLite file in `folder`; the seed is a closed copy of it."""

    name: ClassVar[str] = "SQLite"
    folder: str

    def path(self, side: Side, seed: bool = False) -> str:
        return os.path.join(self.folder, f"{SEED_PREFIX if seed else ''}{side}.sqlite3")

    async def open_writer(self, side: Side, connections: int) -> Writer:
        """A writer for one process; SQLite gets one connection whatever `connections` says."""
        if side == "optimistic":
            repository = await self._repository(self.path(side))
            return OptimisticWriter(repository, _nothing)
        locked = SQLiteLockedWriter(self.path(side))
        await locked.open()
        return locked

    async def prepare(self, side: Side, ids: list[str]) -> None:
        seed = self.path(side, seed=True)
        _remove_sqlite(seed)
        if side == "optimistic":
            repository = await self._repository(seed)
            try:
                await seed_repository(repository, ids, 1)
            finally:
                await repository.close()
            return
        conn = _sqlite_connect(seed)
        try:
            conn.execute(_SQLITE_LOCKED_TABLE)
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO locked_orders VALUES (?, 1, ?)",
                ((i, _encode(DemoOrder(id=i, version=1))) for i in ids),
            )
            conn.execute("COMMIT")
        finally:
            conn.close()  # the last connection out checkpoints: the seed is one file

    async def restore(self, side: Side) -> None:
        path = self.path(side)
        _remove_sqlite(path)
        shutil.copyfile(self.path(side, seed=True), path)

    async def size_bytes(self, side: Side) -> int:
        """The database file plus its -wal, as they are now."""
        return await asyncio.to_thread(_sqlite_size, self.path(side))

    async def stored(self, side: Side, ids: list[str]) -> dict[str, DemoOrder]:
        if side == "optimistic":
            repository = await self._repository(self.path(side))
            try:
                return await stored_by_repository(repository, ids)
            finally:
                await repository.close()
        conn = _sqlite_connect(self.path(side))
        try:
            rows = conn.execute("SELECT state FROM locked_orders").fetchall()
        finally:
            conn.close()
        wanted = set(ids)
        return {o.id: o for o in map(_decode, (row[0] for row in rows)) if o.id in wanted}

    @staticmethod
    async def _repository(path: str) -> Any:
        repository = SQLiteRepository(path, DemoOrder, busy_timeout=BUSY_TIMEOUT_S)
        await repository.open()
        return repository


_SQLITE_LOCKED_TABLE = """CREATE TABLE IF NOT EXISTS locked_orders
    (id TEXT PRIMARY KEY, version INTEGER NOT NULL, state BLOB NOT NULL)"""


def _sqlite_connect(path: str) -> sqlite3.Connection:
    """Connected as `SQLiteRepository` connects: autocommit, WAL, the same busy timeout."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {round(BUSY_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL")
    return conn


def _sqlite_size(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def _remove_sqlite(path: str) -> None:
    for name in (path, path + "-wal", path + "-shm"):
        if os.path.exists(name):
            os.remove(name)


async def _nothing() -> None:
    pass


class SQLiteLockedWriter:
    """Pessimistic SQLite: BEGIN IMMEDIATE, read, write, commit, on one connection's thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._thread = OneThread(functools.partial(_sqlite_connect, path), "locked-sqlite")

    async def open(self) -> None:
        await self._thread.open()

    async def add(self, order_id: str, item_id: str) -> int:
        await self._thread.run(_locked_add, order_id, item_id)
        return 1

    async def close(self) -> None:
        await self._thread.close()


def _locked_add(conn: sqlite3.Connection, order_id: str, item_id: str) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        version, state = conn.execute(
            "SELECT version, state FROM locked_orders WHERE id = ?", (order_id,)
        ).fetchone()
        conn.execute(
            "UPDATE locked_orders SET version = ?, state = ? WHERE id = ?",
            (version + 1, appended(state, item_id), order_id),
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class PostgresStore(msgspec.Struct, frozen=True, kw_only=True):
    """Each side's own tables in schema `cqrs_contention_bench`, dropped at the start."""

    name: ClassVar[str] = "PostgreSQL"
    dsn: str  # with the bench's schema first on the search path

    @classmethod
    async def create(cls, dsn: str) -> PostgresStore:
        """A store in a fresh bench schema on the server `dsn` names."""
        import psycopg
        from psycopg.conninfo import make_conninfo

        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")
            await conn.execute(f"CREATE SCHEMA {PG_SCHEMA}")
        return cls(dsn=make_conninfo(dsn, options=f"-c search_path={PG_SCHEMA}"))

    async def drop(self) -> None:
        async with await self._connect() as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")

    async def open_writer(self, side: Side, connections: int) -> Writer:
        pool = await self._pool(connections)
        if side == "optimistic":
            repository = PostgresRepository(pool, DemoOrder)
            await repository.open()
            return OptimisticWriter(repository, pool.close)
        return PostgresLockedWriter(pool)

    async def prepare(self, side: Side, ids: list[str]) -> None:
        tables = self._tables(side)
        if side == "optimistic":
            pool = await self._pool(8)
            repository = PostgresRepository(pool, DemoOrder)
            try:
                await repository.open()  # creates the library's tables
                await self._truncate(tables)
                await seed_repository(repository, ids, 8)
            finally:
                await repository.close()
                await pool.close()
        else:
            async with await self._connect() as conn:
                await conn.execute(_PG_LOCKED_TABLE)
                await conn.execute("TRUNCATE locked_orders")
                async with conn.transaction(), conn.cursor() as cur:
                    await cur.executemany(
                        "INSERT INTO locked_orders VALUES (%s, 1, %s)",
                        [(i, _encode(DemoOrder(id=i, version=1))) for i in ids],
                    )
        async with await self._connect() as conn:
            for table in tables:
                await conn.execute(f"DROP TABLE IF EXISTS {SEED_PREFIX}{table}")
                await conn.execute(f"CREATE TABLE {SEED_PREFIX}{table} AS TABLE {table}")

    async def restore(self, side: Side) -> None:
        tables = self._tables(side)
        await self._truncate(tables)
        async with await self._connect() as conn:
            for table in tables:
                await conn.execute(f"INSERT INTO {table} SELECT * FROM {SEED_PREFIX}{table}")
                await conn.execute(f"VACUUM ANALYZE {table}")

    async def size_bytes(self, side: Side) -> int:
        """`pg_total_relation_size` of the side's tables: rows, indexes, TOAST."""
        async with await self._connect() as conn:
            cur = await conn.execute(
                "SELECT sum(pg_total_relation_size(t::regclass))::bigint FROM unnest(%s::text[]) t",
                (list(self._tables(side)),),
            )
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def stored(self, side: Side, ids: list[str]) -> dict[str, DemoOrder]:
        if side == "optimistic":
            pool = await self._pool(1)
            repository = PostgresRepository(pool, DemoOrder)
            try:
                return await stored_by_repository(repository, ids)
            finally:
                await repository.close()
                await pool.close()
        async with await self._connect() as conn:
            cur = await conn.execute("SELECT state FROM locked_orders WHERE id = ANY(%s)", (ids,))
            return {o.id: o for o in (_decode(row[0]) for row in await cur.fetchall())}

    @staticmethod
    def _tables(side: Side) -> tuple[str, ...]:
        return TABLES if side == "optimistic" else ("locked_orders",)

    async def _connect(self) -> Any:
        import psycopg

        return await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)

    async def _pool(self, connections: int) -> Any:
        """The same pool for both sides: `connections` autocommit connections, all open."""
        from psycopg_pool import AsyncConnectionPool

        pool = AsyncConnectionPool(
            self.dsn,
            min_size=connections,
            max_size=connections,
            kwargs={"autocommit": True},
            open=False,
        )
        await pool.open(wait=True, timeout=60)
        return pool

    async def _truncate(self, tables: tuple[str, ...]) -> None:
        async with await self._connect() as conn:
            await conn.execute(f"TRUNCATE {', '.join(tables)}")


_PG_LOCKED_TABLE = """CREATE TABLE IF NOT EXISTS locked_orders
    (id TEXT PRIMARY KEY, version INTEGER NOT NULL, state BYTEA NOT NULL)"""


class PostgresLockedWriter:
    """Pessimistic PostgreSQL: SELECT ... FOR UPDATE, then UPDATE, in one transaction."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def add(self, order_id: str, item_id: str) -> int:
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT version, state FROM locked_orders WHERE id = %s FOR UPDATE", (order_id,)
            )
            version, state = await cur.fetchone()
            await conn.execute(
                "UPDATE locked_orders SET version = %s, state = %s WHERE id = %s",
                (version + 1, appended(state, item_id), order_id),
            )
        return 1

    async def close(self) -> None:
        await self.pool.close()


Store = SQLiteStore | PostgresStore
