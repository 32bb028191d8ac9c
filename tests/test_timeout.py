"""timeout(): when a call is cut off, what the caller sees, and the deadline everything inside
it honors."""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
from typing import Any

import pytest

from cqrs_resilience import (
    CommandTimeoutError,
    CqrsResilienceError,
    FakeClock,
    FixedRetryPolicy,
    HookRegistry,
    SystemClock,
    TransientError,
    pipeline,
    retry,
    timeout,
)
from cqrs_resilience._deadline import time_left

FOUR_SECONDS = FixedRetryPolicy(max_retries=5, delay_ms=4000, jitter=False)


def sleeper(clock: FakeClock) -> Any:
    """An async handler that sleeps `seconds` on the clock and returns the time it woke."""

    async def sleep_for(seconds: float) -> float:
        await clock.sleep(seconds)
        return clock.now

    return sleep_for


async def test_a_call_within_its_time_returns_its_result(clock: FakeClock) -> None:
    """A call that ends before the deadline returns as if undecorated."""
    assert await timeout(2, clock=clock)(sleeper(clock))(1.5) == 1.5


async def test_a_call_past_its_deadline_raises_command_timeout_error(clock: FakeClock) -> None:
    """At the deadline the call is cancelled and CommandTimeoutError raised from it."""
    with pytest.raises(CommandTimeoutError, match=r"sleep_for timed out after 2 s") as info:
        await timeout(2, clock=clock)(sleeper(clock))(5)
    assert type(info.value) is CommandTimeoutError
    assert isinstance(info.value.__cause__, asyncio.CancelledError)
    assert clock.now == 2  # the fake sleep was cut short at the deadline
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_command_timeout_is_still_a_builtin_timeout_error(clock: FakeClock) -> None:
    """Code written for the builtin keeps working: `except TimeoutError` catches the timeout,
    and retry()'s defaults retry it, as they retry any TimeoutError."""
    try:
        await timeout(2, clock=clock)(sleeper(clock))(5)
    except TimeoutError as exc:
        caught: BaseException = exc
    assert isinstance(caught, CommandTimeoutError) and isinstance(caught, CqrsResilienceError)
    attempts: list[float] = []

    async def hangs_twice() -> str:
        attempts.append(clock.now)
        if len(attempts) < 3:
            await clock.sleep(60)
        return "ok"

    handler = retry(FOUR_SECONDS, clock=clock)(timeout(2, clock=clock)(hangs_twice))
    assert await handler() == "ok"
    assert attempts == [2, 8, 14]


async def test_fake_time_passing_the_deadline_fires_it() -> None:
    """With a manual clock the call times out exactly when advance() passes the deadline."""
    clock = FakeClock(autojump=False)
    task = asyncio.create_task(timeout(2, clock=clock)(sleeper(clock))(60))
    await clock.wait_for_sleepers(1)
    clock.advance(1.9)
    await asyncio.sleep(0)
    assert not task.done()
    clock.advance(0.1)
    with pytest.raises(TimeoutError):
        await task


async def test_the_system_clock_times_out_on_the_loop() -> None:
    """Without a clock the loop's own timer fires; a quick call is untouched."""
    assert await timeout(5)(asyncio.sleep)(0, "fast") == "fast"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await timeout(0.01, clock=SystemClock())(asyncio.sleep)(60)
    assert loop.time() - started < 5


async def test_a_clock_without_timers_is_waited_on_by_sleeping() -> None:
    """A user's clock that can only sleep still drives the timeout."""
    fake = FakeClock(autojump=False)

    class SleepOnlyClock:
        def monotonic(self) -> float:
            return fake.monotonic()

        def time(self) -> float:
            return fake.time()

        async def sleep(self, seconds: float) -> None:
            await fake.sleep(seconds)

        def sleep_sync(self, seconds: float) -> None:
            fake.sleep_sync(seconds)

    task = asyncio.create_task(timeout(3, clock=SleepOnlyClock())(sleeper(fake))(60))
    await fake.wait_for_sleepers(2)  # the call and the timeout's own timer
    fake.advance(3)
    with pytest.raises(TimeoutError):
        await task


async def test_outer_cancellation_propagates_at_once_as_cancelled_error() -> None:
    """Cancelling the caller mid-call cancels it; it is never turned into a TimeoutError."""
    clock = FakeClock(autojump=False)
    task = asyncio.create_task(timeout(2, clock=clock)(sleeper(clock))(60))
    await clock.wait_for_sleepers(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    clock.advance(10)  # the timer finds nothing left to cancel
    await asyncio.sleep(0)


async def test_outer_cancellation_with_the_system_clock() -> None:
    """The same with the loop's timer: a cancel from outside is a CancelledError."""
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(timeout(3600)(hang)())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_outer_cancel_at_the_deadline_still_wins() -> None:
    """A cancel from outside and the deadline in the same instant: the cancel propagates."""
    clock = FakeClock(autojump=False)
    task = asyncio.create_task(timeout(2, clock=clock)(sleeper(clock))(60))
    await clock.wait_for_sleepers(1)
    task.cancel()
    clock.advance(2)
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_call_that_swallows_the_cancellation_keeps_its_result(clock: FakeClock) -> None:
    """A call that catches the cancellation and returns is not failed; the task is left clean."""

    async def stubborn() -> str:
        try:
            await clock.sleep(10)
        except asyncio.CancelledError:
            return "kept"
        return "slept"

    assert await timeout(1, clock=clock)(stubborn)() == "kept"
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_other_errors_pass_through_untouched(clock: FakeClock) -> None:
    """An error raised inside propagates itself, whatever the timeout."""
    error = TransientError("down")

    async def fails() -> None:
        raise error

    with pytest.raises(TransientError) as info:
        await timeout(1, clock=clock)(fails)()
    assert info.value is error


async def test_the_deadline_is_seen_two_calls_deep(clock: FakeClock) -> None:
    """A retry inside a helper inside the timed call gives up when its next wait would pass the
    deadline: never sleeping past it, with a note saying why, and the exhausted event."""
    attempts: list[float] = []

    @retry(FOUR_SECONDS, clock=clock)
    async def fetch() -> None:
        attempts.append(clock.now)
        raise TransientError("down")

    async def load() -> None:
        await fetch()

    @timeout(10, clock=clock)
    async def handle() -> None:
        await load()

    with pytest.raises(TransientError) as info:
        await handle()
    assert attempts == [0, 4, 8]
    assert clock.sleeps == [4, 4]
    assert info.value.__notes__ == [
        "gave up after 3 attempts: the next wait of 4 s would end after the deadline (2 s left)"
    ]


async def test_giving_up_at_the_deadline_emits_exhausted(
    clock: FakeClock, hooks: HookRegistry, events: list[Any]
) -> None:
    """The deadline ends retries as a spent policy does: `handler.retry.exhausted`, no delay."""

    async def fails() -> None:
        raise TransientError("down")

    with pytest.raises(TransientError):
        await timeout(5, clock=clock)(retry(FOUR_SECONDS, clock=clock, hooks=hooks)(fails))()
    names = [name for name, _ in events]
    assert names == ["handler.retry.scheduled", "handler.retry.exhausted"]
    assert events[-1][1]["delay_ms"] is None
    assert events[-1][1]["attempt"] == 1


async def test_time_spent_in_attempts_counts_against_the_deadline(clock: FakeClock) -> None:
    """The deadline is absolute: slow attempts leave less room for the waits after them."""
    calls: list[float] = []

    @retry(FixedRetryPolicy(max_retries=5, delay_ms=1000, jitter=False), clock=clock)
    async def slow_and_failing() -> None:
        calls.append(clock.now)
        await clock.sleep(3)
        raise TransientError("down")

    with pytest.raises(TransientError) as info:
        await timeout(7.5, clock=clock)(slow_and_failing)()
    assert calls == [0, 4]
    assert "1 s would end after the deadline (0.5 s left)" in info.value.__notes__[0]


async def test_nested_timeouts_keep_the_earliest_deadline(clock: FakeClock) -> None:
    """Inside timeout(10) a timeout(3) tightens the deadline; inside timeout(3) a timeout(10)
    does not loosen it; leaving each restores the one around it."""

    async def left() -> float | None:
        return time_left()

    @timeout(10, clock=clock)
    async def outer_loose() -> tuple[float | None, float | None, float | None]:
        inner = await timeout(3, clock=clock)(left)()
        return await left(), inner, None

    @timeout(3, clock=clock)
    async def outer_tight() -> tuple[float | None, float | None, float | None]:
        inner = await timeout(10, clock=clock)(left)()
        return await left(), inner, None

    assert await outer_loose() == (10, 3, None)
    assert await outer_tight() == (3, 3, None)
    assert time_left() is None


async def test_nested_timeouts_on_different_clocks_compare_time_left() -> None:
    """Deadlines on two clocks are compared by the time each has left."""
    late = FakeClock(start=1000.0)
    early = FakeClock()

    async def left() -> float | None:
        return time_left()

    assert await timeout(2, clock=early)(timeout(5, clock=late)(left))() == 2
    assert await timeout(5, clock=late)(timeout(2, clock=early)(left))() == 2


async def test_the_inner_deadline_fires_the_outer_timeout_too(clock: FakeClock) -> None:
    """An outer timeout's deadline ends a call inside a looser inner timeout."""
    with pytest.raises(TimeoutError, match="after 2 s"):
        await timeout(2, clock=clock)(timeout(10, clock=clock)(sleeper(clock)))(60)
    assert clock.now == 2


async def test_a_timeout_error_is_retried_by_an_outer_retry(clock: FakeClock) -> None:
    """pipeline(retry(), timeout(2)): an attempt that hangs times out and is tried again."""
    calls: list[float] = []

    async def hangs_once() -> str:
        calls.append(clock.now)
        if len(calls) == 1:
            await clock.sleep(60)
        return "ok"

    policy = FixedRetryPolicy(max_retries=3, delay_ms=500, jitter=False)
    handler = pipeline(retry(policy, clock=clock), timeout(2, clock=clock))(hangs_once)
    assert await handler() == "ok"
    assert calls == [0, 2.5]


async def test_an_overall_deadline_around_per_attempt_timeouts(clock: FakeClock) -> None:
    """pipeline(timeout(10), retry(), timeout(2)): 2 s attempts, 10 s in all (as in Polly)."""
    calls: list[float] = []

    async def hangs() -> None:
        calls.append(clock.now)
        await clock.sleep(60)

    policy = FixedRetryPolicy(max_retries=10, delay_ms=1000, jitter=False)
    handler = pipeline(
        timeout(10, clock=clock), retry(policy, clock=clock), timeout(2, clock=clock)
    )(hangs)
    with pytest.raises(TimeoutError, match="after 10 s"):
        await handler()
    assert calls == [0, 3, 6, 9]
    assert clock.now == 10


async def test_calls_ending_out_of_order_each_get_their_own_deadline() -> None:
    """Many overlapping calls started at different times: exactly the late ones time out."""
    clock = FakeClock(autojump=False)
    behavior = timeout(10, clock=clock)
    durations = [3 + (i * 7) % 15 + 0.25 for i in range(40)]
    tasks = []
    for duration in durations:
        tasks.append(asyncio.create_task(behavior(sleeper(clock))(duration)))
        await asyncio.sleep(0)
        clock.advance(0.5)
    while not all(task.done() for task in tasks):
        clock.advance(0.5)
        for _ in range(3):
            await asyncio.sleep(0)
    for task, duration in zip(tasks, durations, strict=True):
        if duration > 10:
            assert isinstance(task.exception(), TimeoutError), duration
        else:
            assert task.result() > 0, duration


async def test_quick_calls_behind_a_slow_one_do_not_pile_up() -> None:
    """Thousands of calls ending behind one slow call leave a bounded queue; the slow one
    still times out."""
    clock = FakeClock(autojump=False)
    behavior = timeout(5, clock=clock)

    async def quick() -> None:
        await asyncio.sleep(0)

    slow = asyncio.create_task(behavior(sleeper(clock))(60))
    await clock.wait_for_sleepers(1)
    for _ in range(2000):
        await behavior(quick)()
    assert behavior._queue is not None
    assert len(behavior._queue.entries) < 200
    clock.advance(5)
    with pytest.raises(TimeoutError):
        await slow


async def test_each_event_loop_gets_its_own_timers() -> None:
    """One behavior used from a second event loop (another thread) works there, and a call
    still running on the first loop still times out."""
    behavior = timeout(0.05)

    async def ok() -> str:
        await asyncio.sleep(0)
        return "ok"

    slow = asyncio.create_task(behavior(asyncio.sleep)(60))
    await asyncio.sleep(0)
    assert await asyncio.to_thread(asyncio.run, behavior(ok)()) == "ok"
    assert await behavior(ok)() == "ok"
    with pytest.raises(TimeoutError):
        await slow


def test_sync_functions_are_refused_when_decorated() -> None:
    """A sync call cannot be cancelled, so decorating one fails at once, naming it."""

    def legacy() -> None: ...

    with pytest.raises(TypeError, match=r"async functions only, and .*legacy is a sync"):
        timeout(1)(legacy)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async function"):
        timeout(1)(42)  # type: ignore[arg-type]


async def test_an_async_function_behind_a_lambda_or_a_plain_decorator_is_timed(
    clock: FakeClock,
) -> None:
    """A lambda, or a decorator without `async def` that kept the metadata, returning an
    async function's coroutine is timed like that function."""
    sleep_for = sleeper(clock)

    def plain(fn: Any) -> Any:
        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            return fn(*args)

        return call

    for disguised in (lambda seconds: sleep_for(seconds), plain(sleep_for)):
        timed = timeout(2, clock=clock)(disguised)
        assert await timed(1.0) == clock.now
        with pytest.raises(TimeoutError):
            await timed(60)


async def test_a_lambda_that_runs_a_sync_function_is_a_type_error_naming_it(
    clock: FakeClock,
) -> None:
    """A lambda whose call returns no awaitable gets a TypeError saying it ran as a sync
    function, not "can't be used in 'await' expression"."""
    timed = timeout(2, clock=clock)(lambda: 42)
    with pytest.raises(TypeError, match="<lambda> returned int, not an awaitable"):
        await timed()


@pytest.mark.parametrize("seconds", [0, -1, math.inf, math.nan, True, "2", None])
def test_bad_seconds_are_rejected(seconds: Any) -> None:
    """seconds must be a positive finite number; the error names it."""
    with pytest.raises(ValueError, match="seconds"):
        timeout(seconds)


async def transfer(account: str, amount: int, *, memo: str = "") -> str:
    """Move money (async code)."""
    return f"{account}:{amount}:{memo}"


async def test_wrapping_keeps_signature_name_and_docstring() -> None:
    """A wrapped function looks like the original to callers and introspection."""
    wrapped = timeout(1)(transfer)
    assert wrapped.__name__ == "transfer"
    assert wrapped.__doc__ == transfer.__doc__
    assert wrapped.__wrapped__ is transfer  # type: ignore[attr-defined]
    assert inspect.signature(wrapped) == inspect.signature(transfer)
    assert inspect.iscoroutinefunction(wrapped)
    assert await wrapped("a", 1, memo="m") == "a:1:m"
    assert repr(timeout(1.5)) == "timeout(1.5)"
