"""The handler classes get timeouts, budgets, breakers and tenacity strategies as class
attributes: the same behaviors as the functions, in the production order."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest
import tenacity

from cqrs_resilience import (
    BrokenCircuitError,
    CircuitBreaker,
    CircuitBreakerMixin,
    Command,
    CommandResponse,
    FakeClock,
    FixedRetryPolicy,
    HookRegistry,
    PipelinedCommandHandler,
    ResilientCommandHandler,
    RetryableCommandHandler,
    RetryBehaviorMixin,
    RetryBudget,
    TimeoutMixin,
    TransientError,
    circuit_breaker,
)

NO_WAIT = FixedRetryPolicy(max_retries=5, delay_ms=0, jitter=False)


class Ping(Command[str]):
    pass


class Flaky(RetryableCommandHandler[str]):
    """Fails the first `failures` calls with a transient error."""

    retry_policy = NO_WAIT

    def __init__(self, failures: int, **options: Any) -> None:
        super().__init__(**options)
        self.failures = failures
        self.calls = 0

    async def process(self, command: Ping) -> CommandResponse[str]:
        self.calls += 1
        if self.calls <= self.failures:
            raise TransientError("blip")
        return CommandResponse(result="ok")


async def test_without_settings_the_classes_install_only_their_own_behaviors() -> None:
    handler = Flaky(0)
    assert [type(b).__name__ for b in handler.behaviors] == ["Retry"]


async def test_timeout_s_is_an_overall_deadline_retries_inside_honor(
    hooks: HookRegistry, events: list[tuple[str, dict[str, Any]]]
) -> None:
    clock = FakeClock()

    class Slow(Flaky):
        timeout_s = 1.0
        retry_policy = FixedRetryPolicy(max_retries=5, delay_ms=400, jitter=False)

    handler = Slow(10, clock=clock, hooks=hooks)
    with pytest.raises(TransientError) as caught:
        await handler.handle(Ping())
    # Calls at 0, 0.4 and 0.8 s; a fourth wait would end at 1.2 s, after the deadline.
    assert handler.calls == 3
    assert clock.sleeps == [0.4, 0.4]
    assert any("deadline" in note for note in caught.value.__notes__)
    assert events[-1][0] == "handler.retry.exhausted"


async def test_timeout_s_cancels_a_call_that_hangs() -> None:
    clock = FakeClock()

    class Hangs(RetryableCommandHandler[str]):
        timeout_s = 2.0
        retry_policy = FixedRetryPolicy(max_retries=0, delay_ms=0, jitter=False)

        async def process(self, command: Ping) -> CommandResponse[str]:
            await clock.sleep(3600)
            return CommandResponse(result="late")

    with pytest.raises(TimeoutError):
        await Hangs(clock=clock).handle(Ping())
    assert clock.now == pytest.approx(2.0)


async def test_retry_budget_is_one_budget_for_every_instance(
    hooks: HookRegistry, events: list[tuple[str, dict[str, Any]]]
) -> None:
    clock = FakeClock()

    class Budgeted(Flaky):
        retry_budget = RetryBudget(ratio=0.0, min_retries_per_s=0.1, ttl_s=10.0, clock=clock)

    # The reserve is one retry (0.1/s over 10 s); two handlers built per request share it.
    first, second = Budgeted(1, clock=clock, hooks=hooks), Budgeted(1, clock=clock, hooks=hooks)
    assert (await first.handle(Ping())).result == "ok"
    with pytest.raises(TransientError) as caught:
        await second.handle(Ping())
    assert second.calls == 1
    assert any("retry budget" in note for note in caught.value.__notes__)
    assert events[-1][0] == "handler.retry.budget_exhausted"


async def test_tenacity_strategies_as_class_attributes() -> None:
    clock = FakeClock()

    class Tenacious(Flaky):
        retry_stop = tenacity.stop_after_attempt(3)
        retry_wait = tenacity.wait_fixed(2)

    handler = Tenacious(10, clock=clock)
    with pytest.raises(TransientError):
        await handler.handle(Ping())
    assert handler.calls == 3
    assert clock.sleeps == [2, 2]


async def test_a_plain_function_as_a_strategy_is_not_bound_as_a_method() -> None:
    clock = FakeClock()

    def half_a_second(state: tenacity.RetryCallState) -> float:
        return 0.5

    class Waits(Flaky):
        retry_wait = half_a_second

    handler = Waits(2, clock=clock)
    assert (await handler.handle(Ping())).result == "ok"
    assert clock.sleeps == [0.5, 0.5]


class Store:
    """A dependency that is down until told otherwise."""

    def __init__(self) -> None:
        self.down = True
        self.calls = 0

    async def write(self) -> str:
        self.calls += 1
        if self.down:
            raise ConnectionError("refused")
        return "ok"


def breaker_class(clock: FakeClock, hooks: HookRegistry) -> type[RetryableCommandHandler[str]]:
    class Guarded(RetryableCommandHandler[str]):
        retry_policy = FixedRetryPolicy(max_retries=5, delay_ms=0, jitter=False)
        breaker: ClassVar[CircuitBreaker | None] = circuit_breaker(
            minimum_throughput=4, break_duration_s=5.0, clock=clock, hooks=hooks
        )

        async def process(self, command: Ping) -> CommandResponse[str]:
            return CommandResponse(result=await self.dispatcher.write())

    return Guarded


async def test_breaker_sits_inside_retry_and_is_one_circuit_for_every_instance(
    hooks: HookRegistry, events: list[tuple[str, dict[str, Any]]]
) -> None:
    clock = FakeClock()
    store = Store()
    guarded = breaker_class(clock, hooks)
    # First instance: four failing calls open the circuit; the retry's next call is refused,
    # and a refusal is not retried: the retries end there, saying so.
    with pytest.raises(BrokenCircuitError) as caught:
        await guarded(store, clock=clock, hooks=hooks).handle(Ping())
    assert store.calls == 4
    assert caught.value.retry_after == pytest.approx(5.0)
    assert [name for name, _ in events] == [
        *["handler.retry.scheduled"] * 3,
        "handler.circuit.opened",
        "handler.retry.scheduled",
        "handler.retry.exhausted",
    ]
    assert events[-1][1]["reason"].startswith("the circuit breaker refused retry 4")
    # A second instance (built per request) meets the same open circuit: no call is made.
    with pytest.raises(BrokenCircuitError):
        await guarded(store, clock=clock, hooks=hooks).handle(Ping())
    assert store.calls == 4
    # After the break, one trial call closes it again.
    clock.advance(5.0)
    store.down = False
    assert (await guarded(store, clock=clock, hooks=hooks).handle(Ping())).result == "ok"
    assert [name for name, _ in events][-2:] == [
        "handler.circuit.half_opened",
        "handler.circuit.closed",
    ]


async def test_mixins_listed_left_to_right_wrap_outermost_first() -> None:
    """timeout → retry → circuit_breaker → resolve_conflicts → process, as documented."""
    breaker = circuit_breaker()

    class Full(ResilientCommandHandler[str]):
        timeout_s = 10.0
        breaker: ClassVar[CircuitBreaker | None] = circuit_breaker()

        async def process(self, command: Ping) -> CommandResponse[str]:
            return CommandResponse(result="ok")

        async def fetch_latest_state(self, command: Ping) -> dict[str, Any] | None:
            return None

        def get_incoming_state(self, command: Ping) -> dict[str, Any]:
            return {}

        def update_command(self, command: Ping, merged_state: dict[str, Any]) -> Ping:
            return command

    handler = Full()
    names = [type(b).__name__ for b in reversed(handler.behaviors)]  # outermost first
    assert names == ["Timeout", "Retry", "CircuitBreaker", "ResolveConflicts"]
    assert (await handler.handle(Ping())).result == "ok"

    class Custom(CircuitBreakerMixin[str], TimeoutMixin[str], RetryBehaviorMixin[str]):
        timeout_s = 1.0

        async def process(self, command: Ping) -> CommandResponse[str]:
            return CommandResponse(result="ok")

    Custom.breaker = breaker
    names = [type(b).__name__ for b in reversed(Custom().behaviors)]
    assert names == ["CircuitBreaker", "Timeout", "Retry"]


async def test_a_hung_process_is_cancelled_at_once_when_the_caller_cancels() -> None:
    clock = FakeClock(autojump=False)
    started = asyncio.Event()

    class Hangs(RetryableCommandHandler[str]):
        timeout_s = 60.0

        async def process(self, command: Ping) -> CommandResponse[str]:
            started.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    task = asyncio.create_task(Hangs(clock=clock).handle(Ping()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_pipelined_handler_is_still_abstract() -> None:
    with pytest.raises(TypeError):
        PipelinedCommandHandler()  # type: ignore[abstract]
