"""Resolution rounds take turns: within a process, and across processes through the store."""

from __future__ import annotations

import asyncio
import contextvars
import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

from cqrs_resilience import (
    ConcurrencyError,
    ConflictConfig,
    ConflictResolutionPolicy,
    FakeClock,
    HookRegistry,
    InMemoryRepository,
    Turns,
    command_scope,
)
from cqrs_resilience._demo import AddLineItem, AddLineItemHandler, DemoOrder
from cqrs_resilience.stores import PostgresRepository, SQLiteRepository
from cqrs_resilience.stores._sqlite import CONTESTED_S
from tests.conftest_stores import writer_thread_blocked

PROCESSES = 4
WRITERS = 50  # per process: 200 writers on one aggregate
# The default config, with MERGE (and the item identity a list of line items needs):
# max_attempts=3, so a round that loses three times fails the command.
CONFIG = ConflictConfig(policy=ConflictResolutionPolicy.MERGE, list_identity_key="id")


def open_store(kind: str, target: str) -> Any:
    if kind == "postgres":
        return PostgresRepository(target, DemoOrder, max_size=4)
    return SQLiteRepository(target, DemoOrder)


_start: Any = None


def _init(start: Any) -> None:
    global _start
    _start = start


def run_writers(kind: str, target: str, process: int) -> dict[str, Any]:
    """WRITERS concurrent writers, one full-state command each, on the one aggregate."""

    async def run() -> dict[str, Any]:
        async with open_store(kind, target) as store:
            handler = AddLineItemHandler(store, HookRegistry())
            _start.wait(timeout=60)

            async def writer(w: int) -> str:
                seen = (await store.retrieve(["hot"]))[0].to_dict()
                item = {"id": f"p{process}-w{w}"}
                command = AddLineItem(
                    order_id="hot",
                    expected_version=seen["version"],
                    state={**seen, "items": [*seen["items"], item]},
                    conflict_config=CONFIG,
                )
                try:
                    await handler.handle(command)
                except ConcurrencyError as exc:
                    return f"failed: {exc}"
                return "ok"

            outcomes = await asyncio.gather(*(writer(w) for w in range(WRITERS)))
            return {"outcomes": Counter(outcomes), "attempts": handler.attempts}

    return asyncio.run(run())


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_rounds_take_turns_across_processes(kind, request, tmp_path):
    """200 writers on one aggregate from 4 processes, max_attempts=3: every command succeeds,
    with at most 2.5 process calls per command, and every line item lands once."""
    target = request.getfixturevalue("pg_database") if kind == "postgres" else str(tmp_path / "db")
    async with open_store(kind, target) as store:
        await store.persist(DemoOrder(id="hot"))
    context = multiprocessing.get_context("spawn")
    started = time.monotonic()

    def race() -> list[dict[str, Any]]:
        with ProcessPoolExecutor(
            PROCESSES, mp_context=context, initializer=_init, initargs=(context.Barrier(PROCESSES),)
        ) as pool:
            futures = [pool.submit(run_writers, kind, target, p) for p in range(PROCESSES)]
            return [f.result(timeout=120) for f in futures]

    results = await asyncio.to_thread(race)
    outcomes = sum((r["outcomes"] for r in results), Counter())
    attempts = sum(r["attempts"] for r in results)
    assert outcomes == Counter({"ok": PROCESSES * WRITERS}), outcomes
    assert attempts <= 2.5 * PROCESSES * WRITERS, attempts
    async with open_store(kind, target) as store:
        [final] = await store.retrieve(["hot"])
    ids = [item["id"] for item in final.items]
    assert sorted(ids) == sorted(f"p{p}-w{w}" for p in range(PROCESSES) for w in range(WRITERS))
    assert final.version == 1 + PROCESSES * WRITERS
    assert time.monotonic() - started < 120


# --- within one process -----------------------------------------------------------------------


async def test_a_turn_is_exclusive_per_key_and_free_across_keys():
    """Two holders of one key's turn run one after the other; other keys do not wait."""
    turns = Turns()
    order: list[str] = []
    inside = asyncio.Event()
    release = asyncio.Event()

    async def hold(key: str, name: str) -> None:
        async with turns.turn(key):
            order.append(f"{name} in")
            inside.set()
            await release.wait()
            order.append(f"{name} out")

    first = asyncio.create_task(hold("a", "first"))
    await inside.wait()
    second = asyncio.create_task(hold("a", "second"))
    async with turns.turn("b"):  # another key: no waiting
        order.append("b")
    release.set()
    await asyncio.gather(first, second)
    assert order == ["first in", "b", "first out", "second in", "second out"]


async def test_a_command_that_asked_for_a_turn_before_goes_ahead_of_later_ones():
    """Waiters go in the order their commands first asked for a turn: a command coming back
    for another round (its last one failed) is not sent behind the commands that arrived
    after it; commands asking for the first time go in arrival order."""
    turns = Turns()
    order: list[str] = []
    inside, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with turns.turn("k"):
            inside.set()
            await release.wait()

    async def take(name: str) -> None:
        async with turns.turn("k"):
            order.append(name)

    with command_scope("returning"):
        async with turns.turn("k"):  # its first round, which (say) failed
            pass
        returning = contextvars.copy_context()
    holder = asyncio.create_task(hold())
    await inside.wait()
    waiting = []
    for name in ("new-1", "new-2"):
        with command_scope(name):
            waiting.append(asyncio.create_task(take(name)))
        await asyncio.sleep(0)
    waiting.append(asyncio.create_task(take("returning"), context=returning))
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(holder, *waiting)
    assert order == ["returning", "new-1", "new-2"]
    assert not turns.held("k")


async def test_a_waiter_cancelled_before_or_after_its_turn_came_passes_it_on():
    """A waiter cancelled while waiting is skipped; one cancelled just as the turn was handed
    to it passes the turn on. Nobody is left holding it."""
    turns = Turns()
    order: list[str] = []
    inside, release = asyncio.Event(), asyncio.Event()
    tasks: dict[str, asyncio.Task[None]] = {}

    async def take(name: str) -> None:
        async with turns.turn("k"):
            order.append(name)

    async def hold() -> None:
        async with turns.turn("k"):
            order.append("holder")
            inside.set()
            await release.wait()
        tasks["handed"].cancel()  # the turn was just handed to it; it has not run yet

    holder = asyncio.create_task(hold())
    await inside.wait()
    for name in ("dropped", "handed", "last"):
        tasks[name] = asyncio.create_task(take(name))
    await asyncio.sleep(0)
    tasks["dropped"].cancel()  # cancelled while waiting
    release.set()
    await holder
    # A turn nobody passes on would leave `last` waiting forever: give up after 10 s.
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True), 10)
    assert [type(o).__name__ for o in outcomes] == ["CancelledError", "CancelledError", "NoneType"]
    assert order == ["holder", "last"]
    assert not turns.held("k")


async def test_a_turn_passing_from_one_round_to_the_next_is_not_held():
    """`held()` (what first attempts yield to) is true while a round runs in the turn, and
    false in the moment the turn passes to the next round, when a first attempt may go."""
    turns = Turns()
    seen: list[tuple[str, bool]] = []
    inside, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with turns.turn("k"):
            inside.set()
            await release.wait()
        seen.append(("passing", turns.held("k")))

    async def take() -> None:
        async with turns.turn("k"):
            seen.append(("next round", turns.held("k")))

    holder = asyncio.create_task(hold())
    await inside.wait()
    taker = asyncio.create_task(take())
    await asyncio.sleep(0)
    seen.append(("first round", turns.held("k")))
    release.set()
    await asyncio.gather(holder, taker)
    assert seen == [("first round", True), ("passing", False), ("next round", True)]
    assert not turns.held("k")


async def test_no_turns_for_none_or_unhashable_keys():
    """None and unhashable keys hold no turn: only the database arbitrates them."""
    turns = Turns()
    async with (
        turns.turn(None),
        turns.turn(["unhashable"]),
        turns.turn(None),
        turns.turn(["unhashable"]),
    ):
        assert "0 key" in repr(turns)


async def test_stores_raise_conflicts_that_carry_their_turns():
    """A store's ConcurrencyError names the store as the turns rounds take, and pickles
    without it."""
    import pickle

    store = InMemoryRepository(DemoOrder)
    await store.persist(DemoOrder(id="o"))
    with pytest.raises(ConcurrencyError) as info:
        await store.persist(DemoOrder(id="o"))
    assert info.value.turns is store
    assert pickle.loads(pickle.dumps(info.value)).turns is None


async def contest(store: SQLiteRepository[DemoOrder], path: Any, aggregate_id: str) -> None:
    """A round on `aggregate_id` loses to another process (another repository on the file)."""
    async with SQLiteRepository(path, DemoOrder) as elsewhere, store.turn(aggregate_id):
        [read] = await store.retrieve([aggregate_id])
        await elsewhere.persist(read)  # the other process writes between read and write
        with pytest.raises(ConcurrencyError):
            await store.persist(read)


async def test_a_sqlite_round_runs_unlocked_and_first_attempts_yield_to_it(tmp_path):
    """Uncontested, a round holds only this process's turn: other aggregates' writes go on,
    and a first attempt on the round's aggregate yields (a conflict at once, no write)."""
    async with SQLiteRepository(tmp_path / "db", DemoOrder) as store:
        created = await store.persist(DemoOrder(id="o"))
        async with store.turn("o"):
            assert (await store.persist(DemoOrder(id="p"))).version == 1  # not held up
            outside = contextvars.Context()  # another task's first attempt, not the round's
            with pytest.raises(ConcurrencyError) as info:
                await asyncio.create_task(store.persist(created), context=outside)
            assert "yields" in " ".join(info.value.__notes__)
            [read] = await store.retrieve(["o"])
            assert (await store.persist(read)).version == 2  # the round's own write
        assert [o.version for o in await store.retrieve(["o", "p"])] == [2, 1]


async def test_a_first_attempt_yields_to_a_round_of_this_process_and_records_nothing(
    durable_target,
):
    """On either database, a first attempt on an aggregate whose round this process holds is
    a conflict at once at the version it read; nothing of it is recorded, so the same command
    writes once the round is over."""
    kind, target = durable_target
    async with open_store(kind, target) as store:
        created = await store.persist(DemoOrder(id="o"))
        async with store.turn("o"):
            outside = contextvars.Context()  # another task's first attempt, not the round's
            first = store.persist(created, command_id="first")
            with pytest.raises(ConcurrencyError) as info:
                await asyncio.create_task(first, context=outside)
            assert info.value.actual_version == created.version
            assert "yields" in " ".join(info.value.__notes__)
            [read] = await store.retrieve(["o"])
            assert (await store.persist(read)).version == 2  # the round's own write
        assert not await store.was_processed("first", "o")
        [latest] = await store.retrieve(["o"])
        assert (await store.persist(latest, command_id="first")).version == 3


async def a_round(store: SQLiteRepository[DemoOrder], aggregate_id: str) -> DemoOrder:
    """A resolution round that reads the aggregate in its turn and writes it back."""
    async with store.turn(aggregate_id):
        [read] = await store.retrieve([aggregate_id])
        return await store.persist(read)


async def test_a_sqlite_round_waits_for_this_process_writes_under_way(tmp_path):
    """A round does not read past a write of its aggregate that this process has under way
    (a first attempt that began before the round): it waits for it, reads what it wrote, and
    its own write then succeeds instead of losing to it."""
    async with SQLiteRepository(tmp_path / "db", DemoOrder) as store:
        created = await store.persist(DemoOrder(id="o"))

        with writer_thread_blocked(store):
            first = asyncio.ensure_future(store.persist(created))  # under way, not committed
            await asyncio.sleep(0)
            resolving = asyncio.ensure_future(a_round(store, "o"))
            await asyncio.sleep(0)
            assert not resolving.done()
        assert (await first).version == 2
        assert (await resolving).version == 3


async def test_a_sqlite_round_cancelled_while_waiting_leaves_the_next_one_working(tmp_path):
    """Cancelling a round that waits for a write under way cancels it at once, and the next
    round on the aggregate still waits for that write and then writes."""
    async with SQLiteRepository(tmp_path / "db", DemoOrder) as store:
        created = await store.persist(DemoOrder(id="o"))

        with writer_thread_blocked(store):
            first = asyncio.ensure_future(store.persist(created))
            await asyncio.sleep(0)
            cancelled = asyncio.ensure_future(a_round(store, "o"))
            await asyncio.sleep(0)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            resolving = asyncio.ensure_future(a_round(store, "o"))
            await asyncio.sleep(0)
            assert not resolving.done()
        assert (await first).version == 2
        assert (await resolving).version == 3


async def test_a_sqlite_turn_holds_other_work_until_it_ends(tmp_path):
    """Once a round lost to another process, the aggregate's rounds take the writer lock:
    the repository's other callers wait, the round's own calls run, and what it wrote is
    committed when the turn ends."""
    async with SQLiteRepository(tmp_path / "db", DemoOrder) as store:
        await store.persist(DemoOrder(id="o"))
        await contest(store, tmp_path / "db", "o")
        go, other_done = asyncio.Event(), asyncio.Event()

        async def other() -> None:  # started outside the turn: not part of the round
            await go.wait()
            await store.persist(DemoOrder(id="p"))
            other_done.set()

        task = asyncio.create_task(other())
        async with store.turn("o"):
            go.set()
            await asyncio.sleep(0)  # one scheduling step: the other caller reaches the store
            [read] = await store.retrieve(["o"])  # the round's own reads run at once
            await store.persist(read)
            assert not other_done.is_set()
        await task
        assert [o.version for o in await store.retrieve(["o", "p"])] == [read.version + 1, 1]


async def test_a_contested_aggregate_goes_back_to_unlocked_rounds(tmp_path):
    """CONTESTED_S after its last lost round, an aggregate's rounds run unlocked again."""
    clock = FakeClock()
    async with SQLiteRepository(tmp_path / "db", DemoOrder, clock=clock) as store:
        await store.persist(DemoOrder(id="o"))
        await contest(store, tmp_path / "db", "o")
        assert store._contested_now("o")
        clock.advance(CONTESTED_S)
        assert not store._contested_now("o")


async def test_contested_marks_that_ran_out_do_not_pile_up(tmp_path):
    """Many aggregates contested once each: the marks that ran out are swept, the fresh kept."""
    clock = FakeClock()
    async with SQLiteRepository(tmp_path / "db", DemoOrder, clock=clock) as store:
        for n in range(3000):
            store._contest(f"o{n}")
            clock.advance(0.01)  # 5 s of marks live at a time: 500
        assert len(store._contested) <= 1024 + 500
        assert store._contested_now("o2999") and not store._contested_now("o0")


async def test_a_sqlite_turn_that_fails_writes_nothing(tmp_path):
    """A locked round (the aggregate is contested) that raises after writing rolls its
    writes back with its turn."""
    async with SQLiteRepository(tmp_path / "db", DemoOrder) as store:
        created = await store.persist(DemoOrder(id="o"))

        await contest(store, tmp_path / "db", "o")
        [created] = await store.retrieve(["o"])

        async def failing_round() -> None:
            async with store.turn("o"):
                await store.persist(created)
                raise RuntimeError("after the write")

        with pytest.raises(RuntimeError, match="after the write"):
            await failing_round()
        assert await store.retrieve(["o"]) == [created]
