"""What every side of `bench_peers.py` shares: the line items, the orders' seed, the two
databases (a side's own SQLite file, or its own PostgreSQL schema), and what a side is.

Each side seeds its store once per database (every order with `SEED_ITEMS` line items, at
version 1), through its own write path; the store is then kept as a snapshot and restored
before every run, so every run starts from the same orders.

- SQLite: each side has its own file in the run's folder, WAL and `synchronous=FULL` (every
  side's connections; `check_sqlite_default()` makes sure a connection that does not set it
  gets FULL too); the snapshot is a copy of the checkpointed file.
- PostgreSQL: each side has its own schema (`bench_peers_<side>`, first on its connections'
  search path) and a seed schema beside it; a restore truncates the side's tables, copies the
  seed's rows back and runs `VACUUM ANALYZE`. Every schema is dropped at the start and the end.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import msgspec

SEED_ITEMS = 50
BUSY_TIMEOUT_S = 30.0  # SQLite, every side
PG_POOL_SIZE = 10  # every side's PostgreSQL pool holds up to 10 (our default max_size)
SCHEMA_PREFIX = "bench_peers_"
SEED_SUFFIX = "_seed"


class LineItem(msgspec.Struct, frozen=True):
    """One line item of an order; the peers keep it as a dict of the same fields."""

    id: str
    sku: str
    quantity: int


def seed_items() -> list[LineItem]:
    return [LineItem(id=f"seed-{n}", sku=f"sku-{n}", quantity=1 + n % 3) for n in range(SEED_ITEMS)]


def item_dict(item: LineItem) -> dict[str, Any]:
    return msgspec.structs.asdict(item)


class Stored(msgspec.Struct, frozen=True):
    """An order as a side's store holds it after a run: its version and its items' ids."""

    version: int
    item_ids: list[str]


class Writer(Protocol):
    """One run's way of adding line items, opened before the clock starts."""

    async def add(self, order_id: str, item: LineItem, command_id: str) -> int:
        """Add the item; how many attempts it took. `command_id` means something to ours
        only (the peers take no idempotency key)."""
        ...

    async def close(self) -> None: ...


class Side(Protocol):
    """One contender: how it seeds a store, opens a writer and reads back what it stored."""

    name: str
    """Its name in the table."""
    key: str
    """Its files' and schema's name."""

    async def seed(self, db: Database, ids: Sequence[str]) -> None: ...

    async def open(self, db: Database, writers: int) -> Writer: ...

    async def stored(self, db: Database, ids: Sequence[str]) -> dict[str, Stored]: ...


def check_sqlite_default() -> None:
    """A SQLite connection that sets nothing gets `synchronous=FULL` (ours and eventsourcing
    set nothing; the floor and SQLAlchemy set FULL themselves)."""
    conn = sqlite3.connect(":memory:")
    try:
        (value,) = conn.execute("PRAGMA synchronous").fetchone()
    finally:
        conn.close()
    if value != 2:
        raise SystemExit(f"this SQLite build defaults to synchronous={value}, not FULL (2)")


def sqlite_connect(path: str) -> sqlite3.Connection:
    """A hand-written side's connection: autocommit, WAL, synchronous=FULL, busy timeout."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {round(BUSY_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


class SQLiteDatabase(msgspec.Struct, frozen=True, kw_only=True):
    """Each side's own SQLite file in `folder`."""

    name: ClassVar[str] = "SQLite"
    folder: str

    def path(self, side: Side, *, seed: bool = False) -> str:
        return os.path.join(self.folder, f"{side.key}{SEED_SUFFIX if seed else ''}.sqlite3")

    async def reset(self, side: Side) -> None:
        for seed in (False, True):
            _remove_sqlite(self.path(side, seed=seed))

    async def snapshot(self, side: Side) -> None:
        """Keep the seeded file (its WAL checkpointed into it) as the side's seed."""
        path = self.path(side)
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        shutil.copyfile(path, self.path(side, seed=True))

    async def restore(self, side: Side) -> None:
        path = self.path(side)
        _remove_sqlite(path)
        shutil.copyfile(self.path(side, seed=True), path)


def _remove_sqlite(path: str) -> None:
    for name in (path, path + "-wal", path + "-shm"):
        if os.path.exists(name):
            os.remove(name)


class PostgresDatabase(msgspec.Struct, frozen=True, kw_only=True):
    """Each side's own schema on the server `dsn` names."""

    name: ClassVar[str] = "PostgreSQL"
    dsn: str

    def schema(self, side: Side, *, seed: bool = False) -> str:
        return f"{SCHEMA_PREFIX}{side.key}{SEED_SUFFIX if seed else ''}"

    def dsn_for(self, side: Side) -> str:
        """The server's DSN with the side's schema first on the search path."""
        from psycopg.conninfo import make_conninfo

        return make_conninfo(self.dsn, options=f"-c search_path={self.schema(side)}")

    def params(self) -> dict[str, Any]:
        """The DSN's parts (host, port, dbname, user, password), for sides that take them."""
        from psycopg.conninfo import conninfo_to_dict

        return conninfo_to_dict(self.dsn)

    async def reset(self, side: Side) -> None:
        async with await self._connect() as conn:
            for seed in (False, True):
                await conn.execute(f"DROP SCHEMA IF EXISTS {self.schema(side, seed=seed)} CASCADE")
            await conn.execute(f"CREATE SCHEMA {self.schema(side)}")

    async def drop_all(self) -> None:
        async with await self._connect() as conn:
            cur = await conn.execute(
                "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, %s)", (SCHEMA_PREFIX,)
            )
            for (schema,) in await cur.fetchall():
                await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

    async def snapshot(self, side: Side) -> None:
        """Copy every table of the side's schema into its seed schema."""
        run, seed = self.schema(side), self.schema(side, seed=True)
        async with await self._connect() as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {seed} CASCADE")
            await conn.execute(f"CREATE SCHEMA {seed}")
            for table in await self._tables(conn, run):
                await conn.execute(f"CREATE TABLE {seed}.{table} AS TABLE {run}.{table}")

    async def restore(self, side: Side) -> None:
        run, seed = self.schema(side), self.schema(side, seed=True)
        async with await self._connect() as conn:
            tables = await self._tables(conn, run)
            await conn.execute(f"TRUNCATE {', '.join(f'{run}.{t}' for t in tables)}")
            for table in tables:
                await conn.execute(f"INSERT INTO {run}.{table} SELECT * FROM {seed}.{table}")
                await conn.execute(f"VACUUM ANALYZE {run}.{table}")

    @staticmethod
    async def _tables(conn: Any, schema: str) -> list[str]:
        cur = await conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY tablename", (schema,)
        )
        return [row[0] for row in await cur.fetchall()]

    async def _connect(self) -> Any:
        import psycopg

        return await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)


Database = SQLiteDatabase | PostgresDatabase
