"""Resolution rounds take turns: within a process, and across processes through the store."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import multiprocessing
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cqrs_resilience import (
    ConcurrencyError,
    ConflictConfig,
    ConflictResolutionPolicy,
    HookRegistry,
    InMemoryRepository,
    Turns,
    command_scope,
)
from cqrs_resilience._demo import AddLineItem, AddLineItemHandler, DemoOrder
from cqrs_resilience._idempotency import CURRENT, Scope
from cqrs_resilience.stores import PostgresRepository, SQLiteRepository
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
            assert "another writer is resolving a conflict on it" in str(info.value)
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
            assert str(info.value) == (
                "aggregate 'o': another writer is resolving a conflict on it, so this write "
                "(read at version 1) was not made"
            )
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


def test_turns_on_event_loops_in_several_threads_stay_apart():
    """Loops on four threads take turns on the same keys at once: each loop's turns exclude
    only its own tasks, nothing raises, nothing hangs, and no turn is left held."""
    turns = Turns()
    errors: list[BaseException] = []

    def run() -> None:
        async def main() -> None:
            inside: Counter[str] = Counter()

            async def take(n: int) -> None:
                key = f"k{n % 3}"
                async with turns.turn(key):
                    inside[key] += 1
                    assert inside[key] == 1
                    await asyncio.sleep(0)
                    inside[key] -= 1

            await asyncio.wait_for(asyncio.gather(*(take(n) for n in range(300))), 20)
            assert not any(turns.held(f"k{n}") for n in range(3))

        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert not any(thread.is_alive() for thread in threads)


class TurnModel(RuleBasedStateMachine):
    """Commands asking for one aggregate's turn, finishing, coming back, and being cancelled
    at any moment (waiting, just handed the turn, holding it), with the event loop stepped
    one iteration at a time. At most one task holds the turn; a turn handed on goes to the
    waiter whose command asked first; a cancelled task never holds it up; once everything
    settled, the turn is free or held by a waiter, and `held()` says which."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.turns = Turns()
        self.scopes: list[Scope] = []  # one per command; a command may ask again
        self.tasks: list[asyncio.Task[None]] = []
        self.state: dict[int, str] = {}  # task -> "new", "waiting", "inside", "out"
        self.key: dict[int, tuple[int, int]] = {}  # task -> (its command's rank, its start)
        self.releases: dict[int, asyncio.Event] = {}
        self.starts = itertools.count()
        self.changes = 0  # asks and cancels: a hand-over is only predictable without them
        self.handed: tuple[int, set[int]] | None = None  # (changes, waiting) at the last exit
        self.command_of: dict[int, int] = {}  # task -> its command (index in `scopes`)

    def _task(self, n: int, scope: Scope) -> Any:
        async def take() -> None:
            token = CURRENT.set(scope)
            try:
                holding = self.turns.turn("k")
                rank = scope.turn_rank
                assert rank is not None
                self.key[n] = (rank, next(self.starts))
                self.state[n] = "waiting"
                async with holding:
                    assert [s for s in self.state.values() if s == "inside"] == []
                    self._check_order(n)
                    self.state[n] = "inside"
                    try:
                        await self.releases[n].wait()
                    finally:  # the turn is handed on as the block ends: who waits for it?
                        self.state[n] = "out"
                        self.handed = (self.changes, self._waiting())
            finally:
                self.state[n] = "out"
                CURRENT.reset(token)

        return take()

    def _waiting(self) -> set[int]:
        return {
            m
            for m, s in self.state.items()
            if s == "waiting" and not self.tasks[m].done() and not self.tasks[m].cancelling()
        }

    def _check_order(self, n: int) -> None:
        if self.handed is None:
            return
        changes, waiting = self.handed
        self.handed = None
        if changes == self.changes and waiting:  # nobody asked or left since: predictable
            assert self.key[n] == min(self.key[m] for m in waiting), (n, waiting)

    @rule(again=st.booleans(), pick=st.integers(0, 99))
    def ask(self, again: bool, pick: int) -> None:
        """A command asks for the turn: a new one, or (`again`) one that asked before."""
        busy = {self.command_of[n] for n, task in enumerate(self.tasks) if not task.done()}
        done = [i for i in range(len(self.scopes)) if i not in busy]
        if again and done:
            index = done[pick % len(done)]
        else:
            index = len(self.scopes)
            self.scopes.append(Scope(f"command-{index}"))
        n = len(self.tasks)
        self.command_of[n] = index
        self.releases[n] = asyncio.Event()
        self.state[n] = "new"
        self.tasks.append(self.loop.create_task(self._task(n, self.scopes[index])))
        self.changes += 1

    @precondition(lambda self: any(s == "inside" for s in self.state.values()))
    @rule()
    def finish(self) -> None:
        [n] = [m for m, s in self.state.items() if s == "inside"]
        self.releases[n].set()

    @precondition(lambda self: any(not t.done() for t in self.tasks))
    @rule(pick=st.integers(0, 99))
    def cancel(self, pick: int) -> None:
        live = [n for n, t in enumerate(self.tasks) if not t.done()]
        n = live[pick % len(live)]
        self.tasks[n].cancel()
        self.changes += 1

    @rule()
    def step(self) -> None:
        """One iteration of the event loop: what is ready runs, nothing more."""
        self.loop.call_soon(self.loop.stop)
        self.loop.run_forever()
        for task in self.tasks:  # an assertion failed inside a task: fail here
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    @rule()
    def settle(self) -> None:
        """Run the loop until nothing more happens, then check nobody is stuck."""
        for _ in range(50):
            self.step()
        inside = [n for n, s in self.state.items() if s == "inside"]
        waiting = [n for n, s in self.state.items() if s == "waiting"]
        if waiting:
            assert inside, f"tasks {waiting} wait for a turn nobody holds"

        async def held() -> bool:
            return self.turns.held("k")

        assert self.loop.run_until_complete(held()) == bool(inside)

    @invariant()
    def one_holder_at_most(self) -> None:
        assert sum(1 for s in self.state.values() if s == "inside") <= 1

    def teardown(self) -> None:
        for task in self.tasks:
            task.cancel()

        async def drain() -> None:
            await asyncio.gather(*self.tasks, return_exceptions=True)

        self.loop.run_until_complete(drain())
        self.loop.close()


TestTurnModel = TurnModel.TestCase
TestTurnModel.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
