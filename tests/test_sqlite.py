"""The SQLite repository under cancellation, several event loops and threads, and killed
processes: what the rules at the top of `cqrs_resilience/stores/_sqlite.py` promise."""

from __future__ import annotations

import asyncio
import itertools
import math
import multiprocessing
import os
import signal
import threading
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from cqrs_resilience import (
    CONFLICT_DETECTED,
    ConfigurationError,
    FakeClock,
    HookRegistry,
    timeout,
)
from cqrs_resilience._demo import AddLineItemHandler, DemoOrder
from cqrs_resilience.stores import SQLiteRepository
from tests.conftest_stores import writer_thread_blocked
from tests.sqlite_writers import (
    add_item,
    add_item_command,
    another_process,
    items_of,
    lose_a_resolution,
    take_the_write_lock,
    with_item,
)

BOUND_S = 20.0  # no wait in these tests may take longer: a hang fails instead of blocking CI


def bounded(call: Awaitable[Any]) -> Awaitable[Any]:
    return asyncio.wait_for(call, BOUND_S)


async def reopened_items(path: Path, order_id: str) -> list[str]:
    async with SQLiteRepository(path, DemoOrder) as fresh:
        [order] = await fresh.retrieve([order_id])
        assert order.version == 1 + len(order.items)
        return items_of(order)


# --- case 1: a cancelled resolution never leaves a transaction open ---------------------------


@pytest.mark.parametrize("cancel_after", range(8))
@pytest.mark.parametrize("how", ["cancel", "timeout"])
async def test_a_resolution_cancelled_while_another_process_holds_the_lock_loses_nothing(
    tmp_path, how, cancel_after
):
    """A conflict resolution on a contested aggregate, cancelled (by `timeout()` or a task
    cancel, at any of its await points) while another process holds the file's write lock:
    every write acknowledged afterwards is stored, seen by other repositories, and still
    there after the repository is closed and opened again."""
    path = tmp_path / "db"
    clock = FakeClock(autojump=False)
    hooks = HookRegistry()
    async with (
        SQLiteRepository(path, DemoOrder, busy_timeout=BOUND_S) as store,
        SQLiteRepository(path, DemoOrder) as other,
    ):
        seen = await store.persist(DemoOrder(id="o"))
        await lose_a_resolution(store, path, "o")
        [seen] = await store.retrieve(["o"])
        await add_item(other, "o", "before")  # the command below is stale: it conflicts
        handler = AddLineItemHandler(store, hooks)
        with another_process(path) as elsewhere:
            # Once the command conflicted, before its resolution starts, the lock is taken.
            hooks.subscribe(CONFLICT_DETECTED, lambda context: take_the_write_lock(elsewhere))
            handle = handler.handle
            if how == "timeout":
                handle = timeout(60, clock=clock)(handler.handle)
            task = asyncio.ensure_future(handle(add_item_command(seen, "cancelled")))
            for _ in range(cancel_after + (how == "timeout")):  # a timeout arms on its start
                await asyncio.sleep(0)
            if how == "timeout":
                clock.advance(60)
            else:
                task.cancel()
            with pytest.raises((asyncio.CancelledError, TimeoutError)):
                await bounded(task)
        acknowledged = [await bounded(add_item(store, "o", f"after-{n}")) for n in range(3)]
        assert all(b.version == a.version + 1 for a, b in itertools.pairwise(acknowledged))
        [mine] = await store.retrieve(["o"])
        [theirs] = await other.retrieve(["o"])
        assert mine == theirs == acknowledged[-1]
        assert (await bounded(add_item(other, "o", "from-other"))).version == mine.version + 1
    items = await reopened_items(path, "o")
    for n in range(3):
        assert items.count(f"after-{n}") == 1
    assert items.count("from-other") == 1
    assert items.count("cancelled") <= 1


# --- case 2: any number of event loops and threads ---------------------------------------------


async def contended_round(store: SQLiteRepository[DemoOrder], tag: str) -> list[str]:
    """Commands racing on one order (their conflicts resolved) and writes of other orders at
    the same time; the items acknowledged."""
    handler = AddLineItemHandler(store, HookRegistry())
    [seen] = await store.retrieve(["hot"])
    items = [f"{tag}-{n}" for n in range(12)]
    await bounded(
        asyncio.gather(
            *(handler.handle(add_item_command(seen, item)) for item in items),
            *(store.persist(DemoOrder(id=f"{tag}-side-{n}")) for n in range(6)),
        )
    )
    return items


def test_a_repository_works_from_one_asyncio_run_after_another(tmp_path):
    """A repository made once is used by several `asyncio.run` calls in turn (a script, a
    test suite, a framework running a loop per request): each loop's conflicts, resolutions
    and writes work, and every item is stored once."""
    path = tmp_path / "db"
    store = SQLiteRepository(path, DemoOrder)
    asyncio.run(store.persist(DemoOrder(id="hot")))
    acknowledged = []
    for n in range(3):
        asyncio.run(lose_a_resolution(store, path, "hot"))  # contested: resolutions take leases
        acknowledged.append(asyncio.run(contended_round(store, f"run{n}")))
    asyncio.run(store.close())
    items = asyncio.run(reopened_items(path, "hot"))
    for batch in acknowledged:
        for item in batch:
            assert items.count(item) == 1


def test_threads_each_with_their_own_event_loop_share_a_repository(tmp_path):
    """Three threads, each running its own event loop, write and resolve conflicts on one
    repository at once: none fails, none hangs, every item is stored once."""
    path = tmp_path / "db"
    store = SQLiteRepository(path, DemoOrder)
    asyncio.run(store.persist(DemoOrder(id="hot")))
    asyncio.run(lose_a_resolution(store, path, "hot"))
    acknowledged: dict[int, list[str]] = {}
    failures: list[BaseException] = []

    def run(n: int) -> None:
        try:
            acknowledged[n] = asyncio.run(contended_round(store, f"thread{n}"))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BOUND_S * 3)
    assert not any(thread.is_alive() for thread in threads), "a thread's event loop hung"
    assert failures == []
    asyncio.run(store.close())
    items = asyncio.run(reopened_items(path, "hot"))
    assert len(acknowledged) == 3
    for batch in acknowledged.values():
        for item in batch:
            assert items.count(item) == 1


def test_a_resolution_waits_for_a_write_another_loop_has_under_way(tmp_path):
    """A resolution on one event loop lets a write of its aggregate that another loop (on
    another thread) queued first commit, then reads it: it is woken, and does not lose."""
    path = tmp_path / "db"
    store = SQLiteRepository(path, DemoOrder)
    created = asyncio.run(store.persist(DemoOrder(id="o")))
    queued = threading.Event()
    results: dict[str, Any] = {}

    async def write_from_b() -> DemoOrder:
        writing = asyncio.ensure_future(store.persist(with_item(created, "from-b")))
        await asyncio.sleep(0)  # queued behind the blocked writer thread
        queued.set()
        return await bounded(writing)

    async def resolve_on_a() -> DemoOrder:
        async with store.turn("o"):
            [read] = await store.retrieve(["o"])
            return await store.persist(with_item(read, "from-a"))

    def thread_b() -> None:
        results["b"] = asyncio.run(write_from_b())

    async def main() -> None:
        with writer_thread_blocked(store):
            other = threading.Thread(target=thread_b, daemon=True)
            other.start()
            await asyncio.to_thread(queued.wait, BOUND_S)
            resolving = asyncio.ensure_future(resolve_on_a())
            await asyncio.sleep(0)
            assert not resolving.done()
        results["a"] = await bounded(resolving)
        await asyncio.to_thread(other.join, BOUND_S)
        await store.close()

    asyncio.run(main())
    assert results["b"].version == 2
    assert results["a"].version == 3
    assert items_of(results["a"]) == ["from-b", "from-a"]


async def test_a_repository_closed_from_another_thread_says_so_on_this_one(tmp_path):
    """Closed from another thread's event loop, a repository refuses this loop's next read
    and write with `StoreClosedError`, not a raw error from a shut-down thread pool."""
    from cqrs_resilience.stores import StoreClosedError

    store = SQLiteRepository(tmp_path / "db", DemoOrder)
    await store.persist(DemoOrder(id="o"))
    await asyncio.to_thread(asyncio.run, store.close())
    with pytest.raises(StoreClosedError):
        await store.retrieve(["o"])
    with pytest.raises(StoreClosedError):
        await store.persist(DemoOrder(id="p"))


# --- case 7: settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "busy_timeout",
    [math.nan, math.inf, -1, -math.inf, 10**400, 3_000_000, "5", True, None],
    ids=["nan", "inf", "-1", "-inf", "10**400", "3e6", "str", "True", "None"],
)
def test_a_busy_timeout_no_database_can_use_is_refused_at_once(tmp_path, busy_timeout):
    """`busy_timeout` that is not a number of seconds SQLite can wait (NaN, infinite,
    negative, past SQLite's limit, not a number) is a `ConfigurationError` naming it."""
    with pytest.raises(ConfigurationError, match="busy_timeout"):
        SQLiteRepository(tmp_path / "db", DemoOrder, busy_timeout=busy_timeout)


@pytest.mark.parametrize("busy_timeout", [0, 0.001, 2, 2_147_483])
async def test_a_busy_timeout_sqlite_can_use_works(tmp_path, busy_timeout):
    """Zero, fractions and SQLite's largest busy timeout are accepted and work."""
    async with SQLiteRepository(tmp_path / "db", DemoOrder, busy_timeout=busy_timeout) as store:
        assert (await store.persist(DemoOrder(id="o"))).version == 1


# --- killed processes ---------------------------------------------------------------------------


def _write_and_report(path: str, report: Any) -> None:
    """In a child process: concurrent writers adding items, each reported once acknowledged."""

    async def main() -> None:
        store = SQLiteRepository(path, DemoOrder)

        async def writer(w: int) -> None:
            for n in range(10_000):
                order_id = f"o{w}"
                found = await store.retrieve([order_id])
                order = found[0] if found else DemoOrder(id=order_id)
                stored = await store.persist(with_item(order, f"w{w}-{n}"))
                report.send((order_id, stored.version, f"w{w}-{n}"))

        await asyncio.gather(*(writer(w) for w in range(8)))

    asyncio.run(main())


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
async def test_a_process_killed_in_the_middle_of_writes_loses_no_acknowledged_one(tmp_path):
    """SIGKILL a process whose writes are committing in batches: every write it had
    acknowledged is stored once, versions are contiguous, and the file takes new writes."""
    path = tmp_path / "db"
    context = multiprocessing.get_context("spawn")
    receiving, sending = context.Pipe(duplex=False)
    child = context.Process(target=_write_and_report, args=(str(path), sending), daemon=True)
    child.start()
    sending.close()
    acknowledged: list[tuple[str, int, str]] = []
    while len(acknowledged) < 300:
        ready = await asyncio.to_thread(receiving.poll, BOUND_S)
        assert ready, "the child process stopped acknowledging writes"
        acknowledged.append(receiving.recv())
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    await asyncio.to_thread(child.join, BOUND_S)
    while receiving.poll():  # acknowledged just before the kill
        try:
            acknowledged.append(receiving.recv())
        except EOFError:
            break
    async with SQLiteRepository(path, DemoOrder) as store:
        orders = {o.id: o for o in await store.retrieve([f"o{w}" for w in range(8)])}
        for order_id, version, item in acknowledged:
            order = orders[order_id]
            assert items_of(order).count(item) == 1
            assert order.items[version - 1]["id"] == item
        for order in orders.values():
            assert order.version == len(order.items)
            assert len(set(items_of(order))) == len(order.items)
        assert (await store.persist(with_item(orders["o0"], "after"))).version == (
            orders["o0"].version + 1
        )


# --- case 3: each write its own outcome ---------------------------------------------------------


async def test_a_bad_write_queued_with_good_ones_fails_alone(tmp_path):
    """Ten valid writes and one under a command id no store can keep (a `UUID`), queued
    together while the writer is busy: the ten are stored, each with its own outcome; the one
    is refused with a `ConfigurationError` and stores nothing."""
    async with SQLiteRepository(tmp_path / "db", DemoOrder) as store:
        with writer_thread_blocked(store):
            good = [store.persist(DemoOrder(id=f"o{n}"), command_id=f"c{n}") for n in range(10)]
            tasks = [asyncio.ensure_future(call) for call in good[:5]]
            bad = asyncio.ensure_future(
                store.persist(DemoOrder(id="bad"), command_id=uuid.uuid4())  # type: ignore[arg-type]
            )
            tasks += [asyncio.ensure_future(call) for call in good[5:]]
            await asyncio.sleep(0)
        outcomes = await bounded(asyncio.gather(*tasks, return_exceptions=True))
        assert [o.version for o in outcomes] == [1] * 10
        with pytest.raises(ConfigurationError, match="command_id"):
            await bad
        assert len(await store.retrieve([f"o{n}" for n in range(10)])) == 10
        assert await store.retrieve(["bad"]) == []
