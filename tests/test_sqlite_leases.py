"""Conflict resolution on one SQLite file across repositories, event loops and processes:
contested aggregates take leases, which order resolutions but never decide what is stored."""

from __future__ import annotations

import asyncio
import contextvars
import multiprocessing
import os
import signal
import sqlite3
import threading
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from cqrs_resilience import ConcurrencyError, FakeClock
from cqrs_resilience._demo import DemoOrder
from cqrs_resilience.stores import SQLiteRepository
from cqrs_resilience.stores._sqlite_leases import CONTESTED_S, Contested
from tests.conftest_stores import writer_thread_blocked
from tests.sqlite_writers import add_item, lose_a_resolution, with_item

BOUND_S = 20.0


def leases(path: Path) -> list[tuple[str, str]]:
    """(aggregate key, owner) of every lease row in the file."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT aggregate_id, owner FROM conflict_leases").fetchall()


async def first_attempt(store: SQLiteRepository[DemoOrder], order: DemoOrder) -> DemoOrder:
    """A write that is not part of any conflict resolution (its own task, its own context)."""
    return await asyncio.create_task(store.persist(order), context=contextvars.Context())


# --- contested marks ---------------------------------------------------------------------------


def test_a_contested_mark_runs_out_after_contested_s():
    """An aggregate stays contested for CONTESTED_S after its last lost resolution."""
    marks = Contested()
    marks.mark("o", now=100.0)
    assert marks.now("o", 100.0 + CONTESTED_S - 0.001)
    assert not marks.now("o", 100.0 + CONTESTED_S)
    assert not marks.now("never", 100.0)


def test_contested_marks_that_ran_out_do_not_pile_up():
    """Many aggregates contested once each: the marks that ran out are swept, the fresh kept."""
    marks = Contested()
    for n in range(3000):
        marks.mark(f"o{n}", now=n * 0.01)  # 5 s of marks live at a time: 500
    assert len(marks) <= 1024 + 500
    assert marks.now("o2999", 29.99) and not marks.now("o0", 29.99)


def test_contested_marks_are_safe_from_many_threads():
    """Threads marking and reading at once never corrupt the marks or raise."""
    marks = Contested()
    errors: list[BaseException] = []

    def churn(t: int) -> None:
        try:
            for n in range(5000):
                marks.mark(f"t{t}-{n % 1500}", now=n * 0.01)
                marks.now(f"t{(t + 1) % 4}-{n % 1500}", n * 0.01)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# --- leases ------------------------------------------------------------------------------------


async def test_an_uncontested_resolution_takes_no_lease(tmp_path):
    """Without contention from elsewhere, a resolution writes no lease and other repositories'
    writes of the aggregate go ahead."""
    path = tmp_path / "db"
    async with SQLiteRepository(path, DemoOrder) as store, SQLiteRepository(path, DemoOrder) as b:
        created = await store.persist(DemoOrder(id="o"))
        async with store.turn("o"):
            assert leases(path) == []
            assert (await first_attempt(b, with_item(created, "b"))).version == 2


async def test_a_contested_resolution_holds_a_lease_other_writers_yield_to(tmp_path):
    """Once a resolution lost to another writer, the next ones hold a lease: another
    repository's first attempt at the aggregate is a conflict at once (nothing written),
    other aggregates are not held up, and the lease is gone when the resolution ends."""
    path = tmp_path / "db"
    async with SQLiteRepository(path, DemoOrder) as store, SQLiteRepository(path, DemoOrder) as b:
        await store.persist(DemoOrder(id="o"))
        await lose_a_resolution(store, path, "o")
        [latest] = await b.retrieve(["o"])
        async with store.turn("o"):
            assert [key for key, _ in leases(path)] == ["DemoOrder:o"]
            with pytest.raises(ConcurrencyError) as info:
                await first_attempt(b, with_item(latest, "b"))
            assert info.value.actual_version == latest.version  # it yielded: nothing moved
            assert (await first_attempt(b, DemoOrder(id="p"))).version == 1
            [read] = await store.retrieve(["o"])
            mine = await store.persist(with_item(read, "mine"))
        await store.persist(DemoOrder(id="q"))  # queued behind the release
        assert leases(path) == []
        assert (await first_attempt(b, with_item(mine, "b"))).version == mine.version + 1


async def test_a_repository_that_yielded_to_a_lease_takes_leases_too(tmp_path):
    """A repository whose first attempt yielded to another's lease counts the aggregate as
    contested: its own resolutions take leases from then on."""
    path = tmp_path / "db"
    async with SQLiteRepository(path, DemoOrder) as a, SQLiteRepository(path, DemoOrder) as b:
        await a.persist(DemoOrder(id="o"))
        await lose_a_resolution(a, path, "o")
        [latest] = await b.retrieve(["o"])
        async with a.turn("o"):
            with pytest.raises(ConcurrencyError):
                await first_attempt(b, with_item(latest, "b"))
        async with b.turn("o"):
            assert len(leases(path)) == 1


@pytest.mark.parametrize("how", ["raises", "cancelled"])
async def test_a_resolution_that_raises_or_is_cancelled_gives_its_lease_back(tmp_path, how):
    """A contested resolution that raises, or is cancelled in the middle, leaves no lease."""
    path = tmp_path / "db"
    async with SQLiteRepository(path, DemoOrder) as store:
        await store.persist(DemoOrder(id="o"))
        await lose_a_resolution(store, path, "o")
        inside = asyncio.Event()

        async def resolution() -> None:
            async with store.turn("o"):
                inside.set()
                if how == "raises":
                    raise RuntimeError("the merge failed")
                await asyncio.Event().wait()

        task = asyncio.ensure_future(resolution())
        await inside.wait()
        if how == "cancelled":
            task.cancel()
        with pytest.raises((RuntimeError, asyncio.CancelledError)):
            await task
        await add_item(store, "o", "after")  # queued behind the release
        assert leases(path) == []


@pytest.mark.parametrize("steps", range(6))
async def test_a_resolution_cancelled_while_taking_its_lease_leaves_none(tmp_path, steps):
    """Cancelled at any await point while its lease is being taken (the writer busy), a
    resolution leaves no lease behind and the aggregate takes writes from anyone."""
    path = tmp_path / "db"
    async with SQLiteRepository(path, DemoOrder) as store, SQLiteRepository(path, DemoOrder) as b:
        await store.persist(DemoOrder(id="o"))
        await lose_a_resolution(store, path, "o")

        async def resolution() -> None:
            async with store.turn("o"):
                await asyncio.Event().wait()

        with writer_thread_blocked(store):
            task = asyncio.ensure_future(resolution())
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await add_item(store, "o", "after")
        assert leases(path) == []
        assert (await add_item(b, "o", "b")).items[-1] == {"id": "b"}


async def test_a_resolution_waits_for_another_owners_lease_at_most_busy_timeout(tmp_path):
    """A lease held elsewhere (its holder stuck) holds a resolution up for at most
    `busy_timeout`; then it goes on without one, and its write is stored."""
    path = tmp_path / "db"
    clock = FakeClock()  # the wait's pauses jump at once
    async with (
        SQLiteRepository(path, DemoOrder, busy_timeout=2.0, clock=clock) as store,
        SQLiteRepository(path, DemoOrder, clock=clock) as stuck,
    ):
        await store.persist(DemoOrder(id="o"))
        await lose_a_resolution(stuck, path, "o")
        await lose_a_resolution(store, path, "o")
        # `stuck` holds the lease, and does not finish in time.
        async with stuck.turn("o"), store.turn("o"):
            assert sum(clock.sleeps) == pytest.approx(2.0)
            [read] = await store.retrieve(["o"])
            written = await store.persist(with_item(read, "went on"))
        assert written.items[-1] == {"id": "went on"}


def test_two_event_loops_of_one_repository_take_turns_through_leases(tmp_path):
    """On a contested aggregate, a resolution on one event loop holds a lease that a first
    attempt from another loop (another thread) of the same repository yields to."""
    path = tmp_path / "db"
    store = SQLiteRepository(path, DemoOrder)
    asyncio.run(store.persist(DemoOrder(id="o")))
    asyncio.run(lose_a_resolution(store, path, "o"))
    outcome: list[BaseException | DemoOrder] = []

    def other_loop(latest: DemoOrder) -> None:
        async def write() -> None:
            try:
                outcome.append(await store.persist(with_item(latest, "other loop")))
            except ConcurrencyError as exc:
                outcome.append(exc)

        asyncio.run(write())

    async def main() -> None:
        [latest] = await store.retrieve(["o"])
        async with store.turn("o"):
            other = threading.Thread(target=other_loop, args=(latest,))
            other.start()
            await asyncio.to_thread(other.join, BOUND_S)
        await store.close()

    asyncio.run(main())
    [result] = outcome
    assert isinstance(result, ConcurrencyError)


def _hold_a_lease(path: str, ready: Any) -> None:
    """In a child process: take the aggregate's lease, say so, and hang until killed."""

    async def main() -> None:
        store = SQLiteRepository(path, DemoOrder, busy_timeout=0.5)
        await lose_a_resolution(store, Path(path), "o")
        async with store.turn("o"):
            ready.set()
            await asyncio.Event().wait()

    asyncio.run(main())


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
async def test_a_process_killed_holding_a_lease_holds_others_up_at_most_busy_timeout(tmp_path):
    """SIGKILL a process while its resolution holds a lease: the lease expires after its
    `busy_timeout`, and the others' resolutions and first attempts then go ahead."""
    path = tmp_path / "db"
    async with SQLiteRepository(path, DemoOrder, busy_timeout=0.5) as store:
        await store.persist(DemoOrder(id="o"))
        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        child = context.Process(target=_hold_a_lease, args=(str(path), ready), daemon=True)
        child.start()
        assert await asyncio.to_thread(ready.wait, BOUND_S), "the child never took the lease"
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        await asyncio.to_thread(child.join, BOUND_S)
        assert len(leases(path)) == 1  # left behind by the dead process
        await lose_a_resolution(store, path, "o")  # contested here too: it takes leases

        async def resolve() -> DemoOrder:
            async with store.turn("o"):
                [read] = await store.retrieve(["o"])
                return await store.persist(with_item(read, "after the kill"))

        written = await asyncio.wait_for(resolve(), BOUND_S)
        assert written.items[-1] == {"id": "after the kill"}
        async with SQLiteRepository(path, DemoOrder) as fresh:
            later = await asyncio.wait_for(add_item(fresh, "o", "first attempt"), BOUND_S)
        assert later.version == written.version + 1
        assert leases(path) == []  # the dead process's lease was swept
