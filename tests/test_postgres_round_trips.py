"""What the PostgreSQL repository costs the server per command: statements it can plan once,
and round trips per conflict-resolution turn."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from cqrs_resilience import ConcurrencyError, TransientError
from cqrs_resilience._demo import DemoOrder
from cqrs_resilience.stores import PostgresRepository
from tests.conftest_stores import cancel_after_steps

pytestmark = pytest.mark.postgres
BOUND_S = 20.0  # a bound on waits that end long before, never a wait for time


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


def round_trips_in(trace: Path) -> int:
    """Round trips in a libpq trace: each ends with the server's ReadyForQuery."""
    return sum("ReadyForQuery" in line for line in trace.read_text().splitlines())


async def test_a_conflict_resolution_turn_costs_two_round_trips(pg_database, tmp_path):
    """Taking a turn (begin, the aggregate's lock) is one round trip and ending it (commit)
    one more: contended commands wait less for the server."""
    trace = tmp_path / "trace"
    async with (
        one_connection_pool(pg_database) as pool,
        PostgresRepository(pool, DemoOrder) as store,
    ):
        await store.persist(DemoOrder(id="a"))
        with trace.open("w") as out:
            async with pool.connection() as conn:
                conn.pgconn.trace(out.fileno())
            async with store.turn("a"):
                assert await advisory_locks(pg_database) == 1
            async with pool.connection() as conn:
                conn.pgconn.untrace()
        assert await advisory_locks(pg_database) == 0
    assert round_trips_in(trace) == 2


async def test_a_turn_on_a_pool_not_in_autocommit_holds_the_lock_until_it_ends(pg_database):
    """On a pool passed in whose connections are not in autocommit, a turn still holds the
    aggregate's lock while it runs and releases it after, and writes in it are committed."""
    async with (
        AsyncConnectionPool(pg_database, min_size=1, max_size=2, open=False) as pool,
        PostgresRepository(pool, DemoOrder) as store,
    ):
        await store.persist(DemoOrder(id="a"))
        async with store.turn("a"):
            assert await advisory_locks(pg_database) == 1
        assert await advisory_locks(pg_database) == 0
        async with store.turn("a"):
            await store.persist(DemoOrder(id="a", version=1, items=[{"id": "x"}]))
    async with PostgresRepository(pg_database, DemoOrder) as fresh:
        [order] = await fresh.retrieve(["a"])
    assert order.version == 2


async def advisory_locks(dsn: str) -> int:
    """Advisory locks held (granted or waited for) in the database."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def assert_no_lock_and_the_next_turn_and_write_work(
    store: PostgresRepository[DemoOrder], dsn: str
) -> None:
    """No advisory lock is left; the store's next turn holds one, and its next write of "a"
    (at version 1) stores version 2 and leaves none."""
    assert await advisory_locks(dsn) == 0
    async with store.turn("a"):
        assert await advisory_locks(dsn) == 1
    stored = await store.persist(DemoOrder(id="a", version=1, items=[{"id": "x"}]))
    assert stored.version == 2
    assert await advisory_locks(dsn) == 0


@pytest.mark.parametrize("steps", range(12))
async def test_a_turn_cancelled_at_any_point_leaves_no_lock_and_a_usable_pool(pg_database, steps):
    """A turn cancelled while it waits for another process's round, at any await, holds no
    lock afterwards, and the repository's next turn and writes work."""
    async with (
        one_connection_pool(pg_database) as pool,
        PostgresRepository(pool, DemoOrder, lock_timeout=5.0) as store,
        PostgresRepository(pg_database, DemoOrder) as other,  # another process's
    ):
        await store.persist(DemoOrder(id="a"))
        async with other.turn("a"):

            async def take() -> None:
                async with store.turn("a"):
                    pytest.fail("took the turn another process holds")

            task = asyncio.create_task(take())
            assert await cancel_after_steps(task, steps)
        await assert_no_lock_and_the_next_turn_and_write_work(store, pg_database)


@pytest.mark.parametrize("steps", range(12))
async def test_a_turn_cancelled_while_held_releases_the_lock(pg_database, steps):
    """A round cancelled at any await while it holds its turn releases the aggregate's lock:
    another process's round takes it next."""
    async with (
        one_connection_pool(pg_database) as pool,
        PostgresRepository(pool, DemoOrder) as store,
        PostgresRepository(pg_database, DemoOrder, lock_timeout=5.0) as other,
    ):
        await store.persist(DemoOrder(id="a"))
        held = asyncio.Event()

        async def hold() -> None:
            async with store.turn("a"):
                held.set()
                await asyncio.Future()  # until cancelled

        task = asyncio.create_task(hold())
        if steps:
            await held.wait()
        assert await cancel_after_steps(task, steps)
        async with other.turn("a"):
            assert await advisory_locks(pg_database) == 1
        async with store.turn("a"):
            pass
        assert await advisory_locks(pg_database) == 0


async def test_a_turn_that_waits_past_lock_timeout_fails_transiently(pg_database):
    """Waiting longer than `lock_timeout` for another process's round fails with
    `TransientError`, and the repository's next turn works once that round ends."""
    async with (
        one_connection_pool(pg_database) as pool,
        PostgresRepository(pool, DemoOrder, lock_timeout=0.05) as store,
        PostgresRepository(pg_database, DemoOrder) as other,
    ):
        await store.persist(DemoOrder(id="a"))
        async with other.turn("a"):
            with pytest.raises(TransientError):
                async with store.turn("a"):
                    pytest.fail("took the turn another process holds")
        async with store.turn("a"):
            assert await advisory_locks(pg_database) == 1
        assert await advisory_locks(pg_database) == 0


def test_turns_on_two_event_loops_never_overlap(pg_database):
    """Two event loops on two threads sharing one repository take an aggregate's turns one
    at a time: the database's lock keeps them apart."""
    store = PostgresRepository(pg_database, DemoOrder, lock_timeout=30.0)
    inside: list[int] = []
    most = [0]
    guard = threading.Lock()

    async def turns() -> None:
        for _ in range(20):
            async with store.turn("a"):
                with guard:
                    inside.append(1)
                    most[0] = max(most[0], len(inside))
                await asyncio.sleep(0)
                with guard:
                    inside.pop()

    threads = [threading.Thread(target=asyncio.run, args=(turns(),)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    asyncio.run(store.close())
    assert most[0] == 1


@pytest.mark.parametrize("steps", range(12))
async def test_an_uncontended_turn_cancelled_at_any_point_leaves_no_lock(pg_database, steps):
    """A turn nobody else wants, cancelled at any await (taking the lock, the round,
    committing), holds no lock afterwards, and the next turn and write work."""
    async with (
        one_connection_pool(pg_database) as pool,
        PostgresRepository(pool, DemoOrder, lock_timeout=5.0) as store,
    ):
        await store.persist(DemoOrder(id="a"))

        async def take() -> None:
            async with store.turn("a"):
                await asyncio.sleep(0)

        task = asyncio.create_task(take())
        await cancel_after_steps(task, steps)
        assert await advisory_locks(pg_database) == 0
        async with store.turn("a"):
            assert await advisory_locks(pg_database) == 1
        assert [o.version for o in await store.retrieve(["a"])] == [1]
        assert await advisory_locks(pg_database) == 0


class RecordingConnection(psycopg.AsyncConnection[Any]):
    """A real connection that notes, in `EVENTS`, when a turn asks for its lock (the only
    pipeline the repository opens) and when a COMMIT comes back, with the task's name."""

    async def commit(self) -> None:
        await super().commit()
        EVENTS.append(("commit answered", current_name()))

    def pipeline(self) -> Any:
        EVENTS.append(("lock asked", current_name()))
        return super().pipeline()


EVENTS: list[tuple[str, str]] = []


def current_name() -> str:
    task = asyncio.current_task()
    return "" if task is None else task.get_name()


def recording_pool(dsn: str) -> AsyncConnectionPool[Any]:
    return AsyncConnectionPool(
        dsn,
        min_size=2,
        max_size=2,
        kwargs={"autocommit": True},
        connection_class=RecordingConnection,
        open=False,
    )


async def two_rounds(store: PostgresRepository[DemoOrder]) -> tuple[asyncio.Task[None], ...]:
    """Tasks "first" and "second", each a round on aggregate "a": the second starts waiting
    for the turn while the first holds it, then the first's block ends (as this returns)."""
    inside, go = asyncio.Event(), asyncio.Event()

    async def a_round(holds: bool) -> None:
        async with store.turn("a"):
            if holds:
                inside.set()
                await go.wait()

    first = asyncio.create_task(a_round(True), name="first")
    await inside.wait()
    second = asyncio.create_task(a_round(False), name="second")
    await asyncio.sleep(0)  # one event-loop step: the second round now waits for the turn
    go.set()
    return first, second


async def test_the_next_round_asks_for_the_lock_while_the_last_one_commits(pg_database):
    """A round of this process waiting for an aggregate asks the database for its lock as
    the round before it ends its block, not a round trip later, when that round's COMMIT is
    back: rounds on a contended aggregate follow each other sooner."""
    EVENTS.clear()
    async with recording_pool(pg_database) as pool, PostgresRepository(pool, DemoOrder) as store:
        await pool.wait()  # both connections made: no round waits for one
        await store.persist(DemoOrder(id="a"))
        EVENTS.clear()
        await asyncio.gather(*await two_rounds(store))
        assert await advisory_locks(pg_database) == 0
    assert EVENTS.index(("lock asked", "second")) < EVENTS.index(("commit answered", "first"))


@pytest.mark.parametrize("cancelled", ["first", "second"])
@pytest.mark.parametrize("steps", range(8))
async def test_rounds_following_each_other_cancelled_at_any_point_leave_no_lock(
    pg_database, cancelled, steps
):
    """Of two rounds of this process following each other on one aggregate, either one
    cancelled at any await leaves no lock behind, the other one's round completes, and the
    next turn and write work."""
    async with (
        AsyncConnectionPool(
            pg_database, min_size=2, max_size=2, kwargs={"autocommit": True}, open=False
        ) as pool,
        PostgresRepository(pool, DemoOrder, lock_timeout=5.0) as store,
    ):
        await pool.wait()
        await store.persist(DemoOrder(id="a"))
        tasks = dict(zip(["first", "second"], await two_rounds(store), strict=True))
        for _ in range(steps):
            await asyncio.sleep(0)  # one event-loop step, not a wait for time
        tasks[cancelled].cancel()
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        survivor = "second" if cancelled == "first" else "first"
        assert results[list(tasks).index(survivor)] is None
        await assert_no_lock_and_the_next_turn_and_write_work(store, pg_database)


async def test_a_round_reads_its_aggregate_in_the_round_trip_that_takes_the_lock(
    pg_database, tmp_path
):
    """A round that reads its aggregate and writes it costs three round trips: the lock with
    the read, the write, the COMMIT (the read needs none of its own)."""
    trace = tmp_path / "trace"
    async with (
        AsyncConnectionPool(
            pg_database, min_size=2, max_size=2, kwargs={"autocommit": True}, open=False
        ) as pool,
        PostgresRepository(pool, DemoOrder) as store,
    ):
        await pool.wait()
        await store.persist(DemoOrder(id="a"))
        with trace.open("w") as out:
            conns = [await pool.getconn() for _ in range(2)]
            for conn in conns:
                conn.pgconn.trace(out.fileno())
                await pool.putconn(conn)
            async with store.turn("a"):
                [order] = await store.retrieve(["a"])
                await store.persist(DemoOrder(id="a", version=order.version, items=[{"id": "x"}]))
            conns = [await pool.getconn() for _ in range(2)]
            for conn in conns:
                conn.pgconn.untrace()
                await pool.putconn(conn)
        [order] = await store.retrieve(["a"])
    assert order.version == 2
    assert round_trips_in(trace) == 3


async def test_a_read_in_a_round_after_its_write_sees_the_write(pg_database):
    """In a round, a read of the aggregate after the round wrote it returns what was written,
    not the state the round found when it took the lock."""
    async with PostgresRepository(pg_database, DemoOrder) as store:
        await store.persist(DemoOrder(id="a"))
        async with store.turn("a"):
            await store.persist(DemoOrder(id="a", version=1, items=[{"id": "x"}]))
            [order] = await store.retrieve(["a"])
        assert (order.version, order.items) == (2, [{"id": "x"}])


async def test_a_task_started_in_a_round_reads_afresh_once_the_round_ended(pg_database):
    """A task started in a round that reads the aggregate after the round ended (and another
    writer wrote it) reads what is stored then, not what the round found."""
    async with (
        PostgresRepository(pg_database, DemoOrder) as store,
        PostgresRepository(pg_database, DemoOrder) as other,
    ):
        await store.persist(DemoOrder(id="a"))
        ended = asyncio.Event()

        async def read_later() -> DemoOrder:
            await ended.wait()
            [order] = await store.retrieve(["a"])
            return order

        async with store.turn("a"):
            late = asyncio.create_task(read_later())
        await other.persist(DemoOrder(id="a", version=1, items=[{"id": "y"}]))
        ended.set()
        order = await late
    assert (order.version, order.items) == (2, [{"id": "y"}])


ISOLATIONS = ["read committed", "repeatable read", "serializable"]


def rounds_on_two_threads(
    dsn: str, store_here: Callable[[], AbstractAsyncContextManager[PostgresRepository[DemoOrder]]]
) -> DemoOrder:
    """Two threads, each on its event loop, each making 15 rounds on aggregate "a" through
    the store `async with store_here()` gives it there: read in the round, add an item, write
    at the version read. Every write must succeed; the order as stored at the end."""
    asyncio.run(_created(dsn))
    failures: list[BaseException] = []

    async def rounds(tag: str) -> None:
        async with store_here() as store:
            for n in range(15):
                async with store.turn("a"):
                    [order] = await store.retrieve(["a"])
                    items = [*order.items, {"id": f"{tag}{n}"}]
                    await store.persist(DemoOrder(id="a", version=order.version, items=items))

    def run(tag: str) -> None:
        try:
            asyncio.run(rounds(tag))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(tag,)) for tag in "xy"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    order = asyncio.run(_stored(dsn))
    assert order.version == 31
    assert sorted(item["id"] for item in order.items) == sorted(
        f"{tag}{n}" for tag in "xy" for n in range(15)
    )
    return order


async def _created(dsn: str) -> None:
    async with PostgresRepository(dsn, DemoOrder) as store:
        await store.persist(DemoOrder(id="a"))


async def _stored(dsn: str) -> DemoOrder:
    async with PostgresRepository(dsn, DemoOrder) as store:
        [order] = await store.retrieve(["a"])
    return order


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_rounds_on_two_event_loops_each_read_the_others_writes(pg_database, isolation):
    """Rounds on one aggregate from two event loops on two threads, sharing one repository,
    each read in the round what the other loop's last round wrote: every write succeeds at
    the version it read. So too on a server whose transactions default to a stricter
    isolation, where a round's snapshot could otherwise date from before it waited for the
    lock and miss what the lock's last holder wrote."""
    level = isolation.replace(" ", "\\ ")  # libpq's options take a space escaped
    dsn = make_conninfo(pg_database, options=f"-c default_transaction_isolation={level}")
    store = PostgresRepository(dsn, DemoOrder, lock_timeout=30.0)

    @contextlib.asynccontextmanager
    async def shared() -> AsyncIterator[PostgresRepository[DemoOrder]]:
        yield store  # closed once, after both threads

    rounds_on_two_threads(dsn, shared)
    asyncio.run(store.close())


@pytest.mark.parametrize("isolation", ISOLATIONS[1:])
def test_rounds_on_pools_not_in_autocommit_read_the_others_writes(pg_database, isolation):
    """Each thread's repository on a pool of its own that is not in autocommit and begins its
    transactions at a stricter isolation: a round still reads what the last round wrote."""
    level = psycopg.IsolationLevel[isolation.upper().replace(" ", "_")]

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.set_isolation_level(level)

    @contextlib.asynccontextmanager
    async def own_pool() -> AsyncIterator[PostgresRepository[DemoOrder]]:
        pool = AsyncConnectionPool(pg_database, min_size=2, configure=configure, open=False)
        async with pool, PostgresRepository(pool, DemoOrder, lock_timeout=30.0) as store:
            yield store

    rounds_on_two_threads(pg_database, own_pool)


@pytest.mark.parametrize("steps", range(10))
async def test_a_round_reading_and_writing_cancelled_at_any_point_leaves_the_next_one_fresh(
    pg_database, steps
):
    """A round cancelled at any await while it reads and writes its aggregate leaves no lock,
    and the next round reads what is stored, whether the cancelled write landed or not."""
    async with PostgresRepository(pg_database, DemoOrder, max_size=2, lock_timeout=5.0) as store:
        await store.persist(DemoOrder(id="a"))

        async def a_round() -> None:
            async with store.turn("a"):
                [order] = await store.retrieve(["a"])
                await store.persist(DemoOrder(id="a", version=order.version, items=[{"id": "x"}]))

        task = asyncio.create_task(a_round())
        await cancel_after_steps(task, steps)
        assert await advisory_locks(pg_database) == 0
        async with PostgresRepository(pg_database, DemoOrder) as other:
            [stored] = await other.retrieve(["a"])
        async with store.turn("a"):
            [order] = await store.retrieve(["a"])
            assert order == stored
            again = await store.persist(DemoOrder(id="a", version=order.version))
        assert again.version == stored.version + 1
        assert await advisory_locks(pg_database) == 0


async def test_a_task_started_in_a_round_writes_as_a_first_attempt_once_the_round_ended(
    pg_database,
):
    """A task started in a round that writes the aggregate after the round ended, while
    another process's round holds it, gets a conflict instead of writing past that round."""
    async with (
        PostgresRepository(pg_database, DemoOrder) as store,
        PostgresRepository(pg_database, DemoOrder, lock_timeout=5.0) as other,
    ):
        await store.persist(DemoOrder(id="a"))
        ended = asyncio.Event()

        async def write_later() -> DemoOrder:
            await ended.wait()
            return await store.persist(DemoOrder(id="a", version=1, items=[{"id": "late"}]))

        async with store.turn("a"):
            late = asyncio.create_task(write_later())
        async with other.turn("a"):
            ended.set()
            with pytest.raises(ConcurrencyError):
                await late
        [order] = await store.retrieve(["a"])
    assert order.version == 1


def _hold_a_round(dsn: str, ready: Any) -> None:
    """In a child process: in a round on "a", write it (the write is acknowledged), say so,
    and hang, holding the round and its lock, until killed."""

    async def main() -> None:
        async with PostgresRepository(dsn, DemoOrder) as store, store.turn("a"):
            [order] = await store.retrieve(["a"])
            items = [*order.items, {"id": "before the kill"}]
            await store.persist(DemoOrder(id="a", version=order.version, items=items))
            ready.set()
            await asyncio.Event().wait()

    asyncio.run(main())


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
async def test_a_process_killed_in_a_round_leaves_its_write_and_frees_the_aggregate(pg_database):
    """SIGKILL a process while its round holds an aggregate, after its write was acknowledged:
    the server drops the dead process's lock, and this process's round takes it, reads that
    write (not a state from before it) and writes after it; no lock is left."""
    async with PostgresRepository(pg_database, DemoOrder, lock_timeout=BOUND_S) as store:
        await store.persist(DemoOrder(id="a"))
        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        child = context.Process(target=_hold_a_round, args=(pg_database, ready), daemon=True)
        child.start()
        assert await asyncio.to_thread(ready.wait, BOUND_S), "the child never wrote in a round"
        assert await advisory_locks(pg_database) == 1
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        await asyncio.to_thread(child.join, BOUND_S)

        async def a_round() -> DemoOrder:
            async with store.turn("a"):
                [order] = await store.retrieve(["a"])
                items = [*order.items, {"id": "after the kill"}]
                return await store.persist(DemoOrder(id="a", version=order.version, items=items))

        written = await asyncio.wait_for(a_round(), BOUND_S)
        assert written.version == 3
        assert written.items == [{"id": "before the kill"}, {"id": "after the kill"}]
        assert await advisory_locks(pg_database) == 0
