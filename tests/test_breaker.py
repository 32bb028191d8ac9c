"""circuit_breaker(): when it opens, what an open circuit does, the half-open trial, events."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import pickle
import threading
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cqrs_resilience import (
    CIRCUIT_CLOSED,
    CIRCUIT_HALF_OPENED,
    CIRCUIT_OPENED,
    BrokenCircuitError,
    CircuitBreaker,
    Command,
    ConfigurationError,
    FakeClock,
    FixedRetryPolicy,
    HookRegistry,
    TransientError,
    circuit_breaker,
    inject_faults,
    pipeline,
    retry,
)

Events = list[tuple[str, dict[str, Any]]]


class Outcomes:
    """An async function that fails with `error` while `failing` is set; counts its calls."""

    def __init__(self, error: type[BaseException] = TransientError) -> None:
        self.failing = False
        self.error = error
        self.calls = 0

    async def __call__(self, *args: Any) -> str:
        self.calls += 1
        if self.failing:
            raise self.error("down")
        return "ok"


class Order(Command[str]):
    pass


@pytest.fixture
def circuit_events(hooks: HookRegistry) -> Events:
    """Every circuit event emitted on `hooks`, as (name, context) pairs, in order."""
    seen: Events = []
    hooks.subscribe("handler.circuit.*", lambda ctx: seen.append((ctx["event"], ctx)))
    return seen


def breaker(clock: FakeClock, hooks: HookRegistry | None = None, **options: Any) -> CircuitBreaker:
    settings: dict[str, Any] = {
        "failure_ratio": 0.5,
        "minimum_throughput": 4,
        "break_duration_s": 5.0,
    }
    return circuit_breaker(clock=clock, hooks=hooks, **(settings | options))


async def outcome(fn: Any, *args: Any) -> str:
    """Call `fn`, returning "ok", the error's class name, or "refused"."""
    try:
        return str(await fn(*args))
    except BrokenCircuitError:
        return "refused"
    except Exception as exc:
        return type(exc).__name__


async def open_circuit(fn: Any, target: Outcomes, calls: int = 4) -> None:
    target.failing = True
    for _ in range(calls):
        await outcome(fn)


async def test_opens_at_the_failure_ratio_once_throughput_is_reached(clock: FakeClock) -> None:
    """With 2 of 4 calls failed (ratio 0.5) the 4th call opens the circuit, not before."""
    target = Outcomes()
    cb = breaker(clock)
    fn = cb(target)
    assert [await outcome(fn), await outcome(fn)] == ["ok", "ok"]
    target.failing = True
    assert await outcome(fn) == "TransientError"
    assert cb.state == "closed"  # 1 of 3 failed, and fewer than 4 calls
    assert await outcome(fn) == "TransientError"
    assert cb.state == "open"
    assert await outcome(fn) == "refused"
    assert target.calls == 4


async def test_stays_closed_below_minimum_throughput(clock: FakeClock) -> None:
    """Every call failing opens nothing until minimum_throughput calls were seen."""
    target = Outcomes()
    cb = breaker(clock, minimum_throughput=10)
    fn = cb(target)
    await open_circuit(fn, target, calls=9)
    assert cb.state == "closed"
    assert await outcome(fn) == "TransientError"
    assert cb.state == "open"


async def test_stays_closed_below_the_failure_ratio(clock: FakeClock) -> None:
    """4 failures in 10 calls at failure_ratio=0.5 keep the circuit closed."""
    target = Outcomes()
    cb = breaker(clock, minimum_throughput=10)
    fn = cb(target)
    for failing in [True] * 4 + [False] * 6:
        target.failing = failing
        await outcome(fn)
    assert cb.state == "closed"


async def test_old_outcomes_slide_out_of_the_window(clock: FakeClock) -> None:
    """Failures older than sampling_duration_s no longer count; recent ones still do."""
    target = Outcomes()
    cb = breaker(clock, sampling_duration_s=10.0)
    fn = cb(target)
    await open_circuit(fn, target, calls=3)
    clock.advance(10.0)
    assert await outcome(fn) == "TransientError"
    assert cb.state == "closed"  # the three earlier failures left the window
    clock.advance(8.0)  # still inside the window: 1 + 3 failures
    await open_circuit(fn, target, calls=3)
    assert cb.state == "open"


async def test_successes_slide_out_too(clock: FakeClock) -> None:
    """Old successes stop diluting the ratio once they leave the window."""
    target = Outcomes()
    cb = breaker(clock, sampling_duration_s=10.0)
    fn = cb(target)
    for _ in range(10):
        await outcome(fn)
    clock.advance(5.0)
    await open_circuit(fn, target, calls=4)
    assert cb.state == "closed"  # 4 of 14
    clock.advance(5.0)  # the ten successes leave
    await open_circuit(fn, target, calls=1)
    assert cb.state == "open"


async def test_open_circuit_refuses_with_the_remaining_break(clock: FakeClock) -> None:
    """Refused calls never run; retry_after is the break time left; the cause is chained."""
    target = Outcomes()
    fn = breaker(clock)(target)
    await open_circuit(fn, target)
    clock.advance(2.0)
    with pytest.raises(BrokenCircuitError) as caught:
        await fn()
    assert caught.value.retry_after == pytest.approx(3.0)
    assert isinstance(caught.value.__cause__, TransientError)
    assert "3.000 s" in str(caught.value)
    assert target.calls == 4


def test_broken_circuit_error_is_plain_and_pickles() -> None:
    """BrokenCircuitError is not retryable by type, and survives pickling."""
    error = BrokenCircuitError(1.5)
    assert not isinstance(error, TransientError | ConnectionError | TimeoutError)
    again = pickle.loads(pickle.dumps(error))
    assert again.retry_after == 1.5 and str(again) == str(error)
    assert str(BrokenCircuitError(1.0, "custom")) == "custom"


async def test_a_refusal_is_an_ordinary_broken_circuit_error(clock: FakeClock) -> None:
    """What an open breaker raises (built without the error's __init__, for speed) reads,
    prints and pickles like a BrokenCircuitError made by hand."""
    target = Outcomes()
    cb = breaker(clock)
    await open_circuit(cb(target), target)
    clock.advance(1.0)
    with pytest.raises(BrokenCircuitError) as caught:
        await cb(target)()
    refusal = caught.value
    assert refusal.args == (4.0,) and type(refusal.retry_after) is float
    assert refusal.message is None and str(refusal) == str(BrokenCircuitError(4.0))
    again = pickle.loads(pickle.dumps(refusal))
    assert (again.args, str(again)) == (refusal.args, str(refusal))


async def test_retry_does_not_retry_a_refusal(clock: FakeClock) -> None:
    """retry() around an open breaker gives up at once: a refusal is not retried by default."""
    target = Outcomes()
    cb = breaker(clock)
    await open_circuit(cb(target), target)
    fn = pipeline(retry(FixedRetryPolicy(max_retries=3, delay_ms=0), clock=clock), cb)(target)
    with pytest.raises(BrokenCircuitError):
        await fn()
    assert clock.sleeps == []
    assert target.calls == 4


async def test_retry_on_refusal_waits_for_the_break(clock: FakeClock) -> None:
    """Asked to retry refusals, retry() waits at least retry_after, and the trial succeeds."""
    target = Outcomes()
    cb = breaker(clock)
    await open_circuit(cb(target), target)
    target.failing = False
    policy = FixedRetryPolicy(max_retries=1, delay_ms=0, jitter=False)
    fn = pipeline(retry(policy, on=BrokenCircuitError, clock=clock), cb)(target)
    assert await fn() == "ok"
    assert clock.sleeps == [pytest.approx(5.0)]
    assert cb.state == "closed"


async def test_one_trial_under_concurrency(clock: FakeClock) -> None:
    """After the break, of many concurrent calls exactly one runs; the rest are refused."""
    gate = asyncio.Event()
    target = Outcomes()
    cb = breaker(clock)
    await open_circuit(cb(target), target)
    target.failing = False
    reached = 0

    async def slow() -> str:
        nonlocal reached
        reached += 1
        await gate.wait()
        return "ok"

    fn = cb(slow)
    clock.advance(5.0)
    tasks = [asyncio.create_task(outcome(fn)) for _ in range(20)]
    await asyncio.sleep(0)
    assert cb.state == "half_open"
    gate.set()
    results = await asyncio.gather(*tasks)
    assert reached == 1
    assert sorted(results) == ["ok"] + ["refused"] * 19
    assert cb.state == "closed"


async def test_trial_success_closes_with_an_empty_window(clock: FakeClock) -> None:
    """A successful trial closes the circuit and forgets the failures that opened it."""
    target = Outcomes()
    cb = breaker(clock)
    fn = cb(target)
    await open_circuit(fn, target)
    clock.advance(5.0)
    target.failing = False
    assert await outcome(fn) == "ok"
    assert cb.state == "closed"
    await open_circuit(fn, target, calls=3)
    assert cb.state == "closed"  # three calls in the fresh window: below minimum_throughput


async def test_trial_failure_reopens_for_a_full_break(clock: FakeClock) -> None:
    """A failed trial opens the circuit again, for break_duration_s from the failure."""
    target = Outcomes()
    cb = breaker(clock)
    fn = cb(target)
    await open_circuit(fn, target)
    clock.advance(6.0)
    assert await outcome(fn) == "TransientError"
    assert cb.state == "open"
    with pytest.raises(BrokenCircuitError) as caught:
        await fn()
    assert caught.value.retry_after == pytest.approx(5.0)
    clock.advance(5.0)
    target.failing = False
    assert await outcome(fn) == "ok"


async def test_cancelled_trial_hands_its_turn_on(clock: FakeClock) -> None:
    """A cancelled trial counts as nothing, and the next caller makes the trial."""
    gate = asyncio.Event()
    target = Outcomes()
    cb = breaker(clock)
    await open_circuit(cb(target), target)

    async def hangs() -> str:
        await gate.wait()
        return "ok"

    clock.advance(5.0)
    trial = asyncio.create_task(cb(hangs)())
    await asyncio.sleep(0)
    assert await outcome(cb(target)) == "refused"
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert cb.state == "half_open"
    target.failing = False
    assert await outcome(cb(target)) == "ok"
    assert cb.state == "closed"


async def test_cancellation_never_counts_while_closed(clock: FakeClock) -> None:
    """Cancelled calls are neither failures nor successes in the window."""
    target = Outcomes(error=asyncio.CancelledError)
    cb = breaker(clock, minimum_throughput=2, failure_ratio=1.0)
    fn = cb(target)
    target.failing = True
    for _ in range(5):
        with pytest.raises(asyncio.CancelledError):
            await fn()
    target.error = TransientError
    assert await outcome(fn) == "TransientError"
    assert cb.state == "closed"  # one call counted, no success diluting it
    assert await outcome(fn) == "TransientError"
    assert cb.state == "open"


async def test_a_hung_trial_does_not_hold_the_circuit(clock: FakeClock) -> None:
    """A trial still running after break_duration_s loses its turn; its late outcome is moot."""
    gate = asyncio.Event()
    target = Outcomes()
    cb = breaker(clock)
    await open_circuit(cb(target), target)

    async def hangs() -> str:
        await gate.wait()
        raise TransientError("late")

    clock.advance(5.0)
    stuck = asyncio.create_task(outcome(cb(hangs)))
    await asyncio.sleep(0)
    clock.advance(4.9)
    assert await outcome(cb(target)) == "refused"
    clock.advance(0.1)
    target.failing = False
    assert await outcome(cb(target)) == "ok"
    assert cb.state == "closed"
    gate.set()
    assert await stuck == "TransientError"
    assert cb.state == "closed"


async def test_one_breaker_on_two_functions_is_one_circuit(clock: FakeClock) -> None:
    """Failures of one function open the circuit for the other too."""
    first, second = Outcomes(), Outcomes()
    cb = breaker(clock)
    await open_circuit(cb(first), first, calls=2)
    await open_circuit(cb(second), second, calls=2)
    assert cb.state == "open"
    first.failing = False
    assert await outcome(cb(first)) == "refused"


async def test_events_and_their_contexts(
    clock: FakeClock, hooks: HookRegistry, circuit_events: Events
) -> None:
    """Opened, half-opened and closed are emitted once each, with what happened."""
    target = Outcomes()
    cb = breaker(clock, hooks)
    fn = cb(target)
    await open_circuit(fn, target)
    await outcome(fn)  # refused: no event
    clock.advance(5.0)
    target.failing = False
    await fn(Order())
    assert [name for name, _ in circuit_events] == [
        CIRCUIT_OPENED,
        CIRCUIT_HALF_OPENED,
        CIRCUIT_CLOSED,
    ]
    opened, half_opened, closed = (ctx for _, ctx in circuit_events)
    assert isinstance(opened["error"], TransientError)
    assert opened["failure_ratio"] == 1.0 and opened["throughput"] == 4
    assert opened["break_duration_s"] == 5.0
    assert opened["handler.type"] == half_opened["handler.type"] == "Outcomes"
    assert half_opened["error"] is None and closed["error"] is None
    assert closed["command.type"] == "Order"
    assert set(opened) == set(half_opened) == set(closed)


async def test_failed_trial_reports_a_reopening(
    clock: FakeClock, hooks: HookRegistry, circuit_events: Events
) -> None:
    """A failed trial emits opened again, without window figures."""
    target = Outcomes()
    cb = breaker(clock, hooks)
    fn = cb(target)
    await open_circuit(fn, target)
    clock.advance(5.0)
    await outcome(fn)
    names = [name for name, _ in circuit_events]
    assert names == [CIRCUIT_OPENED, CIRCUIT_HALF_OPENED, CIRCUIT_OPENED]
    reopened = circuit_events[-1][1]
    assert reopened["failure_ratio"] is None and reopened["throughput"] is None
    assert isinstance(reopened["error"], TransientError)


async def test_opening_is_logged(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """An opened circuit is logged at WARNING, with nobody subscribed."""
    target = Outcomes()
    with caplog.at_level(logging.WARNING, logger="cqrs_resilience"):
        await open_circuit(breaker(clock)(target), target)
    assert any("circuit opened" in r.message for r in caplog.records)


async def test_other_errors_count_as_successes(clock: FakeClock) -> None:
    """By default a ValueError is an answer, not an outage: it neither opens nor fails a trial."""
    target = Outcomes(error=ValueError)
    cb = breaker(clock)
    fn = cb(target)
    await open_circuit(fn, target, calls=10)
    assert cb.state == "closed"
    target.error = TransientError
    await open_circuit(fn, target, calls=10)
    clock.advance(5.0)
    target.error = ValueError
    assert await outcome(fn) == "ValueError"
    assert cb.state == "closed"


async def test_on_picks_the_failures(clock: FakeClock) -> None:
    """With on=ValueError, ValueErrors open the circuit and TransientErrors do not."""
    target = Outcomes(error=TransientError)
    cb = breaker(clock, on=ValueError)
    fn = cb(target)
    await open_circuit(fn, target, calls=10)
    assert cb.state == "closed"
    target.error = ValueError
    await open_circuit(fn, target, calls=10)
    assert cb.state == "open"


async def test_on_takes_a_predicate(clock: FakeClock) -> None:
    """A predicate decides per exception."""
    target = Outcomes()
    cb = breaker(clock, on=lambda exc: "down" in str(exc))
    await open_circuit(cb(target), target)
    assert cb.state == "open"


def test_sync_functions(clock: FakeClock) -> None:
    """A sync function is wrapped in place: it opens, refuses, and closes after a trial."""
    calls = 0
    failing = True

    @breaker(clock)
    def legacy(x: int) -> int:
        """A legacy function."""
        nonlocal calls
        calls += 1
        if failing:
            raise ConnectionError("down")
        return x * 2

    assert not inspect.iscoroutinefunction(legacy)
    for _ in range(4):
        with pytest.raises(ConnectionError):
            legacy(1)
    with pytest.raises(BrokenCircuitError) as caught:
        legacy(1)
    assert caught.value.retry_after == 5.0
    assert calls == 4
    clock.advance(5.0)
    failing = False
    assert legacy(2) == 4
    assert legacy.__name__ == "legacy" and legacy.__doc__ == "A legacy function."


def test_sync_cancellation_of_a_trial_releases_it(clock: FakeClock) -> None:
    """A KeyboardInterrupt in a sync trial counts as nothing and hands the turn on."""
    cb = breaker(clock)
    state = {"error": ConnectionError}

    @cb
    def legacy() -> str:
        raise state["error"]()

    for _ in range(4):
        with pytest.raises(ConnectionError):
            legacy()
    clock.advance(5.0)
    state["error"] = KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        legacy()
    assert cb.state == "half_open"
    state["error"] = ConnectionError
    with pytest.raises(ConnectionError):
        legacy()  # the next caller made the trial, and it failed
    assert cb.state == "open"


def test_sync_events_are_emitted(
    clock: FakeClock, hooks: HookRegistry, circuit_events: Events
) -> None:
    """Sync functions report the same events."""
    fn = breaker(clock, hooks, on=ZeroDivisionError)(lambda: 1 / 0)
    for _ in range(4):
        with pytest.raises(ZeroDivisionError):
            fn()
    clock.advance(5.0)
    with pytest.raises(ZeroDivisionError):
        fn()
    assert [name for name, _ in circuit_events] == [
        CIRCUIT_OPENED,
        CIRCUIT_HALF_OPENED,
        CIRCUIT_OPENED,
    ]


async def test_keeps_name_signature_and_asyncness(clock: FakeClock) -> None:
    """The wrapped function keeps its name, docstring and signature, and stays async."""

    async def place(order: Order, *, urgent: bool = False) -> str:
        """Place an order."""
        return "placed"

    fn = breaker(clock)(place)
    assert fn.__name__ == "place" and fn.__doc__ == "Place an order."
    assert inspect.signature(fn) == inspect.signature(place)
    assert inspect.iscoroutinefunction(fn)
    assert await fn(Order(), urgent=True) == "placed"


async def test_reset_closes_and_reports(
    clock: FakeClock, hooks: HookRegistry, circuit_events: Events
) -> None:
    """reset() closes an open circuit with an empty window and emits closed."""
    target = Outcomes()
    cb = breaker(clock, hooks)
    await open_circuit(cb(target), target)
    cb.reset()
    assert cb.state == "closed"
    assert circuit_events[-1][0] == CIRCUIT_CLOSED
    assert circuit_events[-1][1]["handler.type"] is None
    await open_circuit(cb(target), target, calls=3)
    assert cb.state == "closed"


def test_repr_names_settings_and_state(clock: FakeClock) -> None:
    """The repr shows the settings and the state."""
    text = repr(circuit_breaker(failure_ratio=0.25, clock=clock))
    assert "failure_ratio=0.25" in text and "[closed]" in text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_ratio", 0),
        ("failure_ratio", 1.5),
        ("failure_ratio", math.nan),
        ("failure_ratio", True),
        ("minimum_throughput", 1),
        ("minimum_throughput", 2.5),
        ("sampling_duration_s", 0.4),
        ("sampling_duration_s", math.inf),
        ("break_duration_s", 0),
        ("break_duration_s", -1),
        ("break_duration_s", math.nan),
        ("break_duration_s", "5"),
    ],
)
def test_invalid_settings_name_the_field(field: str, value: Any) -> None:
    """Out-of-range settings raise a ValueError naming the field."""
    with pytest.raises(ConfigurationError, match=field):
        circuit_breaker(**{field: value})


def test_on_must_be_types_or_a_predicate() -> None:
    """A wrong `on` is a TypeError that names circuit_breaker."""
    with pytest.raises(TypeError, match=r"circuit_breaker\(on=\.\.\.\)"):
        circuit_breaker(on=(TransientError, 42))  # type: ignore[arg-type]


def test_wraps_only_callables() -> None:
    """Applying a breaker to something not callable is a TypeError."""
    with pytest.raises(TypeError):
        circuit_breaker()(42)  # type: ignore[call-overload]


@given(
    failures=st.lists(st.booleans(), max_size=60),
    ratio=st.sampled_from([0.1, 0.25, 1 / 3, 0.5, 0.75, 1.0]),
    minimum=st.integers(2, 20),
)
def test_opens_exactly_when_the_counts_say(
    failures: list[bool], ratio: float, minimum: int
) -> None:
    """Within one window, the circuit opens at the first call where calls >= minimum and
    failures / calls >= ratio, and never before."""
    clock = FakeClock()
    cb = circuit_breaker(failure_ratio=ratio, minimum_throughput=minimum, clock=clock)
    state = {"fail": False}

    @cb
    def call() -> None:
        if state["fail"]:
            raise TransientError("down")

    seen = failed = 0
    for fail in failures:
        state["fail"] = fail
        with contextlib.suppress(TransientError):
            call()
        seen, failed = seen + 1, failed + fail
        expected_open = fail and seen >= minimum and failed / seen >= ratio
        assert cb.state == ("open" if expected_open else "closed")
        if expected_open:
            break
        clock.advance(0.001)


@given(st.lists(st.tuples(st.floats(0, 40), st.booleans()), max_size=40))
def test_an_outcome_older_than_the_window_never_counts(steps: list[tuple[float, bool]]) -> None:
    """Whatever happened before, after more than sampling_duration_s of quiet the window is
    empty: it takes exactly minimum_throughput fresh failures to open at failure_ratio=1."""
    clock = FakeClock()
    cb = circuit_breaker(
        failure_ratio=1.0, minimum_throughput=41, sampling_duration_s=10.0, clock=clock
    )
    state = {"fail": False}

    @cb
    def call() -> None:
        if state["fail"]:
            raise TransientError("down")

    for gap, fail in steps:  # at most 40 calls: never opens
        clock.advance(gap / 10)
        state["fail"] = fail
        with contextlib.suppress(TransientError):
            call()
    clock.advance(10.001)
    state["fail"] = True
    for _ in range(40):
        with pytest.raises(TransientError):
            call()
    assert cb.state == "closed"  # no old failure lingers
    with pytest.raises(TransientError):
        call()
    assert cb.state == "open"  # no old success lingers


def test_one_trial_across_threads(clock: FakeClock) -> None:
    """Threads calling a sync function at half-open agree on one trial."""
    gate = threading.Event()
    cb = breaker(clock, on=ZeroDivisionError)
    failing = cb(lambda: 1 / 0)
    for _ in range(4):
        with pytest.raises(ZeroDivisionError):
            failing()
    clock.advance(5.0)
    reached = []

    @cb
    def slow() -> str:
        reached.append(1)
        gate.wait(5)
        return "ok"

    results: list[str] = []

    def call() -> None:
        try:
            results.append(slow())
        except BrokenCircuitError:
            results.append("refused")

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while len(results) < 7 and time.monotonic() < deadline:  # refusals come at once
        time.sleep(0.001)
    gate.set()
    for thread in threads:
        thread.join()
    assert len(reached) == 1
    assert sorted(results) == ["ok"] + ["refused"] * 7


async def test_trial_cancelled_in_a_hook_is_released(clock: FakeClock, hooks: HookRegistry) -> None:
    """Cancelled while the half-opened hook runs, the trial never ran and hands its turn on."""
    gate = asyncio.Event()

    async def slow_hook(context: dict[str, Any]) -> None:
        await gate.wait()

    hooks.subscribe(CIRCUIT_HALF_OPENED, slow_hook)
    target = Outcomes()
    cb = breaker(clock, hooks)
    await open_circuit(cb(target), target)
    clock.advance(5.0)
    stuck = asyncio.create_task(cb(target)())
    await asyncio.sleep(0)
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    assert target.calls == 4
    hooks.clear()
    target.failing = False
    assert await outcome(cb(target)) == "ok"
    assert cb.state == "closed"


async def test_an_async_function_behind_a_lambda_is_counted(clock: FakeClock) -> None:
    """A lambda around an async function: each outcome counts when the call is awaited, the
    circuit opens on them, and its refusals come when awaited, as for the async function."""
    target = Outcomes()
    cb = breaker(clock)
    fn = cb(lambda: target())
    assert await outcome(fn) == "ok"
    await open_circuit(fn, target, calls=3)
    assert cb.state == "open" and target.calls == 4
    refused = fn()  # no error yet: a refusal is raised by the coroutine
    with pytest.raises(BrokenCircuitError):
        await refused
    assert target.calls == 4


async def test_a_lambda_call_can_be_the_trial(clock: FakeClock) -> None:
    """The first call through a lambda may be the half-open trial: its awaited outcome
    closes or reopens the circuit."""
    target = Outcomes()
    cb = breaker(clock)
    await open_circuit(cb(target), target)
    clock.advance(5.0)
    target.failing = False
    assert await outcome(cb(lambda: target())) == "ok"
    assert cb.state == "closed"
    await open_circuit(cb(target), target)
    clock.advance(5.0)
    assert await outcome(cb(lambda: target())) == "TransientError"
    assert cb.state == "open"


async def burst(seed: int, **settings: Any) -> tuple[CircuitBreaker, list[str]]:
    """200 commands through a `circuit_breaker(**settings)`, one a millisecond, 10% of them
    failing: a fault comes back at once, a success after 0.5 s, so all 200 are in flight
    together and the first outcomes the breaker counts are all failures. Returns the breaker
    and each command's outcome."""
    clock = FakeClock(autojump=False)
    cb = circuit_breaker(clock=clock, **settings)

    async def work() -> str:
        await clock.sleep(0.5)
        return "ok"

    handler = cb(inject_faults(0.1, seed=seed)(work))
    tasks = []
    for _ in range(200):
        tasks.append(asyncio.create_task(outcome(handler)))
        await asyncio.sleep(0)  # the command runs up to its sleep, or fails, or is refused
        clock.advance(0.001)
    clock.advance(0.5)
    return cb, await asyncio.gather(*tasks)


@pytest.mark.parametrize("seed", range(5))
async def test_a_burst_at_a_ten_percent_fault_rate_keeps_the_default_circuit_closed(
    seed: int,
) -> None:
    """With the defaults (Polly v8's), 200 concurrent commands of which 10% fail at once are
    all let through: the early failures are fewer than minimum_throughput=100."""
    cb, outcomes = await burst(seed)
    assert (cb.failure_ratio, cb.minimum_throughput) == (0.1, 100)
    assert cb.state == "closed" and "refused" not in outcomes
    assert 10 <= outcomes.count("TransientError") <= 30
    assert outcomes.count("ok") + outcomes.count("TransientError") == 200


@pytest.mark.parametrize("seed", range(5))
async def test_the_same_burst_opened_the_circuit_under_the_old_defaults(seed: int) -> None:
    """The former defaults (failure_ratio=0.5, minimum_throughput=10) opened on the burst's
    first ten failures and refused the commands after them, though 90% would have succeeded."""
    cb, outcomes = await burst(seed, failure_ratio=0.5, minimum_throughput=10)
    assert cb.state == "open"
    assert outcomes.count("TransientError") == 10  # the tenth failure opened it
    assert 50 <= outcomes.count("refused") <= 150
