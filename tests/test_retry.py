"""retry(): what is retried, how often, how long it waits, and what the caller finally sees."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import traceback
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import tenacity

from cqrs_resilience import (
    RETRY_EXHAUSTED,
    Aggregate,
    BrokenCircuitError,
    Command,
    ConcurrencyError,
    ExponentialBackoffPolicy,
    FakeClock,
    FixedRetryPolicy,
    HookRegistry,
    InMemoryRepository,
    Retryable,
    TransientError,
    circuit_breaker,
    current_command_id,
    pipeline,
    retry,
    set_testing,
)

NO_JITTER = FixedRetryPolicy(max_retries=3, delay_ms=10, jitter=False)


class Flaky:
    """Fails with `error` the first `failures` calls, then returns the call count."""

    def __init__(self, failures: int, error: type[BaseException] | BaseException = TransientError):
        self.failures = failures
        self.error = error
        self.calls = 0

    def step(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error if isinstance(self.error, BaseException) else self.error("flaky")
        return self.calls

    async def __call__(self, *args: Any, **kwargs: Any) -> int:
        return self.step()


async def test_success_calls_once_and_never_sleeps(clock: FakeClock, events: list[Any]) -> None:
    """A call that succeeds runs once, with no sleep and no event."""
    flaky = Flaky(0)
    assert await retry(NO_JITTER, clock=clock)(flaky)() == 1
    assert flaky.calls == 1
    assert clock.sleeps == []
    assert events == []


async def test_transient_failures_are_retried_on_schedule(clock: FakeClock) -> None:
    """Two transient failures then success: three calls, two policy delays."""
    flaky = Flaky(2)
    policy = ExponentialBackoffPolicy(max_retries=5, initial_delay_ms=100, jitter=False)
    assert await retry(policy, clock=clock)(flaky)() == 3
    assert clock.sleeps == [0.1, 0.2]


async def test_max_retries_counts_retries_after_the_first_attempt(clock: FakeClock) -> None:
    """max_retries=3 means four calls at most, then the last error itself is raised."""
    errors: list[TransientError] = []

    async def always_fails() -> None:
        errors.append(TransientError(f"failure {len(errors) + 1}"))
        raise errors[-1]

    with pytest.raises(TransientError) as info:
        await retry(NO_JITTER, clock=clock)(always_fails)()
    assert len(errors) == 4
    assert info.value is errors[-1]
    assert info.value.__notes__ == ["gave up after 4 attempts: all retries used (max_retries=3)"]
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "always_fails" in frames


async def test_zero_retries_means_one_call(clock: FakeClock) -> None:
    """max_retries=0 calls once and gives up with a note."""
    flaky = Flaky(5)
    with pytest.raises(TransientError) as info:
        await retry(FixedRetryPolicy(max_retries=0), clock=clock)(flaky)()
    assert flaky.calls == 1
    assert info.value.__notes__ == ["gave up after 1 attempt: retries are off (max_retries=0)"]


@pytest.mark.parametrize("error", [ConnectionError, TimeoutError, asyncio.TimeoutError])
async def test_connection_and_timeout_errors_are_retried_by_default(
    clock: FakeClock, error: type[Exception]
) -> None:
    """ConnectionError and TimeoutError (asyncio's too) are retried without configuration."""
    flaky = Flaky(1, error)
    assert await retry(NO_JITTER, clock=clock)(flaky)() == 2


@pytest.mark.parametrize(
    "error",
    [
        ConcurrencyError(aggregate_id="a", expected_version=1, actual_version=2),
        ValueError("bad"),
        TypeError("bad"),
        msgspec.ValidationError("bad"),
        RuntimeError("bug"),
    ],
)
async def test_other_errors_are_not_retried(clock: FakeClock, error: Exception) -> None:
    """Conflicts, validation errors and bugs fail at once, untouched."""
    flaky = Flaky(1, error)
    with pytest.raises(type(error)) as info:
        await retry(NO_JITTER, clock=clock)(flaky)()
    assert info.value is error
    assert flaky.calls == 1
    assert not getattr(error, "__notes__", None)
    assert clock.sleeps == []


async def test_on_takes_exception_types(clock: FakeClock) -> None:
    """`on=` replaces the default set of retried types."""
    assert await retry(NO_JITTER, on=KeyError, clock=clock)(Flaky(2, KeyError))() == 3
    flaky = Flaky(1, TransientError)
    with pytest.raises(TransientError):
        await retry(NO_JITTER, on=(KeyError,), clock=clock)(flaky)()
    assert flaky.calls == 1


async def test_on_takes_a_predicate(clock: FakeClock) -> None:
    """A predicate decides per exception."""
    seen: list[BaseException] = []

    def only_503(exc: BaseException) -> bool:
        seen.append(exc)
        return "503" in str(exc)

    assert await retry(NO_JITTER, on=only_503, clock=clock)(Flaky(2, RuntimeError("503")))() == 3
    flaky = Flaky(1, RuntimeError("404"))
    with pytest.raises(RuntimeError, match="404"):
        await retry(NO_JITTER, on=only_503, clock=clock)(flaky)()
    assert flaky.calls == 1
    assert len(seen) == 3


@pytest.mark.parametrize(
    "error", [asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit]
)
async def test_cancellation_and_exits_are_never_retried(
    clock: FakeClock, error: type[BaseException]
) -> None:
    """Whatever `on` says, cancellation and interpreter exits propagate at once."""
    asked: list[BaseException] = []
    flaky = Flaky(1, error)

    def everything(exc: BaseException) -> bool:
        asked.append(exc)
        return True

    with pytest.raises(error):
        await retry(NO_JITTER, on=everything, clock=clock)(flaky)()
    with pytest.raises(error):
        await retry(NO_JITTER, on=(Exception,), clock=clock)(Flaky(1, error))()
    assert flaky.calls == 1
    assert asked == []


async def test_cancelling_during_backoff_cancels_at_once() -> None:
    """A task cancelled while it waits to retry ends cancelled; no further attempt is made."""
    clock = FakeClock(autojump=False)
    flaky = Flaky(10)
    task = asyncio.create_task(retry(NO_JITTER, clock=clock)(flaky)())
    await clock.wait_for_sleepers(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert flaky.calls == 1
    clock.advance(10)
    await asyncio.sleep(0)
    assert flaky.calls == 1


async def test_cancelling_during_a_real_long_backoff_returns_promptly(hooks: HookRegistry) -> None:
    """With the real clock and an hour's backoff, cancel still ends the call immediately."""
    scheduled = asyncio.Event()
    hooks.subscribe("handler.retry.scheduled", lambda ctx: scheduled.set())
    flaky = Flaky(10)
    hour = FixedRetryPolicy(max_retries=3, delay_ms=3_600_000, jitter=False)
    task = asyncio.create_task(retry(hour, hooks=hooks)(flaky)())
    await scheduled.wait()
    task.cancel()
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert flaky.calls == 1


class Ping(Command[str], Retryable):
    target: str = "db"


class Pong(Command[str]):
    target: str = "db"


async def test_command_policy_wins_over_decorator_policy(clock: FakeClock) -> None:
    """A Retryable command's retry_policy takes precedence over the behavior's."""
    flaky = Flaky(10)
    command = Ping(retry_policy=FixedRetryPolicy(max_retries=1, delay_ms=7, jitter=False))
    with pytest.raises(TransientError):
        await retry(NO_JITTER, clock=clock)(flaky)(command)
    assert flaky.calls == 2
    assert clock.sleeps == [0.007]


@pytest.mark.parametrize("policy", [{"max_retries": 3}, "fast", 5])
async def test_a_command_policy_that_is_no_policy_is_a_type_error(
    clock: FakeClock, policy: Any
) -> None:
    """A command's retry_policy is untrusted: one that is no RetryPolicy is a TypeError naming
    it, caused by the failure it came to retry, and nothing retried."""
    flaky = Flaky(10)
    with pytest.raises(TypeError, match=r"Ping\.retry_policy must be a RetryPolicy") as info:
        await retry(NO_JITTER, clock=clock)(flaky)(Ping(retry_policy=policy))
    assert isinstance(info.value.__cause__, TransientError)
    assert flaky.calls == 1
    assert clock.sleeps == []


async def test_decorator_policy_applies_to_commands_without_one(clock: FakeClock) -> None:
    """Without a command policy the behavior's policy applies."""
    flaky = Flaky(10)
    with pytest.raises(TransientError):
        await retry(NO_JITTER, clock=clock)(flaky)(Pong())
    assert flaky.calls == 4


async def test_default_policy_is_exponential_backoff(clock: FakeClock) -> None:
    """With neither, ExponentialBackoffPolicy() applies: 5 retries, jittered doubling delays."""
    flaky = Flaky(10)
    with pytest.raises(TransientError):
        await retry(clock=clock)(flaky)(Pong())
    assert flaky.calls == 6
    for k, slept in enumerate(clock.sleeps, 1):
        full = min(0.1 * 2 ** (k - 1), 5.0)
        assert full / 2 <= slept <= full


async def test_command_policy_is_found_after_self_in_methods(clock: FakeClock) -> None:
    """Decorating a method: the command is the argument after self."""

    class Handler:
        def __init__(self) -> None:
            self.calls = 0

        @retry(NO_JITTER, clock=clock)
        async def process(self, command: Ping) -> str:
            self.calls += 1
            raise TransientError("down")

    handler = Handler()
    with pytest.raises(TransientError):
        await handler.process(Ping(retry_policy=FixedRetryPolicy(max_retries=2, jitter=False)))
    assert handler.calls == 3


async def test_retry_after_is_a_minimum_for_the_next_delay(
    clock: FakeClock, hooks: HookRegistry, events: list[Any]
) -> None:
    """A server's retry_after stretches a shorter delay, and is what hooks report."""
    errors = [TransientError("slow down", retry_after=2.5), TransientError("x", retry_after=0.001)]

    async def throttled() -> str:
        if errors:
            raise errors.pop(0)
        return "ok"

    assert await retry(NO_JITTER, clock=clock, hooks=hooks)(throttled)() == "ok"
    assert clock.sleeps == [2.5, 0.01]
    assert [ctx["delay_ms"] for _, ctx in events] == [2500, 10]


def test_negative_retry_after_is_rejected() -> None:
    """retry_after below zero is a configuration error."""
    with pytest.raises(ValueError, match="retry_after"):
        TransientError("x", retry_after=-1)


def test_sync_functions_are_retried_with_sync_sleeps(clock: FakeClock) -> None:
    """A plain function is retried in place, sleeping through the clock's sync sleep."""
    calls: list[int] = []

    @retry(NO_JITTER, clock=clock)
    def legacy(a: int, b: int = 2) -> int:
        calls.append(a)
        if len(calls) < 3:
            raise ConnectionError("reset")
        return a + b

    assert legacy(1, b=5) == 6
    assert calls == [1, 1, 1]
    assert clock.sleeps == [0.01, 0.01]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_breaker_refusing_a_retry_ends_the_retries_and_says_so(
    kind: str, clock: FakeClock, hooks: HookRegistry, events: list[Any]
) -> None:
    """When a circuit breaker inside refuses a retry, retrying stops there (the refusal is not
    retried) and it is a give-up like any other: a note and `handler.retry.exhausted`, both
    saying the breaker refused it."""
    flaky = Flaky(10)
    breaker = circuit_breaker(minimum_throughput=2, failure_ratio=0.5, clock=clock)
    call = flaky if kind == "async" else flaky.step
    guarded = pipeline(retry(NO_JITTER, clock=clock, hooks=hooks), breaker)(call)

    async def send() -> None:
        result = guarded()
        if kind == "async":
            await result

    with pytest.raises(BrokenCircuitError) as info:
        await send()
    assert flaky.calls == 2
    reason = "the circuit breaker refused retry 2: " + str(info.value)
    assert info.value.__notes__ == [f"gave up after 3 attempts: {reason}"]
    name, context = events[-1]
    assert (name, context["attempt"], context["reason"]) == (RETRY_EXHAUSTED, 2, reason)
    assert context["error"] is info.value


def test_sync_functions_give_up_with_the_last_error(clock: FakeClock) -> None:
    """Sync retries end like async ones: the last error itself, with a note."""
    flaky = Flaky(10)
    with pytest.raises(TransientError) as info:
        retry(NO_JITTER, clock=clock)(flaky.step)()
    assert flaky.calls == 4
    assert info.value.__notes__ == ["gave up after 4 attempts: all retries used (max_retries=3)"]


def legacy_transfer(account: str, amount: int, *, memo: str = "") -> str:
    """Move money (legacy code)."""
    return f"{account}:{amount}:{memo}"


async def async_transfer(account: str, amount: int, *, memo: str = "") -> str:
    """Move money (async code)."""
    return f"{account}:{amount}:{memo}"


@pytest.mark.parametrize("fn", [legacy_transfer, async_transfer])
def test_wrapping_keeps_signature_name_and_docstring(fn: Any) -> None:
    """A wrapped function looks like the original to callers and introspection."""
    wrapped = retry()(fn)
    assert wrapped.__name__ == fn.__name__
    assert wrapped.__doc__ == fn.__doc__
    assert wrapped.__wrapped__ is fn
    assert inspect.signature(wrapped) == inspect.signature(fn)
    assert inspect.iscoroutinefunction(wrapped) == inspect.iscoroutinefunction(fn)


def test_wrapping_a_legacy_function_in_place_keeps_callers_working() -> None:
    """Rebinding a module function to its wrapped self changes nothing for callers."""
    import tests.legacy_module as legacy

    original = legacy.charge
    legacy.charge = retry(NO_JITTER, clock=FakeClock())(legacy.charge)
    try:
        assert legacy.checkout("alice", 30) == "charged alice 30"
        assert legacy.failures_seen == 2
    finally:
        legacy.charge = original


async def test_bare_decorator_uses_defaults() -> None:
    """@retry without parentheses decorates with the default policy."""

    @retry
    async def ok(x: int) -> int:
        return x + 1

    assert await ok(1) == 2


async def test_concurrent_calls_keep_their_own_attempt_counts() -> None:
    """1,000 concurrent calls of one wrapped function each count their own attempts."""
    attempts: dict[int, int] = {}

    @retry(FixedRetryPolicy(max_retries=5, delay_ms=0, jitter=False), clock=FakeClock())
    async def work(i: int) -> int:
        attempts[i] = attempts.get(i, 0) + 1
        await asyncio.sleep(0)
        if attempts[i] <= i % 4:
            raise TransientError(f"call {i} attempt {attempts[i]}")
        return attempts[i]

    results = await asyncio.gather(*(work(i) for i in range(1000)))
    assert results == [i % 4 + 1 for i in range(1000)]


async def test_hooks_see_every_retry_and_the_exhaustion(
    clock: FakeClock, hooks: HookRegistry, events: list[Any]
) -> None:
    """Each retry emits `scheduled` with attempt k and the delay; giving up emits `exhausted`."""
    flaky = Flaky(10)
    command = Ping(retry_policy=FixedRetryPolicy(max_retries=2, delay_ms=5, jitter=False))
    with pytest.raises(TransientError) as info:
        await retry(clock=clock, hooks=hooks)(flaky)(command)
    names = [name for name, _ in events]
    assert names == ["handler.retry.scheduled"] * 2 + ["handler.retry.exhausted"]
    first, second, exhausted = (ctx for _, ctx in events)
    assert (first["attempt"], second["attempt"]) == (1, 2)
    assert first["delay_ms"] == second["delay_ms"] == 5
    assert first["max_retries"] == 2
    assert first["command.type"] == "Ping"
    assert first["handler.type"] == "Flaky"
    assert first["policy"] == command.retry_policy
    assert isinstance(first["error"], TransientError)
    assert exhausted["error"] is info.value


async def test_a_raising_hook_never_breaks_the_command(
    clock: FakeClock, hooks: HookRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook that raises is logged at WARNING; the retry goes on."""

    @hooks.hook("handler.retry.*")
    async def broken(ctx: dict[str, Any]) -> None:
        raise RuntimeError("hook bug")

    with caplog.at_level(logging.WARNING, logger="cqrs_resilience"):
        assert await retry(NO_JITTER, clock=clock, hooks=hooks)(Flaky(1))() == 2
    assert any("hook bug" in (r.exc_text or "") for r in caplog.records)
    assert all(r.levelno >= logging.WARNING for r in caplog.records)


async def test_set_testing_removes_sleeping_but_keeps_retries(clock: FakeClock) -> None:
    """In testing mode retries happen with no sleep; leaving the block restores sleeping."""
    with set_testing():
        flaky = Flaky(3)
        assert await retry(NO_JITTER, clock=clock)(flaky)() == 4
        assert clock.sleeps == []
    assert await retry(NO_JITTER, clock=clock)(Flaky(1))() == 2
    assert clock.sleeps == [0.01]


def test_set_testing_removes_sync_sleeping(clock: FakeClock) -> None:
    """Testing mode also skips sync sleeps."""
    with set_testing():
        assert retry(NO_JITTER, clock=clock)(Flaky(2).step)() == 3
    assert clock.sleeps == []


def test_bad_arguments_are_rejected_up_front() -> None:
    """A non-policy, a bad `on` or a non-callable target raise TypeError when wrapping."""
    with pytest.raises(TypeError, match="RetryPolicy"):
        retry(3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="on="):
        retry(on=("nope",))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        retry()(42)  # type: ignore[call-overload]


async def test_retry_composes_in_a_pipeline(clock: FakeClock) -> None:
    """retry() is a behavior: it works inside pipeline() like any other."""
    order: list[str] = []

    def tag(name: str) -> Any:
        def behavior(handler: Any) -> Any:
            async def wrapped(*args: Any) -> Any:
                order.append(name)
                return await handler(*args)

            return wrapped

        return behavior

    flaky = Flaky(1)
    handler = pipeline(tag("outer"), retry(NO_JITTER, clock=clock), tag("inner"))(flaky)
    assert await handler() == 2
    assert order == ["outer", "inner", "inner"]


class Counter(Aggregate):
    applied: list[str] = msgspec.field(default_factory=list)


class TimesOutAfterFirstCommit:
    """A store whose first write commits and then reports a timeout."""

    def __init__(self) -> None:
        self.inner = InMemoryRepository(Counter)
        self.timed_out = False

    async def persist(self, aggregate: Counter) -> Counter:
        stored = await self.inner.persist(aggregate)
        if not self.timed_out:
            self.timed_out = True
            raise TimeoutError("committed, then the reply was lost")
        return stored


async def test_a_retry_after_commit_then_timeout_does_not_apply_twice(clock: FakeClock) -> None:
    """retry() alone carries the command's key: the retried write is recognized, not reapplied."""
    store = TimesOutAfterFirstCommit()
    await store.inner.persist(Counter(id="c"), command_id="setup")

    @retry(NO_JITTER, clock=clock)
    async def apply(command: Pong) -> int:
        current = (await store.inner.retrieve(["c"]))[0]
        current.applied.append(command.command_id)
        return (await store.persist(current)).version

    command = Pong()
    assert await apply(command) == 2
    final = (await store.inner.retrieve(["c"]))[0]
    assert final.applied == [command.command_id]
    assert final.version == 2
    assert clock.sleeps == [0.01]


# --- what a command may ask for is capped; the behavior's own policy is trusted -------------


def decoded_ping(policy_json: str) -> Ping:
    """A command as it arrives from a queue or an HTTP body."""
    return msgspec.json.decode(f'{{"retry_policy": {policy_json}}}'.encode(), type=Ping)


async def test_a_command_cannot_ask_for_endless_retries(clock: FakeClock) -> None:
    """max_retries of 10**18 from a command is capped at 10 retries (11 calls)."""
    flaky = Flaky(10**6)
    command = decoded_ping('{"type": "fixed", "max_retries": 1000000000000000000, "delay_ms": 0}')
    with pytest.raises(TransientError) as info:
        await retry(clock=clock)(flaky)(command)
    assert flaky.calls == 11
    assert info.value.__notes__ == [
        "gave up after 11 attempts: max_retries_cap=10 caps the command's "
        "max_retries=1000000000000000000"
    ]


async def test_a_command_cannot_ask_for_an_endless_wait(clock: FakeClock) -> None:
    """A delay of 1e300 ms from a command is capped at 60 s before each retry."""
    command = decoded_ping('{"type": "fixed", "max_retries": 2, "delay_ms": 1e300}')
    with pytest.raises(TransientError):
        await retry(clock=clock)(Flaky(10))(command)
    assert clock.sleeps == [60.0, 60.0]


async def test_an_exponential_command_policy_is_capped_too(clock: FakeClock) -> None:
    """Growing delays from a command stop growing at the cap."""
    command = decoded_ping(
        '{"type": "exponential", "max_retries": 4, "initial_delay_ms": 30000,'
        ' "max_delay_ms": 1e12, "jitter": false}'
    )
    with pytest.raises(TransientError):
        await retry(clock=clock)(Flaky(10))(command)
    assert clock.sleeps == [30.0, 60.0, 60.0, 60.0]


@pytest.mark.parametrize(("retry_after", "slept"), [(math.inf, 60.0), (1e300, 60.0), (30, 30.0)])
async def test_retry_after_is_capped(clock: FakeClock, retry_after: float, slept: float) -> None:
    """A server's Retry-After is outside input: at most the cap, whatever the policy."""
    errors = [TransientError("slow down", retry_after=retry_after)]

    async def throttled() -> str:
        if errors:
            raise errors.pop(0)
        return "ok"

    assert await retry(NO_JITTER, clock=clock)(throttled)() == "ok"
    assert clock.sleeps == [slept]


async def test_a_nan_retry_after_is_ignored(clock: FakeClock) -> None:
    """A retry_after that is not a number of seconds leaves the policy's delay alone."""

    class Weird(TransientError):
        pass

    errors = [Weird("x"), Weird("y"), Weird("z")]
    for error, value in zip(errors, (math.nan, "soon", True), strict=True):
        error.retry_after = value  # type: ignore[assignment]

    async def flaky() -> str:
        if errors:
            raise errors.pop(0)
        return "ok"

    assert await retry(NO_JITTER, clock=clock)(flaky)() == "ok"
    assert clock.sleeps == [0.01, 0.01, 0.01]


async def test_caps_are_settable_on_the_behavior(clock: FakeClock) -> None:
    """max_retries_cap and max_delay_cap_s bound a command's policy and any retry_after."""
    command = decoded_ping('{"type": "fixed", "max_retries": 9, "delay_ms": 5000}')
    flaky = Flaky(100)
    with pytest.raises(TransientError):
        await retry(clock=clock, max_retries_cap=2, max_delay_cap_s=1.5)(flaky)(command)
    assert (flaky.calls, clock.sleeps) == (3, [1.5, 1.5])


async def test_the_behaviors_own_policy_is_trusted(clock: FakeClock) -> None:
    """A policy written in code is not capped: 20 retries and 2-minute delays are its call."""
    flaky = Flaky(100)
    with pytest.raises(TransientError):
        await retry(FixedRetryPolicy(max_retries=20, delay_ms=120_000, jitter=False), clock=clock)(
            flaky
        )(Pong())
    assert flaky.calls == 21
    assert set(clock.sleeps) == {120.0}


@pytest.mark.parametrize(
    "caps",
    [
        {"max_retries_cap": -1},
        {"max_retries_cap": 1.5},
        {"max_delay_cap_s": math.inf},
        {"max_delay_cap_s": -2},
    ],
)
def test_bad_caps_are_rejected(caps: dict[str, Any]) -> None:
    """A cap out of range fails at construction, naming it."""
    with pytest.raises(ValueError, match=next(iter(caps))):
        retry(**caps)


# --- tenacity's own strategies, on our clock ------------------------------------------------


def always_failing(clock: FakeClock, calls: list[float], busy_s: float = 0.0) -> Any:
    """Fails every time, recording the clock at each call; each call takes `busy_s`."""

    async def fails() -> None:
        calls.append(clock.now)
        if busy_s:
            await clock.sleep(busy_s)
        raise TransientError("down")

    return fails


async def test_tenacity_stop_replaces_the_policys_count(clock: FakeClock) -> None:
    """stop=stop_after_attempt(3) means three calls, whatever the policy says."""
    calls: list[float] = []
    with pytest.raises(TransientError) as info:
        await retry(NO_JITTER, stop=tenacity.stop_after_attempt(3), clock=clock)(
            always_failing(clock, calls)
        )()
    assert len(calls) == 3
    assert info.value.__notes__ == [
        "gave up after 3 attempts: all 3 attempts made (stop_after_attempt)"
    ]


async def test_stop_after_delay_runs_on_our_clock(clock: FakeClock) -> None:
    """stop_after_attempt(5) | stop_after_delay(30) with 10 s waits: fake time ends it at 30 s."""
    calls: list[float] = []
    stop = tenacity.stop_after_attempt(5) | tenacity.stop_after_delay(30)
    with pytest.raises(TransientError):
        await retry(stop=stop, wait=tenacity.wait_fixed(10), clock=clock)(
            always_failing(clock, calls)
        )()
    assert calls == [0, 10, 20, 30]
    assert clock.sleeps == [10, 10, 10]


async def test_stop_after_delay_counts_the_first_attempt(clock: FakeClock) -> None:
    """The delay is measured from the start of the first attempt, not from its failure."""
    calls: list[float] = []
    with pytest.raises(TransientError):
        await retry(stop=tenacity.stop_after_delay(30), wait=tenacity.wait_fixed(10), clock=clock)(
            always_failing(clock, calls, busy_s=25)
        )()
    assert calls == [0, 35]


async def test_stop_before_delay_sees_the_next_wait(clock: FakeClock) -> None:
    """stop_before_delay(30) gives up when the next wait would reach 30 s."""
    calls: list[float] = []
    with pytest.raises(TransientError):
        await retry(stop=tenacity.stop_before_delay(30), wait=tenacity.wait_fixed(10), clock=clock)(
            always_failing(clock, calls)
        )()
    assert calls == [0, 10, 20]


async def test_tenacity_wait_replaces_the_policys_delays(clock: FakeClock) -> None:
    """wait=wait_random_exponential(...) draws every delay; the policy still counts retries."""
    calls: list[float] = []
    wait = tenacity.wait_random_exponential(multiplier=0.1, max=10)
    with pytest.raises(TransientError):
        await retry(NO_JITTER, wait=wait, clock=clock)(always_failing(clock, calls))()
    assert len(calls) == 4
    for k, slept in enumerate(clock.sleeps, 1):
        assert 0 <= slept <= min(0.1 * 2**k, 10)


async def test_strategies_written_in_code_are_not_capped(clock: FakeClock) -> None:
    """A code-written wait of 2 minutes and stop of 20 attempts are trusted, even for a
    command whose own policy asks for less."""
    flaky = Flaky(100)
    command = decoded_ping('{"type": "fixed", "max_retries": 1, "delay_ms": 5}')
    with pytest.raises(TransientError):
        await retry(
            stop=tenacity.stop_after_attempt(20), wait=tenacity.wait_fixed(120), clock=clock
        )(flaky)(command)
    assert flaky.calls == 20
    assert set(clock.sleeps) == {120}


async def test_a_commands_delays_stay_capped_under_a_code_stop(clock: FakeClock) -> None:
    """With only stop= given, the command's own delays still come from it, capped."""
    command = decoded_ping('{"type": "fixed", "max_retries": 9, "delay_ms": 1e300}')
    with pytest.raises(TransientError):
        await retry(stop=tenacity.stop_after_attempt(3), clock=clock)(Flaky(10))(command)
    assert clock.sleeps == [60.0, 60.0]


async def test_a_commands_count_stays_capped_under_a_code_wait(clock: FakeClock) -> None:
    """With only wait= given, the command's max_retries still counts, capped."""
    flaky = Flaky(100)
    command = decoded_ping('{"type": "fixed", "max_retries": 1000000, "delay_ms": 0}')
    with pytest.raises(TransientError):
        await retry(wait=tenacity.wait_fixed(1), max_retries_cap=4, clock=clock)(flaky)(command)
    assert flaky.calls == 5
    assert clock.sleeps == [1, 1, 1, 1]


async def test_hooks_report_no_max_retries_when_tenacity_stops(
    clock: FakeClock, hooks: HookRegistry, events: list[Any]
) -> None:
    """A tenacity stop has no retry count to report: max_retries is None."""
    with pytest.raises(TransientError):
        await retry(stop=tenacity.stop_after_attempt(2), clock=clock, hooks=hooks)(Flaky(10))()
    assert [ctx["max_retries"] for _, ctx in events] == [None, None]


async def test_tenacity_retry_predicates_work_as_on(clock: FakeClock) -> None:
    """on= takes tenacity's retry_if_exception_type / _message strategies too."""
    assert (
        await retry(NO_JITTER, on=tenacity.retry_if_exception_type(KeyError), clock=clock)(
            Flaky(2, KeyError)
        )()
        == 3
    )
    only_503 = tenacity.retry_if_exception_message(match=".*503.*")
    assert await retry(NO_JITTER, on=only_503, clock=clock)(Flaky(1, RuntimeError("503")))() == 2
    flaky = Flaky(1, RuntimeError("404"))
    with pytest.raises(RuntimeError):
        await retry(NO_JITTER, on=only_503, clock=clock)(flaky)()
    assert flaky.calls == 1


def test_tenacity_strategies_drive_sync_retries_too(clock: FakeClock) -> None:
    """A plain function: stop_after_delay reads the same clock its sync sleeps move."""
    calls: list[float] = []

    @retry(stop=tenacity.stop_after_delay(5), wait=tenacity.wait_fixed(2), clock=clock)
    def legacy() -> None:
        calls.append(clock.now)
        raise ConnectionError("reset")

    with pytest.raises(ConnectionError):
        legacy()
    assert calls == [0, 2, 4, 6]


def test_bad_strategies_are_rejected_up_front() -> None:
    """stop= and wait= must be callables (tenacity strategies)."""
    with pytest.raises(TypeError, match="stop="):
        retry(stop=3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="wait="):
        retry(wait="fast")  # type: ignore[call-overload]


async def test_set_testing_still_ends_a_time_based_stop() -> None:
    """In testing mode the waits are skipped, yet stop_after_delay sees them pass: no endless
    loop on a clock that never moves."""
    clock = FakeClock(autojump=False)
    flaky = Flaky(100)
    with set_testing(), pytest.raises(TransientError):
        await retry(stop=tenacity.stop_after_delay(30), wait=tenacity.wait_fixed(10), clock=clock)(
            flaky
        )()
    assert flaky.calls == 4
    assert clock.sleeps == []


def plain_decorator(fn: Any) -> Any:
    """A decorator written without `async def`: it returns what `fn` returns, a coroutine."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return call


def in_lambda(fn: Any) -> Any:
    return lambda *args: fn(*args)


@pytest.mark.parametrize("disguise", [in_lambda, plain_decorator])
async def test_an_async_function_behind_a_sync_callable_is_retried(
    clock: FakeClock, disguise: Any
) -> None:
    """A lambda or a plain decorator around an async function is retried like the async
    function: each failure is retried when awaited, and giving up says so."""
    flaky = Flaky(2)
    wrapped = retry(NO_JITTER, clock=clock)(disguise(flaky))
    assert await wrapped() == 3
    assert flaky.calls == 3
    assert clock.sleeps == [0.01, 0.01]
    always = Flaky(10)
    wrapped = retry(NO_JITTER, clock=clock)(disguise(always))
    for _ in range(2):  # the first call finds out it is async, the second knows
        always.calls = 0
        with pytest.raises(TransientError) as info:
            await wrapped()
        assert always.calls == 4
        assert info.value.__notes__[-1] == (
            "gave up after 4 attempts: all retries used (max_retries=3)"
        )


async def test_nothing_runs_before_the_returned_coroutine_is_awaited(clock: FakeClock) -> None:
    """Wrapping a lambda around an async function, a call hands back a coroutine; the
    function runs when it is awaited."""
    flaky = Flaky(1)
    wrapped = retry(NO_JITTER, clock=clock)(lambda: flaky())
    pending = wrapped()
    assert inspect.iscoroutine(pending) and flaky.calls == 0
    assert await pending == 2


async def test_a_lambda_around_an_async_handler_runs_in_its_command_scope(
    clock: FakeClock,
) -> None:
    """The async function behind a lambda sees its command's id, on every attempt."""
    seen: list[str | None] = []

    class Ping(Command[str]):
        pass

    async def handle(command: Ping) -> str:
        seen.append(current_command_id.get())
        if len(seen) < 2:
            raise TransientError("blip")
        return "ok"

    command = Ping()
    wrapped = retry(NO_JITTER, clock=clock)(lambda c: handle(c))
    assert await wrapped(command) == "ok"
    assert seen == [command.command_id, command.command_id]


def test_a_sync_result_is_returned_as_it_is(clock: FakeClock) -> None:
    """A sync function's result is its own, a generator included: only an awaitable is
    run the async way."""

    def numbers() -> Iterator[int]:
        yield 1

    result = retry(NO_JITTER, clock=clock)(numbers)()
    assert inspect.isgenerator(result) and list(result) == [1]
    assert retry(NO_JITTER, clock=clock)(lambda: [1])() == [1]
