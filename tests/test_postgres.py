"""The PostgreSQL repository under several event loops and threads: a pool per loop, opened
on it and closed with it (see the top of `cqrs_resilience/stores/_postgres_pools.py`)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import psycopg
import pytest

from cqrs_resilience import (
    ConflictConfig,
    ConflictResolutionPolicy,
    HookRegistry,
    VersionPrunedError,
)
from cqrs_resilience._demo import AddLineItem, AddLineItemHandler, DemoOrder
from cqrs_resilience.stores import PostgresRepository, StoreConfigurationError
from tests.conftest_stores import cancel_after_steps

pytestmark = pytest.mark.postgres

MERGE = ConflictConfig(
    policy=ConflictResolutionPolicy.MERGE, list_identity_key="id", max_attempts=10
)
BOUND_S = 30.0


def add_item_command(seen: DemoOrder, item: str) -> AddLineItem:
    state = {"id": seen.id, "version": seen.version, "items": [*seen.items, {"id": item}]}
    return AddLineItem(
        order_id=seen.id, expected_version=seen.version, state=state, conflict_config=MERGE
    )


async def contended(store: PostgresRepository[DemoOrder], tag: str) -> list[str]:
    """Commands racing on one order (their conflicts resolved under advisory locks) and
    writes of other orders at once; the items acknowledged."""
    handler = AddLineItemHandler(store, HookRegistry())
    [seen] = await store.retrieve(["hot"])
    items = [f"{tag}-{n}" for n in range(10)]
    await asyncio.wait_for(
        asyncio.gather(
            *(handler.handle(add_item_command(seen, item)) for item in items),
            *(store.persist(DemoOrder(id=f"{tag}-side-{n}")) for n in range(5)),
        ),
        BOUND_S,
    )
    return items


def other_connections(dsn: str) -> int:
    """Connections to this database other than the one asking."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def connections_left(dsn: str) -> int:
    """Connections to this database still there once the server had up to 5 s to end the
    backends of connections clients closed: a server process ends a moment after its client
    hangs up, which no clock of ours can move."""
    deadline = time.monotonic() + 5.0
    while (left := other_connections(dsn)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


async def items_stored(dsn: str) -> list[str]:
    async with PostgresRepository(dsn, DemoOrder) as fresh:
        [order] = await fresh.retrieve(["hot"])
    assert order.version == 1 + len(order.items)
    return [item["id"] for item in order.items]


def test_a_repository_works_from_one_asyncio_run_after_another(pg_database):
    """A repository made once serves several `asyncio.run` calls in turn; each loop's pool is
    closed as its loop ends, so no connection is left behind; every item is stored once."""
    store = PostgresRepository(pg_database, DemoOrder, max_size=4)
    asyncio.run(store.persist(DemoOrder(id="hot")))
    acknowledged = []
    for n in range(3):
        acknowledged += asyncio.run(contended(store, f"run{n}"))
        assert connections_left(pg_database) == 0
    asyncio.run(store.close())
    items = asyncio.run(items_stored(pg_database))
    assert sorted(items) == sorted(acknowledged)


def test_threads_each_with_their_own_event_loop_share_a_repository(pg_database):
    """Three threads, each running its own event loop, write and resolve conflicts through one
    repository at once: none fails, none hangs, every item is stored once; closing it from one
    loop closes the pools of the loops still running."""
    store = PostgresRepository(pg_database, DemoOrder, max_size=4)
    asyncio.run(store.persist(DemoOrder(id="hot")))
    acknowledged: dict[int, list[str]] = {}
    failures: list[BaseException] = []
    done = threading.Barrier(4, timeout=BOUND_S * 2)
    closed = threading.Event()

    def run(n: int) -> None:
        async def main() -> None:
            acknowledged[n] = await contended(store, f"thread{n}")
            await asyncio.to_thread(done.wait)
            await asyncio.to_thread(closed.wait, BOUND_S)  # the loop runs while it is closed

        try:
            asyncio.run(main())
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(3)]
    for thread in threads:
        thread.start()
    done.wait()
    assert other_connections(pg_database) > 0
    asyncio.run(store.close())
    assert connections_left(pg_database) == 0
    closed.set()
    for thread in threads:
        thread.join(BOUND_S)
    assert not any(thread.is_alive() for thread in threads), "a thread's event loop hung"
    assert failures == []
    items = asyncio.run(items_stored(pg_database))
    assert sorted(items) == sorted(i for batch in acknowledged.values() for i in batch)


def test_a_pool_passed_in_serves_only_its_own_event_loop(pg_database):
    """A pool given to the repository is the caller's, bound to the loop it was opened on:
    another loop gets a `StoreConfigurationError` that says what to do, not a hang."""
    from psycopg_pool import AsyncConnectionPool

    results: dict[str, Any] = {}

    async def first_loop() -> None:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            pg_database, open=False, kwargs={"autocommit": True}
        )
        await pool.open()
        store = PostgresRepository(pool, DemoOrder)
        results["created"] = await store.persist(DemoOrder(id="o"))

        def other_loop() -> None:
            try:
                asyncio.run(asyncio.wait_for(store.retrieve(["o"]), BOUND_S))
            except BaseException as exc:
                results["other"] = exc

        thread = threading.Thread(target=other_loop)
        thread.start()
        await asyncio.to_thread(thread.join, BOUND_S)
        results["again"] = await store.retrieve(["o"])
        await store.close()
        await pool.close()

    asyncio.run(first_loop())
    assert isinstance(results["other"], StoreConfigurationError)
    assert "DSN" in str(results["other"])
    assert results["again"] == [results["created"]]


def test_an_event_loop_ends_while_the_pool_is_connecting():
    """`asyncio.run` ends, promptly, while a pool of the repository is still making a
    connection (the server has not answered yet): the pool's workers end when cancelled
    instead of waiting for the next maintenance task for ever."""
    from cqrs_resilience.stores._postgres_pools import _pool_type

    with socket.socket() as silent:  # takes connections and never answers them
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent.settimeout(BOUND_S)
        port = silent.getsockname()[1]
        connecting = threading.Event()

        async def open_and_leave() -> None:
            pool = _pool_type()(f"host=127.0.0.1 port={port} connect_timeout=60", open=False)
            await pool.open()  # starts connecting in the background, and returns
            await asyncio.to_thread(connecting.wait, BOUND_S)

        ended = threading.Event()
        thread = threading.Thread(
            target=lambda: (asyncio.run(open_and_leave()), ended.set()), daemon=True
        )
        thread.start()
        client, _ = silent.accept()  # the pool's connection attempt is under way
        with client:
            connecting.set()
            thread.join(BOUND_S)
        assert ended.is_set(), "asyncio.run never ended: a pool worker swallowed its cancel"


def test_a_pooled_connection_keeps_one_cursor_for_every_statement(pg_database, monkeypatch):
    """A repository given a DSN runs its statements through one cursor per pooled
    connection: the driver sets up the adapters of its parameters once per connection, not
    once per statement."""
    made: list[int] = []
    cursor = psycopg.AsyncConnection.cursor

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        made.append(1)
        return cursor(self, *args, **kwargs)

    monkeypatch.setattr(psycopg.AsyncConnection, "cursor", counted)

    async def main() -> None:
        async with PostgresRepository(pg_database, DemoOrder, min_size=1, max_size=2) as store:
            order = await store.persist(DemoOrder(id="a"))
            for n in range(15):
                [order] = await store.retrieve(["a"])
                order = await store.persist(DemoOrder(id="a", version=order.version, items=[]))
                assert order.version == n + 2

    asyncio.run(main())
    assert 1 <= len(made) <= 2 + 1  # one per connection, and the schema check's own


@pytest.mark.parametrize("steps", range(10))
def test_a_read_and_write_cancelled_at_any_point_leave_the_pool_serving(pg_database, steps):
    """A read and a write cancelled at any await, through a pool of one connection, leave
    it serving the next read and write, which see every write that was acknowledged."""

    async def main() -> None:
        async with PostgresRepository(pg_database, DemoOrder, max_size=1) as store:
            await store.persist(DemoOrder(id="a"))

            async def read_and_write() -> None:
                [order] = await store.retrieve(["a"])
                await store.persist(DemoOrder(id="a", version=order.version, items=[{"id": "x"}]))

            task = asyncio.create_task(read_and_write())
            await cancel_after_steps(task, steps)
            [order] = await asyncio.wait_for(store.retrieve(["a"]), BOUND_S)
            assert order.version in (1, 2)
            stored = await store.persist(DemoOrder(id="a", version=order.version))
            assert stored.version == order.version + 1
            [again] = await store.retrieve(["a"])
            assert again == stored

    asyncio.run(main())


def test_a_pool_not_in_autocommit_gets_its_connections_back_idle(pg_database, caplog):
    """On a pool passed in whose connections are not in autocommit, each read's transaction
    ends with it, also when the read fails: the pool gets every connection back idle, with
    nothing to roll back itself."""
    from psycopg_pool import AsyncConnectionPool

    async def main() -> None:
        async with (
            AsyncConnectionPool(pg_database, min_size=1, max_size=1, open=False) as pool,
            PostgresRepository(pool, DemoOrder, keep_versions=1) as store,
        ):
            await store.persist(DemoOrder(id="a"))
            await store.persist(DemoOrder(id="a", version=1))
            assert [o.version for o in await store.retrieve(["a"])] == [2]
            with pytest.raises(VersionPrunedError):  # raised in the read's transaction
                await store.retrieve_version("a", 1)
            async with pool.connection() as conn:
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

    asyncio.run(main())
    assert not [r for r in caplog.records if "rolling back" in r.getMessage()]
