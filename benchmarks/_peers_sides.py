"""The sides of `bench_peers.py`: ours, the floor, SQLAlchemy + tenacity, eventsourcing.

Every side runs the same command, "add a line item to order X": read the order, append the
item, write it at the version read; a write that finds another version stored runs the
command again. What each side is:

- **ours**: `ResilientCommandHandler` with default settings over `SQLiteRepository` /
  `PostgresRepository` (default settings), the delta shape of `examples/orders_service.py`:
  `process` reads, appends and persists; a conflict runs it again (`RUN_AGAIN`: nothing
  fetched, merged or rebuilt). Every write is recorded under the command's id (a resend is
  not applied twice), the version kept, the state checked to read back.
- **floor**: the raw driver, hand-written: read the row, `UPDATE ... SET state, version =
  version + 1 WHERE id AND version`, again on a miss; msgspec JSON; no idempotency, no
  history. SQLite: stdlib `sqlite3` on one thread of its own, each attempt one job there (the
  read, the update: one thread hop, the fewest). The fastest of three tried, on the hot row
  with 8 writers: 2,064 commands/s, against 1,702 for a connection and a thread per writer
  (SQLite takes one writer at a time anyway, and they conflicted) and 684 for aiosqlite (a
  thread hop per call); with one writer, 2,098 / 2,134 / 1,503. PostgreSQL: psycopg 3 async
  and its pool, one checkout per attempt, autocommit.
- **SQLAlchemy**: 2.x async ORM (aiosqlite, psycopg), a JSON column of items and
  `version_id_col`, each attempt a session (`session.get`, assign, commit); tenacity retries
  `StaleDataError`, with no wait, as the floor does.
- **eventsourcing**: an `Aggregate` whose `add_item` is an `@event`, an `Application` whose
  `add_item` gets, calls, saves, retried on `IntegrityError` by the library's own
  `eventsourcing.utils.retry`; its persistence modules `eventsourcing.sqlite` /
  `eventsourcing.postgres`. The library is synchronous: each writer task hands its command
  to a thread of its own. Modes: `cache` (an aggregate cache, fast-forwarded on each get),
  `snapshots` (a snapshot every 10 events), `plain` (every get replays the stream: Zipf rows
  only, see `es_modes`); on PostgreSQL also `cache, db functions` (events inserted by its
  plpgsql function, one round trip).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import sqlite3
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

import msgspec
import tenacity
from _one_thread import OneThread, until_applied
from _peers_common import (
    PG_POOL_SIZE,
    Database,
    LineItem,
    PostgresDatabase,
    SQLiteDatabase,
    Stored,
    Writer,
    item_dict,
    seed_items,
    sqlite_connect,
)
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate as EsAggregate
from eventsourcing.domain import event as es_event
from eventsourcing.persistence import IntegrityError
from eventsourcing.utils import retry
from sqlalchemy import JSON, Integer, String, event, insert, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.orm.exc import StaleDataError

from cqrs_resilience import (
    Aggregate,
    Command,
    CommandResponse,
    ConflictConfig,
    ConflictResolutionPolicy,
    ResilientCommandHandler,
)
from cqrs_resilience.stores import PostgresRepository, SQLiteRepository

T = TypeVar("T")
MOST_ATTEMPTS = 1_000  # the peers' and the floor's retry limit: no command may fail
SEED_BATCH = 500

# --- ours -----------------------------------------------------------------------------------


class Order(Aggregate):
    status: str = "open"
    items: list[LineItem] = msgspec.field(default_factory=list)


class AddItem(Command[str]):
    """A delta command: the item alone, added to the order as the handler finds it."""

    order_id: str
    item: LineItem


# The attempts of the command the current task is sending: [process calls so far].
_attempts: contextvars.ContextVar[list[int]] = contextvars.ContextVar("attempts")


class AddItemHandler(ResilientCommandHandler[str]):
    """Reads the order, appends the item, writes at the version read; on a conflict, runs
    again on the order as it is then."""

    conflict_config = ConflictConfig(policy=ConflictResolutionPolicy.RUN_AGAIN)

    async def process(self, command: AddItem) -> CommandResponse[str]:
        _attempts.get()[0] += 1
        order = (await self.dispatcher.retrieve([command.order_id]))[0]
        items = [*order.items, command.item]
        stored = await self.dispatcher.persist(msgspec.structs.replace(order, items=items))
        return CommandResponse(result=f"{stored.id}@v{stored.version}")


class OursWriter:
    def __init__(self, repository: Any) -> None:
        self.repository = repository
        self.handler = AddItemHandler(repository)

    async def add(self, order_id: str, item: LineItem, command_id: str) -> int:
        attempts = [0]
        token = _attempts.set(attempts)
        try:
            await self.handler.handle(AddItem(order_id=order_id, item=item, command_id=command_id))
        finally:
            _attempts.reset(token)
        return attempts[0]

    async def close(self) -> None:
        await self.repository.close()


class Ours:
    name = "ours"
    key = "ours"

    async def seed(self, db: Database, ids: Sequence[str]) -> None:
        repository = await self._repository(db)
        items = seed_items()
        try:
            for start in range(0, len(ids), SEED_BATCH):
                # Concurrent persists: SQLite commits them together, PostgreSQL spreads them.
                batch = ids[start : start + SEED_BATCH]
                await asyncio.gather(*(repository.persist(Order(id=i, items=items)) for i in batch))
        finally:
            await repository.close()

    async def open(self, db: Database, writers: int) -> Writer:
        return OursWriter(await self._repository(db))

    async def stored(self, db: Database, ids: Sequence[str]) -> dict[str, Stored]:
        repository = await self._repository(db)
        try:
            orders = await repository.retrieve(list(ids))
        finally:
            await repository.close()
        return {o.id: Stored(version=o.version, item_ids=[i.id for i in o.items]) for o in orders}

    @staticmethod
    async def _repository(db: Database) -> Any:
        repository: Any
        if isinstance(db, SQLiteDatabase):
            repository = SQLiteRepository(db.path(Ours()), Order)
        else:
            repository = PostgresRepository(db.dsn_for(Ours()), Order)
        await repository.open()
        return repository


# --- the floor ----------------------------------------------------------------------------------


class FloorOrder(msgspec.Struct):
    """The floor's state column: the order without its id and version (columns of their own)."""

    status: str = "open"
    items: list[LineItem] = msgspec.field(default_factory=list)


_floor_encode = msgspec.json.Encoder().encode
_floor_decode = msgspec.json.Decoder(FloorOrder).decode
_FLOOR_TABLE = """CREATE TABLE IF NOT EXISTS orders
    (id TEXT PRIMARY KEY, version INTEGER NOT NULL, state {blob} NOT NULL){options}"""


def appended(state: bytes, item: LineItem) -> bytes:
    order = _floor_decode(state)
    order.items.append(item)
    return _floor_encode(order)


class FloorSQLiteWriter:
    """One connection, used on one thread; each attempt one job there."""

    def __init__(self, path: str) -> None:
        self._thread = OneThread(functools.partial(sqlite_connect, path), "floor-sqlite")

    async def open(self) -> None:
        await self._thread.open()

    async def add(self, order_id: str, item: LineItem, command_id: str) -> int:
        attempt = functools.partial(self._thread.run, _floor_attempt, order_id, item)
        return await until_applied(attempt, "floor", order_id, MOST_ATTEMPTS)

    async def close(self) -> None:
        await self._thread.close()


def _floor_attempt(conn: sqlite3.Connection, order_id: str, item: LineItem) -> bool:
    version, state = conn.execute(
        "SELECT version, state FROM orders WHERE id = ?", (order_id,)
    ).fetchone()
    updated = conn.execute(
        "UPDATE orders SET state = ?, version = version + 1 WHERE id = ? AND version = ?",
        (appended(state, item), order_id, version),
    )
    return bool(updated.rowcount == 1)


class FloorPostgresWriter:
    """psycopg's async pool; each attempt one checkout, a read and an update (autocommit)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def add(self, order_id: str, item: LineItem, command_id: str) -> int:
        attempt = functools.partial(self._attempt, order_id, item)
        return await until_applied(attempt, "floor", order_id, MOST_ATTEMPTS)

    async def _attempt(self, order_id: str, item: LineItem) -> bool:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT version, state FROM orders WHERE id = %s", (order_id,))
            version, state = await cur.fetchone()
            cur = await conn.execute(
                "UPDATE orders SET state = %s, version = version + 1"
                " WHERE id = %s AND version = %s",
                (appended(state, item), order_id, version),
            )
            return bool(cur.rowcount == 1)

    async def close(self) -> None:
        await self.pool.close()


async def pg_pool(dsn: str, size: int) -> Any:
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(
        dsn, min_size=size, max_size=size, kwargs={"autocommit": True}, open=False
    )
    await pool.open(wait=True, timeout=60)
    return pool


class Floor:
    name = "floor"
    key = "floor"

    async def seed(self, db: Database, ids: Sequence[str]) -> None:
        state = _floor_encode(FloorOrder(items=seed_items()))
        rows = [(i, state) for i in ids]
        if isinstance(db, SQLiteDatabase):
            conn = sqlite_connect(db.path(self))
            try:
                conn.execute(_FLOOR_TABLE.format(blob="BLOB", options=" WITHOUT ROWID"))
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO orders VALUES (?, 1, ?)", rows)
                conn.execute("COMMIT")
            finally:
                conn.close()
            return
        async with await pg_connect(db, self) as conn:
            await conn.execute(_FLOOR_TABLE.format(blob="BYTEA", options=""))
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany("INSERT INTO orders VALUES (%s, 1, %s)", rows)

    async def open(self, db: Database, writers: int) -> Writer:
        if isinstance(db, SQLiteDatabase):
            writer = FloorSQLiteWriter(db.path(self))
            await writer.open()
            return writer
        return FloorPostgresWriter(await pg_pool(db.dsn_for(self), PG_POOL_SIZE))

    async def stored(self, db: Database, ids: Sequence[str]) -> dict[str, Stored]:
        if isinstance(db, SQLiteDatabase):
            conn = sqlite_connect(db.path(self))
            try:
                marks = ", ".join("?" * len(ids))
                rows = conn.execute(
                    f"SELECT id, version, state FROM orders WHERE id IN ({marks})", list(ids)
                ).fetchall()
            finally:
                conn.close()
        else:
            async with await pg_connect(db, self) as conn:
                cur = await conn.execute(
                    "SELECT id, version, state FROM orders WHERE id = ANY(%s)", (list(ids),)
                )
                rows = await cur.fetchall()
        return {
            i: Stored(version=v, item_ids=[item.id for item in _floor_decode(s).items])
            for i, v, s in rows
        }


async def pg_connect(db: PostgresDatabase, side: Any) -> Any:
    import psycopg

    return await psycopg.AsyncConnection.connect(db.dsn_for(side), autocommit=True)


# --- SQLAlchemy 2 async ORM + tenacity -------------------------------------------------------


class Base(DeclarativeBase):
    pass


class OrderRow(Base):
    """The order as SQLAlchemy maps it: its items a JSON column, its version the mapper's."""

    __tablename__ = "orders"

    id: Mapped[str] = mapped_column(String, primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String, nullable=False)
    items: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)

    __mapper_args__ = {"version_id_col": version_id}  # noqa: RUF012 (as SQLAlchemy documents it)


class SQLAlchemyWriter:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        # Decorated once, as a module's function would be: retry a lost version race at once.
        self._add = tenacity.retry(
            retry=tenacity.retry_if_exception_type(StaleDataError),
            stop=tenacity.stop_after_attempt(MOST_ATTEMPTS),
            reraise=True,
        )(self._attempt)

    async def add(self, order_id: str, item: LineItem, command_id: str) -> int:
        attempts = [0]
        await self._add(order_id, item_dict(item), attempts)
        return attempts[0]

    async def _attempt(self, order_id: str, item: dict[str, Any], attempts: list[int]) -> None:
        attempts[0] += 1
        async with self.sessions() as session, session.begin():
            order = await session.get(OrderRow, order_id)
            assert order is not None
            order.items = [*order.items, item]

    async def close(self) -> None:
        await self.engine.dispose()


class SQLAlchemySide:
    name = "SQLAlchemy + tenacity"
    key = "sqlalchemy"

    async def seed(self, db: Database, ids: Sequence[str]) -> None:
        engine = self._engine(db)
        items = [item_dict(i) for i in seed_items()]
        try:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
                rows = [{"id": i, "version_id": 1, "status": "open", "items": items} for i in ids]
                for start in range(0, len(rows), SEED_BATCH):
                    await conn.execute(insert(OrderRow), rows[start : start + SEED_BATCH])
        finally:
            await engine.dispose()

    async def open(self, db: Database, writers: int) -> Writer:
        return SQLAlchemyWriter(self._engine(db))

    async def stored(self, db: Database, ids: Sequence[str]) -> dict[str, Stored]:
        engine = self._engine(db)
        try:
            async with engine.connect() as conn:
                query = select(OrderRow.id, OrderRow.version_id, OrderRow.items)
                result = await conn.execute(query.where(OrderRow.id.in_(list(ids))))
                rows = result.all()
        finally:
            await engine.dispose()
        return {
            i: Stored(version=v, item_ids=[item["id"] for item in items]) for i, v, items in rows
        }

    def _engine(self, db: Database) -> Any:
        if isinstance(db, SQLiteDatabase):
            engine = create_async_engine(f"sqlite+aiosqlite:///{db.path(self)}")

            # SQLAlchemy's documented way to set pragmas: on each new DBAPI connection.
            @event.listens_for(engine.sync_engine, "connect")
            def pragmas(dbapi_connection: Any, connection_record: Any) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute(f"PRAGMA busy_timeout = {30_000}")
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = FULL")
                cursor.close()

            return engine
        params = db.params()
        url = URL.create(
            "postgresql+psycopg",
            username=params.get("user"),
            password=params.get("password"),
            host=params.get("host"),
            port=int(params["port"]) if params.get("port") else None,
            database=params.get("dbname"),
        )
        return create_async_engine(
            url,
            pool_size=PG_POOL_SIZE,
            connect_args={"options": f"-c search_path={db.schema(self)}"},
        )


# --- eventsourcing -------------------------------------------------------------------------------

ES_MODES: dict[str, dict[str, str]] = {
    "cache": {"AGGREGATE_CACHE_MAXSIZE": "100000"},
    "snapshots": {},
    "plain": {},
    "cache, db functions": {
        "AGGREGATE_CACHE_MAXSIZE": "100000",
        "POSTGRES_ENABLE_DB_FUNCTIONS": "y",
    },
}
SNAPSHOT_EVERY = 10
_ORDER_IDS = uuid.UUID("5b0bf1d6-0c2e-4c8e-9a53-6f0f0d1b4d21")


def es_order_id(order_id: str) -> uuid.UUID:
    return uuid.uuid5(_ORDER_IDS, order_id)


class EsOrder(EsAggregate):
    """The order as an event-sourced aggregate: created with its items, then items added."""

    @es_event("Created")
    def __init__(self, order_id: str, items: list[dict[str, Any]]) -> None:
        self.order_id = order_id
        self.status = "open"
        self.items = items

    @staticmethod
    def create_id(order_id: str, items: list[dict[str, Any]]) -> uuid.UUID:
        return es_order_id(order_id)

    @es_event("ItemAdded")
    def add_item(self, item: dict[str, Any]) -> None:
        self.items.append(item)


class Orders(Application[uuid.UUID]):
    def add_item(self, order_id: str, item: dict[str, Any], attempts: list[int]) -> None:
        attempts[0] += 1
        order: EsOrder = self.repository.get(es_order_id(order_id))
        order.add_item(item)
        self.save(order)

    add_item_retrying = retry(IntegrityError, max_attempts=MOST_ATTEMPTS)(add_item)


class SnapshottingOrders(Orders):
    snapshotting_intervals: ClassVar[dict[Any, int]] = {EsOrder: SNAPSHOT_EVERY}


class EventsourcingWriter:
    def __init__(self, app: Any, writers: int) -> None:
        self.app = app
        self._executor = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="es")

    async def add(self, order_id: str, item: LineItem, command_id: str) -> int:
        attempts = [0]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._executor, self.app.add_item_retrying, order_id, item_dict(item), attempts
        )
        return attempts[0]

    async def close(self) -> None:
        self._executor.shutdown()
        await asyncio.to_thread(self.app.close)


class EventsourcingSide:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.name = f"eventsourcing ({mode})"
        self.key = "es_" + "".join(c if c.isalnum() else "_" for c in mode).replace("__", "_")

    async def seed(self, db: Database, ids: Sequence[str]) -> None:
        app = await asyncio.to_thread(self._app, db)
        items = [item_dict(i) for i in seed_items()]
        try:
            for start in range(0, len(ids), SEED_BATCH):
                orders = [EsOrder(order_id=i, items=items) for i in ids[start : start + SEED_BATCH]]
                await asyncio.to_thread(app.save, *orders)
        finally:
            await asyncio.to_thread(app.close)

    async def open(self, db: Database, writers: int) -> Writer:
        return EventsourcingWriter(await asyncio.to_thread(self._app, db), writers)

    async def stored(self, db: Database, ids: Sequence[str]) -> dict[str, Stored]:
        def read() -> dict[str, Stored]:
            app = self._app(db)
            try:
                found = {}
                for order_id in ids:
                    order = app.repository.get(es_order_id(order_id))
                    found[order_id] = Stored(
                        version=order.version, item_ids=[i["id"] for i in order.items]
                    )
                return found
            finally:
                app.close()

        return await asyncio.to_thread(read)

    def _app(self, db: Database) -> Any:
        env = dict(ES_MODES[self.mode])
        if isinstance(db, SQLiteDatabase):
            env.update(PERSISTENCE_MODULE="eventsourcing.sqlite", SQLITE_DBNAME=db.path(self))
            env["SQLITE_LOCK_TIMEOUT"] = "30"
        else:
            params = db.params()
            env.update(
                PERSISTENCE_MODULE="eventsourcing.postgres",
                POSTGRES_DBNAME=params.get("dbname", "postgres"),
                POSTGRES_HOST=params.get("host", "127.0.0.1"),
                POSTGRES_PORT=str(params.get("port", "5432")),
                POSTGRES_USER=params.get("user", "postgres"),
                POSTGRES_PASSWORD=params.get("password", ""),
                POSTGRES_SCHEMA=db.schema(self),
                POSTGRES_POOL_SIZE=str(PG_POOL_SIZE),
            )
        app_class = SnapshottingOrders if self.mode == "snapshots" else Orders
        return app_class(env=env)


def es_modes(db: Database, load: str | None = None) -> list[str]:
    """The modes eventsourcing runs in on `db`, for a row of `load` ("hot", "zipf"; None:
    every row). `plain` replays each order's whole stream on every get: on the hot rows, where
    a stream grows to a thousand events, that is an order of magnitude behind the others
    (71 commands/s on SQLite with one writer, against 569 cached), so it runs on Zipf only."""
    modes = ["cache", "snapshots"]
    if load in (None, "zipf"):
        modes.append("plain")
    if isinstance(db, PostgresDatabase):
        modes.append("cache, db functions")
    return modes
