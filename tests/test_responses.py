"""`idempotent(store)`: a resend gets the first response, on every store, whatever happened in
between (pruned versions, other writers, a failed send, a send still in flight here or in
another process)."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import signal
import threading
from collections import Counter
from typing import Any

import msgspec
import pytest

from cqrs_resilience import (
    Aggregate,
    BrokenCircuitError,
    Command,
    CommandInProgressError,
    CommandResponse,
    CommandTimeoutError,
    FakeClock,
    IdempotencyKeyReuseError,
    InMemoryRepository,
    InvalidResponseError,
    RetryableCommandHandler,
    TransientError,
    circuit_breaker,
    idempotent,
    pipeline,
    retry,
    timeout,
)
from cqrs_resilience._in_flight import IN_FLIGHT

BOUND_S = 20.0


class Order(Aggregate, kw_only=True):
    items: list[str] = msgspec.field(default_factory=list)


class AddItem(Command[None]):
    order_id: str
    item: str


class Receipt(msgspec.Struct, frozen=True):
    order_id: str
    version: int
    items: tuple[str, ...]


class Shop:
    """An `add` function decorated with `idempotent(store)`: reads the order, appends the
    item, persists; counts its runs; can be held or made to fail."""

    def __init__(self, store: Any, **options: Any) -> None:
        self.store = store
        self.runs: Counter[str] = Counter()
        self.hold: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.fail_with: BaseException | None = None

        @idempotent(store, **options)
        async def add(command: AddItem) -> Receipt:
            self.runs[command.item] += 1
            found = await store.retrieve([command.order_id])
            order = found[0] if found else Order(id=command.order_id)
            stored = await store.persist(
                msgspec.structs.replace(order, items=[*order.items, command.item])
            )
            self.entered.set()
            if self.hold is not None:
                await self.hold.wait()
            if self.fail_with is not None:
                raise self.fail_with
            return Receipt(stored.id, stored.version, tuple(stored.items))

        self.add = add

    async def items(self, order_id: str = "o") -> list[str]:
        [order] = await self.store.retrieve([order_id])
        return list(order.items)


def bounded(call: Any) -> Any:
    return asyncio.wait_for(call, BOUND_S)


# --- the first response, for every resend ---------------------------------------------------


async def test_a_resend_gets_the_first_response_without_running_again(make_store):
    """The same command sent again returns a response equal to the first, of the same type,
    and the function does not run again: nothing is applied twice."""
    shop = Shop(make_store(Order))
    command = AddItem(order_id="o", item="a")
    first = await shop.add(command)
    await shop.add(AddItem(order_id="o", item="b"))
    again = await shop.add(command)
    resent = await shop.add(msgspec.json.decode(msgspec.json.encode(command), type=AddItem))
    assert first == again == resent == Receipt("o", 1, ("a",))
    assert type(again) is Receipt
    assert shop.runs == Counter({"a": 1, "b": 1})
    assert await shop.items() == ["a", "b"]


async def test_a_resend_gets_the_first_response_after_its_version_was_pruned(make_store):
    """With `keep_versions=1`, long after the command's own version was pruned, a resend gets
    the first response, not the latest state (responses are kept apart from versions)."""
    shop = Shop(make_store(Order, keep_versions=1))
    command = AddItem(order_id="o", item="first")
    first = await shop.add(command)
    for n in range(5):
        await shop.add(AddItem(order_id="o", item=f"later-{n}"))
    assert await shop.add(command) == first == Receipt("o", 1, ("first",))
    assert shop.runs["first"] == 1


async def test_a_response_is_kept_keep_s_then_the_command_runs_again(make_store):
    """A response is answered for `keep_s` seconds; a resend after that runs the command
    again, and its write replays (still recorded for `keep_commands_s`): applied once."""
    clock = FakeClock()
    shop = Shop(make_store(Order, clock=clock), keep_s=60)
    command = AddItem(order_id="o", item="a")
    await shop.add(command)
    clock.advance(59)
    await shop.add(command)
    assert shop.runs["a"] == 1
    clock.advance(2)
    again = await shop.add(command)
    assert shop.runs["a"] == 2
    assert again == Receipt("o", 1, ("a",))  # the write's first outcome, replayed
    assert await shop.items() == ["a"]


async def test_the_same_id_with_another_command_is_refused(make_store):
    """A different command under a used id is `IdempotencyKeyReuseError`; it never runs."""
    shop = Shop(make_store(Order))
    command = AddItem(order_id="o", item="a")
    await shop.add(command)
    with pytest.raises(IdempotencyKeyReuseError):
        await shop.add(AddItem(command_id=command.command_id, order_id="o", item="other"))
    assert shop.runs == Counter({"a": 1})


async def test_a_send_that_raised_is_not_recorded_and_its_resend_replays_its_writes(
    make_store,
):
    """A send that raised records nothing: its resend runs again, and the write the first
    made replays its first outcome (the item is there once)."""
    shop = Shop(make_store(Order))
    command = AddItem(order_id="o", item="a")
    shop.fail_with = TransientError("the reply got lost")
    with pytest.raises(TransientError):
        await shop.add(command)
    shop.fail_with = None
    receipt = await shop.add(command)
    assert receipt == Receipt("o", 1, ("a",))
    assert shop.runs["a"] == 2
    assert await shop.items() == ["a"]
    assert await shop.add(command) == receipt
    assert shop.runs["a"] == 2


# --- in flight in this process ----------------------------------------------------------------


async def test_the_same_command_in_flight_twice_runs_once():
    """Sent five times at once, a command runs once; every send gets the same response."""
    shop = Shop(InMemoryRepository(Order))
    shop.hold = asyncio.Event()
    command = AddItem(order_id="o", item="a")
    sends = [asyncio.ensure_future(shop.add(command)) for _ in range(5)]
    await shop.entered.wait()
    shop.hold.set()
    receipts = await bounded(asyncio.gather(*sends))
    assert receipts == [Receipt("o", 1, ("a",))] * 5
    assert shop.runs["a"] == 1
    assert len(IN_FLIGHT) == 0


async def test_waiters_get_the_first_sends_exception():
    """A send waiting for the first gets the exception the first raised."""
    shop = Shop(InMemoryRepository(Order))
    shop.hold = asyncio.Event()
    shop.fail_with = TransientError("down")
    command = AddItem(order_id="o", item="a")
    sends = [asyncio.ensure_future(shop.add(command)) for _ in range(3)]
    await shop.entered.wait()
    shop.hold.set()
    outcomes = await bounded(asyncio.gather(*sends, return_exceptions=True))
    assert [type(o) for o in outcomes] == [TransientError] * 3
    assert shop.runs["a"] == 1


@pytest.mark.parametrize("steps", range(6))
async def test_when_the_first_send_is_cancelled_a_waiter_runs_the_command(steps):
    """The first send cancelled at any await point: the sends waiting for it are not
    cancelled; one runs the command (its write replays if the first's landed), all get the
    same response, and nothing is left in flight."""
    shop = Shop(InMemoryRepository(Order))
    shop.hold = asyncio.Event()
    command = AddItem(order_id="o", item="a")
    first = asyncio.ensure_future(shop.add(command))
    await asyncio.sleep(0)
    waiting = [asyncio.ensure_future(shop.add(command)) for _ in range(3)]
    for _ in range(steps):
        await asyncio.sleep(0)
    first.cancel()
    shop.hold.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    receipts = await bounded(asyncio.gather(*waiting))
    assert receipts == [Receipt("o", 1, ("a",))] * 3
    assert await shop.items() == ["a"]
    assert len(IN_FLIGHT) == 0


async def test_a_waiter_gets_the_timeout_of_the_send_it_waits_for():
    """Sends waiting for a first send that never ends are bounded by the timeout inside:
    they get its `CommandTimeoutError`, and nothing is left in flight."""
    store = InMemoryRepository(Order)
    clock = FakeClock(autojump=False)
    hang = asyncio.Event()

    @idempotent(store)
    @timeout(5, clock=clock)
    async def add(command: AddItem) -> Receipt:
        await hang.wait()
        raise AssertionError("never")

    command = AddItem(order_id="o", item="a")
    sends = [asyncio.ensure_future(add(command)) for _ in range(3)]
    for _ in range(3):
        await asyncio.sleep(0)
    clock.advance(5)
    outcomes = await bounded(asyncio.gather(*sends, return_exceptions=True))
    assert [type(o) for o in outcomes] == [CommandTimeoutError] * 3
    assert len(IN_FLIGHT) == 0


def test_the_same_command_from_event_loops_on_two_threads_runs_once():
    """Sent at once from loops on two threads, a command runs once and both sends get its
    response (the second is told on its own loop)."""
    store = InMemoryRepository(Order)
    runs = 0
    started, release = threading.Event(), threading.Event()

    @idempotent(store)
    async def add(command: AddItem) -> Receipt:
        nonlocal runs
        runs += 1
        started.set()
        await asyncio.to_thread(release.wait, BOUND_S)
        stored = await store.persist(Order(id=command.order_id, items=[command.item]))
        return Receipt(stored.id, stored.version, tuple(stored.items))

    command = AddItem(order_id="o", item="a")
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(asyncio.run(add(command))))]
    threads[0].start()
    assert started.wait(BOUND_S)
    threads.append(threading.Thread(target=lambda: results.append(asyncio.run(add(command)))))
    threads[1].start()
    flight = IN_FLIGHT._flights[(id(store), command.command_id)]
    while not flight.waiters:  # the second send joined the first (no sleep: it spins)
        threads[1].join(0.001)
    release.set()
    for thread in threads:
        thread.join(BOUND_S)
    assert results == [Receipt("o", 1, ("a",))] * 2
    assert runs == 1


# --- in flight in another process -------------------------------------------------------------


async def test_a_send_in_flight_elsewhere_is_waited_for_and_its_response_returned(
    durable_store,
):
    """Another process (another repository on the database) has the command in flight, its
    write made: this process's send waits, and gets that send's response; it never runs."""
    clock = FakeClock(autojump=False)
    here = Shop(durable_store.open(Order, clock=clock))
    elsewhere = Shop(durable_store.open(Order, clock=clock))
    elsewhere.hold = asyncio.Event()
    command = AddItem(order_id="o", item="a")
    theirs = asyncio.ensure_future(elsewhere.add(command))
    await elsewhere.entered.wait()  # written: its claim is in the database
    mine = asyncio.ensure_future(here.add(command))
    await bounded(clock.wait_for_sleepers(1))  # this send looks again after a pause
    assert not mine.done()
    elsewhere.hold.set()
    assert await theirs == Receipt("o", 1, ("a",))
    clock.advance(1)
    assert await bounded(mine) == Receipt("o", 1, ("a",))
    assert here.runs["a"] == 0


async def test_a_send_in_flight_elsewhere_for_longer_than_wait_s_is_in_progress(
    durable_store,
):
    """A send finding the command in flight in another process for longer than `wait_s`
    raises `CommandInProgressError`; nothing ran here."""
    clock = FakeClock()
    here = Shop(durable_store.open(Order, clock=clock), wait_s=2)
    elsewhere = Shop(durable_store.open(Order, clock=clock), wait_s=60)
    elsewhere.hold = asyncio.Event()
    command = AddItem(order_id="o", item="a")
    theirs = asyncio.ensure_future(elsewhere.add(command))
    await elsewhere.entered.wait()
    with pytest.raises(CommandInProgressError):
        await bounded(here.add(command))
    assert here.runs["a"] == 0
    elsewhere.hold.set()
    await theirs


async def test_a_claim_left_by_a_send_that_never_finished_lapses(durable_store):
    """A send whose process stopped after its write (its claim left behind): after `wait_s`
    a resend runs the command again, its write replays, and its response is recorded."""
    clock = FakeClock()
    gone = Shop(durable_store.open(Order, clock=clock), wait_s=5)
    gone.hold = asyncio.Event()
    command = AddItem(order_id="o", item="a")
    lost = asyncio.ensure_future(gone.add(command))
    await gone.entered.wait()
    clock.advance(6)  # the claim lapsed; the send still hangs (its process is "dead")
    here = Shop(durable_store.open(Order, clock=clock), wait_s=5)
    receipt = await bounded(here.add(command))
    assert receipt == Receipt("o", 1, ("a",))
    assert here.runs["a"] == 1
    assert await here.items() == ["a"]
    lost.cancel()


# --- what is recorded -------------------------------------------------------------------------


async def test_a_response_that_would_not_read_back_is_refused_at_the_first_send(make_store):
    """A response that does not read back equal as the return annotation, or is bigger than
    the store takes, is `InvalidResponseError` naming the command at the first send; the
    write stays, nothing is recorded, a resend runs again (and replays its write)."""
    store = make_store(Order, max_state_bytes=200)
    runs: Counter[str] = Counter()

    @idempotent(store)
    async def add(command: AddItem) -> dict[str, float]:
        runs[command.item] += 1
        found = await store.retrieve([command.order_id])
        order = found[0] if found else Order(id=command.order_id)
        await store.persist(msgspec.structs.replace(order, items=[*order.items, command.item]))
        if command.item == "nan":
            return {"x": math.nan}
        if command.item == "big":
            return {f"k{n}": float(n) for n in range(100)}
        return {"a": "not a number"}  # type: ignore[dict-item]

    for item in ("wrong", "nan", "big"):
        command = AddItem(order_id="o", item=item)
        with pytest.raises(InvalidResponseError, match=command.command_id):
            await bounded(add(command))
        with pytest.raises(InvalidResponseError):  # at once: the first send left no claim
            await bounded(add(command))
        assert runs[item] == 2
    [order] = await store.retrieve(["o"])
    assert order.items == ["wrong", "nan", "big"]


def test_a_function_without_a_return_annotation_or_sync_is_refused_when_decorated():
    """`idempotent()` needs the return type to decode resends, and an async function."""
    store = InMemoryRepository(Order)

    async def unannotated(command):  # type: ignore[no-untyped-def]
        return 1

    def sync(command: AddItem) -> int:
        return 1

    with pytest.raises(TypeError, match="return annotation"):
        idempotent(store)(unannotated)
    with pytest.raises(TypeError, match="async"):
        idempotent(store)(sync)
    with pytest.raises(TypeError, match="store"):
        idempotent(object())  # type: ignore[arg-type]


async def test_a_call_without_a_command_runs_as_it_is():
    """Nothing to answer by: a call whose argument is no command just runs."""
    runs = 0

    @idempotent(InMemoryRepository(Order))
    async def ping(value: int) -> int:
        nonlocal runs
        runs += 1
        return value

    assert [await ping(1), await ping(1)] == [1, 1]
    assert runs == 2


# --- the handler classes ------------------------------------------------------------------------


class AddItemHandler(RetryableCommandHandler[Receipt]):
    """Appends the item; `responses` is set per test."""

    runs = 0

    async def process(self, command: AddItem) -> CommandResponse[Receipt]:
        AddItemHandler.runs += 1
        found = await self.dispatcher.retrieve([command.order_id])
        order = found[0] if found else Order(id=command.order_id)
        stored = await self.dispatcher.persist(
            msgspec.structs.replace(order, items=[*order.items, command.item])
        )
        return CommandResponse(result=Receipt(stored.id, stored.version, tuple(stored.items)))


async def test_a_handler_with_responses_answers_a_resend_before_any_behavior(make_store):
    """`responses = store`: a resend gets the first `CommandResponse[Receipt]` even when the
    behaviors inside would refuse the call now (an open circuit breaker)."""
    store = make_store(Order)
    breaker = circuit_breaker(minimum_throughput=2, failure_ratio=0.5)
    handler = AddItemHandler(store)
    handler.responses = store
    handler.add_behavior(breaker)
    AddItemHandler.runs = 0
    command = AddItem(order_id="o", item="a")
    first = await handler.handle(command)
    assert isinstance(first.result, Receipt)
    guarded = pipeline(breaker)(_failing)
    with pytest.raises(TransientError):  # one success, one failure: the circuit opens
        await guarded(AddItem(order_id="x", item="x"))
    with pytest.raises(BrokenCircuitError):
        await handler.handle(AddItem(order_id="o", item="b"))
    assert await handler.handle(command) == first
    assert AddItemHandler.runs == 1


async def _failing(command: AddItem) -> None:
    raise TransientError("down")


def _send_and_hang(path: str, command: AddItem, written: Any) -> None:
    """In a child process: send the command, say its write is made, and hang until killed."""
    from cqrs_resilience.stores import SQLiteRepository

    async def main() -> None:
        store = SQLiteRepository(path, Order)
        shop = Shop(store, wait_s=1.0)
        shop.hold = asyncio.Event()
        sending = asyncio.ensure_future(shop.add(command))
        await shop.entered.wait()
        written.set()
        await sending

    asyncio.run(main())


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
async def test_a_process_killed_mid_command_holds_its_resend_up_at_most_wait_s(tmp_path):
    """SIGKILL a process after its send's write and before its response: a resend in another
    process waits, runs the command once the claim lapsed (`wait_s` after the write), its
    write replays (the item is there once), and its response is recorded for the next."""
    from cqrs_resilience.stores import SQLiteRepository

    path = tmp_path / "db"
    command = AddItem(order_id="o", item="a")
    context = multiprocessing.get_context("spawn")
    written = context.Event()
    child = context.Process(target=_send_and_hang, args=(str(path), command, written))
    child.start()
    assert await asyncio.to_thread(written.wait, BOUND_S), "the child never wrote"
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    await asyncio.to_thread(child.join, BOUND_S)
    async with SQLiteRepository(path, Order) as store:
        shop = Shop(store, wait_s=1.0)
        receipt = await bounded(shop.add(command))
        assert receipt == Receipt("o", 1, ("a",))
        assert await shop.items() == ["a"]
        assert await bounded(shop.add(command)) == receipt
        assert shop.runs["a"] == 1


async def test_idempotent_composes_outermost_in_a_pipeline(make_store):
    """`pipeline(idempotent(store), timeout(...), retry())(fn)`: a transient failure is
    retried inside, the response recorded once, and a resend answered without a retry."""
    store = make_store(Order)
    calls: Counter[str] = Counter()

    async def add(command: AddItem) -> Receipt:
        calls[command.item] += 1
        if calls[command.item] == 1:
            raise TransientError("the first attempt fails")
        stored = await store.persist(Order(id=command.order_id, items=[command.item]))
        return Receipt(stored.id, stored.version, tuple(stored.items))

    send = pipeline(idempotent(store), timeout(10), retry(clock=FakeClock()))(add)
    command = AddItem(order_id="o", item="a")
    assert await send(command) == await send(command) == Receipt("o", 1, ("a",))
    assert calls["a"] == 2


@pytest.mark.parametrize("when", ["constructor", "after a first handle()"])
async def test_responses_set_at_construction_or_after_a_first_call_answer_resends(
    make_store, when: str
):
    """`responses=` in the constructor, or `handler.responses = store` after the handler has
    already handled a command, answers resends from then on: never silently ignored."""
    store = make_store(Order)
    AddItemHandler.runs = 0
    if when == "constructor":
        handler = AddItemHandler(store, responses=store)
    else:
        handler = AddItemHandler(store)
        await handler.handle(AddItem(order_id="o", item="warm-up"))  # builds the pipeline
        handler.responses = store
    runs = AddItemHandler.runs
    command = AddItem(order_id="o", item="a")
    first = await handler.handle(command)
    assert await handler.handle(command) == first
    assert AddItemHandler.runs == runs + 1  # the resend was answered, not run
