"""Contention: optimistic writes with a three-way MERGE against pessimistic locking.

One hot aggregate; 1, 8, 32 and 128 concurrent writers each add line items to it. The
optimistic side is the library's: `ResilientCommandHandler` + MERGE over `SQLiteRepository`
/ `PostgresRepository` (the version check in the write statement, every version kept). The
pessimistic baseline is the usual hand-written alternative: lock, read, write, commit —
`BEGIN IMMEDIATE` on SQLite, `SELECT ... FOR UPDATE` on PostgreSQL — which never conflicts
but queues every writer behind the lock.

    python benchmarks/bench_contention.py            # SQLite and PostgreSQL (a throwaway
                                                     # server, or CQRS_RESILIENCE_PG_DSN)
    python benchmarks/bench_contention.py --quick    # fewer commands
    python benchmarks/bench_contention.py --sqlite-only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cqrs_resilience import (
    ConflictConfig,
    ConflictResolutionPolicy,
    ExponentialBackoffPolicy,
    HookRegistry,
)
from cqrs_resilience._demo import AddLineItem, AddLineItemHandler, DemoOrder
from cqrs_resilience.stores import PostgresRepository, SQLiteRepository

WRITERS = (1, 8, 32, 128)
POLICY = ExponentialBackoffPolicy(max_retries=20, initial_delay_ms=1, max_delay_ms=50)
CONFIG = ConflictConfig(
    policy=ConflictResolutionPolicy.MERGE, list_identity_key="id", max_attempts=1_000
)


class PatientHandler(AddLineItemHandler):
    """Lets the benchmark's commands ask for as many retries and rounds as they do."""

    max_retries_cap = POLICY.max_retries
    max_attempts_cap = CONFIG.max_attempts


async def optimistic(repository: Any, writers: int, per_writer: int) -> tuple[float, float]:
    """Commands per second and attempts per command through the library."""
    order_id = f"hot-{writers}-{time.time_ns()}"
    await repository.persist(DemoOrder(id=order_id))
    handler = PatientHandler(repository, HookRegistry())

    async def writer(w: int) -> None:
        for n in range(per_writer):
            seen = (await repository.retrieve([order_id]))[0].to_dict()
            item = {"id": f"w{w}-{n}", "qty": 1}
            await handler.handle(
                AddLineItem(
                    order_id=order_id,
                    expected_version=seen["version"],
                    state={**seen, "items": [*seen["items"], item]},
                    retry_policy=POLICY,
                    conflict_config=CONFIG,
                )
            )

    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    elapsed = time.perf_counter() - started
    final = (await repository.retrieve([order_id]))[0]
    commands = writers * per_writer
    assert len(final.items) == commands and final.version == commands + 1, "lost an update"
    return commands / elapsed, handler.attempts / commands


def sqlite_locked(path: str) -> Callable[[str, str], Awaitable[None]]:
    """Pessimistic SQLite: BEGIN IMMEDIATE, read, write, commit, on one connection's thread."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS locked_orders (id TEXT PRIMARY KEY, version INT, state TEXT)"
    )
    lock = asyncio.Lock()  # one connection: its thread runs one transaction at a time

    def add(order_id: str, item_id: str) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT version, state FROM locked_orders WHERE id = ?", (order_id,)
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO locked_orders VALUES (?, 1, ?)", (order_id, json.dumps([]))
                )
                conn.execute("COMMIT")
                return
            version, items = row[0], json.loads(row[1])
            items.append({"id": item_id, "qty": 1})
            conn.execute(
                "UPDATE locked_orders SET version = ?, state = ? WHERE id = ?",
                (version + 1, json.dumps(items), order_id),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def locked_add(order_id: str, item_id: str) -> None:
        async with lock:
            await asyncio.to_thread(add, order_id, item_id)

    return locked_add


def postgres_locked(pool: Any) -> Callable[[str, str], Awaitable[None]]:
    """Pessimistic PostgreSQL: SELECT ... FOR UPDATE, then UPDATE, in one transaction."""

    async def locked_add(order_id: str, item_id: str) -> None:
        async with pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT version, state FROM locked_orders WHERE id = %s FOR UPDATE", (order_id,)
            )
            row = await cur.fetchone()
            if row is None:
                await conn.execute(
                    "INSERT INTO locked_orders VALUES (%s, 1, '[]'::jsonb)", (order_id,)
                )
                return
            version, items = row
            items.append({"id": item_id, "qty": 1})
            await conn.execute(
                "UPDATE locked_orders SET version = %s, state = %s::jsonb WHERE id = %s",
                (version + 1, json.dumps(items), order_id),
            )

    return locked_add


async def pessimistic(
    locked_add: Callable[[str, str], Awaitable[None]], writers: int, per_writer: int
) -> float:
    order_id = f"locked-{writers}-{time.time_ns()}"
    await locked_add(order_id, "create")  # the row exists before the clock starts

    async def writer(w: int) -> None:
        for n in range(per_writer):
            await locked_add(order_id, f"w{w}-{n}")

    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return writers * per_writer / (time.perf_counter() - started)


async def run_store(name: str, commands: int, dsn: str | None, folder: str) -> list[str]:
    rows = []
    pool: Any = None
    if dsn is None:
        repository: Any = SQLiteRepository(os.path.join(folder, "optimistic.sqlite3"), DemoOrder)
        locked_add = sqlite_locked(os.path.join(folder, "pessimistic.sqlite3"))
    else:
        from psycopg_pool import AsyncConnectionPool

        repository = PostgresRepository(dsn, DemoOrder)
        pool = AsyncConnectionPool(dsn, min_size=4, max_size=16, open=False)
        await pool.open()
        async with pool.connection() as conn:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS locked_orders "
                "(id TEXT PRIMARY KEY, version INT, state JSONB)"
            )
        locked_add = postgres_locked(pool)
    await repository.open()
    try:
        for writers in WRITERS:
            per_writer = max(1, commands // writers)
            opt_rate, attempts = await optimistic(repository, writers, per_writer)
            pes_rate = await pessimistic(locked_add, writers, per_writer)
            rows.append(
                f"| {name} | {writers} | {writers * per_writer} | {opt_rate:,.0f} | "
                f"{attempts:.2f} | {pes_rate:,.0f} | {opt_rate / pes_rate:.2f}x |"
            )
            print(rows[-1], flush=True)
    finally:
        await repository.close()
        if pool is not None:
            await pool.close()
    return rows


def postgres_server(skip: bool) -> AbstractContextManager[str | None]:
    if skip:
        return nullcontext(None)
    from tests.pg_server import postgres_dsn

    return postgres_dsn()


async def main(commands: int, sqlite_only: bool) -> None:
    print(
        "| store | writers | commands | optimistic + MERGE (cmd/s) | attempts per command "
        "| pessimistic lock (cmd/s) | optimistic / pessimistic |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        await run_store("SQLite", commands, None, folder)
        if not sqlite_only:
            with postgres_server(False) as dsn:
                await run_store("PostgreSQL", commands, dsn, folder)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer commands per cell")
    parser.add_argument("--sqlite-only", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--commands", type=int, default=256, help="commands per cell")
    args = parser.parse_args()
    asyncio.run(main(32 if args.quick else args.commands, args.sqlite_only))
