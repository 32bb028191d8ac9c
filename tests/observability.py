"""Scenarios that make the behaviors announce every event, for the observability tests."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec

from cqrs_resilience import (
    Command,
    CommandResponse,
    ConcurrencyError,
    ConflictConfig,
    ConflictResolutionPolicy,
    FakeClock,
    FixedRetryPolicy,
    HookRegistry,
    ResilientCommandHandler,
    RetryBudget,
    TransientError,
    circuit_breaker,
    resolve_conflicts,
    retry,
)

ONE_RETRY = FixedRetryPolicy(max_retries=1, delay_ms=250, jitter=False)


class Save(Command[str]):
    """A command for the scenarios."""

    state: dict[str, Any] = msgspec.field(default_factory=dict)


class Flaky:
    """Fails with each error of `errors` in turn, then returns "ok"; counts its calls."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self, command: Any) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


async def latest(command: Any) -> dict[str, Any]:
    return {"id": "a1", "version": 2}


def incoming(command: Save) -> dict[str, Any]:
    return command.state


def rebuild(command: Save, state: dict[str, Any]) -> Save:
    return Save(state=state)


class SaveHandler(ResilientCommandHandler[str]):
    """retry → resolve_conflicts (LAST_WINS) → process, which the dispatcher (a `Flaky`) runs."""

    retry_policy = ONE_RETRY
    conflict_config = ConflictConfig(policy=ConflictResolutionPolicy.LAST_WINS)

    async def process(self, command: Any) -> CommandResponse[str]:
        return CommandResponse(result=await self.dispatcher(command))

    async def fetch_latest_state(self, command: Any) -> dict[str, Any] | None:
        return await latest(command)

    def get_incoming_state(self, command: Any) -> dict[str, Any]:
        return incoming(command)

    def update_command(self, command: Any, merged_state: dict[str, Any]) -> Any:
        return rebuild(command, merged_state)


async def every_event(clock: FakeClock, hooks: HookRegistry | None = None) -> None:
    """Make the behaviors announce each of the nine events at least once."""
    # handler.retry.scheduled, then handler.retry.exhausted
    with contextlib.suppress(TransientError):
        await retry(ONE_RETRY, clock=clock, hooks=hooks)(Flaky(*[TransientError("down")] * 2))(
            Save()
        )
    # handler.retry.budget_exhausted
    spent = RetryBudget(ratio=0.0, min_retries_per_s=0.0, clock=clock)
    with contextlib.suppress(TransientError):
        await retry(ONE_RETRY, budget=spent, clock=clock, hooks=hooks)(
            Flaky(TransientError("down"))
        )(Save())
    # handler.conflict.detected, then handler.conflict.resolved (LAST_WINS)
    last_wins = ConflictConfig(policy=ConflictResolutionPolicy.LAST_WINS)
    await resolve_conflicts(latest, incoming, rebuild, config=last_wins, hooks=hooks)(
        Flaky(ConcurrencyError(aggregate_id="a1"))
    )(Save())
    # handler.conflict.detected, then handler.conflict.failed (FIRST_WINS)
    with contextlib.suppress(ConcurrencyError):
        await resolve_conflicts(latest, incoming, rebuild, hooks=hooks)(
            Flaky(ConcurrencyError(aggregate_id="a1"))
        )(Save())
    # handler.circuit.opened, then .half_opened and .closed by a trial call that succeeds
    breaker = circuit_breaker(minimum_throughput=2, break_duration_s=5.0, clock=clock, hooks=hooks)
    guarded = breaker(Flaky(TransientError("down"), TransientError("down")))
    for _ in range(2):
        with contextlib.suppress(TransientError):
            await guarded(Save())
    clock.advance(5.0)
    await guarded(Save())
