"""What the PostgreSQL repository costs the server per command: statements it can plan once,
and round trips per conflict-resolution turn."""

from __future__ import annotations

from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from cqrs_resilience._demo import DemoOrder
from cqrs_resilience.stores import PostgresRepository

pytestmark = pytest.mark.postgres


def one_connection_pool(dsn: str) -> AsyncConnectionPool[Any]:
    """A pool of one connection: the server's per-session statistics are then the store's."""
    return AsyncConnectionPool(dsn, min_size=1, max_size=1, kwargs={"autocommit": True}, open=False)


async def plans_of_reads(pool: AsyncConnectionPool[Any]) -> tuple[int, int]:
    """(custom plans, generic plans) the session made for its prepared reads of versions."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT coalesce(sum(custom_plans), 0), coalesce(sum(generic_plans), 0)"
            " FROM pg_prepared_statements WHERE statement LIKE 'SELECT%aggregate_versions%'"
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def test_reading_one_aggregate_again_and_again_is_planned_once(pg_database):
    """A command's read of its one aggregate reuses the server's plan instead of planning it
    on every read (planning cost more than running it)."""
    async with one_connection_pool(pg_database) as pool:
        async with PostgresRepository(pool, DemoOrder) as store:
            await store.persist(DemoOrder(id="a"))
            for _ in range(30):
                [order] = await store.retrieve(["a"])
                assert order.version == 1
        custom, generic = await plans_of_reads(pool)
    assert generic > 0
    assert custom <= 5  # PostgreSQL's trial plans before it settles on a generic one


async def test_a_read_of_several_aggregates_still_returns_each_once(pg_database):
    """Reading several ids (repeated, missing or not) returns each stored one once, in the
    order asked; reading one id returns it alone."""
    async with PostgresRepository(pg_database, DemoOrder) as store:
        await store.persist(DemoOrder(id="a"))
        await store.persist(DemoOrder(id="b"))
        assert [o.id for o in await store.retrieve(["b", "x", "a", "b"])] == ["b", "a", "b"]
        assert [o.id for o in await store.retrieve(["a", "a"])] == ["a", "a"]
        assert await store.retrieve(["x"]) == []
