"""Shared fixtures: a private hook registry and the library's own fake clock."""

from __future__ import annotations

import pytest

from cqrs_resilience import FakeClock, HookRegistry

pytest_plugins = ["tests.conftest_stores", "tests.no_skips_in_ci", "pytester"]


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock that jumps through every backoff at once and records it."""
    return FakeClock()


@pytest.fixture
def hooks() -> HookRegistry:
    """A private hook registry, so tests never see each other's subscribers."""
    return HookRegistry()


@pytest.fixture
def events(hooks: HookRegistry) -> list[tuple[str, dict[str, object]]]:
    """Every event emitted on `hooks`, as (name, context) pairs, in order."""
    seen: list[tuple[str, dict[str, object]]] = []
    for name in (
        "handler.retry.scheduled",
        "handler.retry.exhausted",
        "handler.retry.budget_exhausted",
        "handler.conflict.detected",
        "handler.conflict.resolved",
        "handler.circuit.opened",
        "handler.circuit.half_opened",
        "handler.circuit.closed",
        "handler.conflict.failed",
    ):
        hooks.subscribe(name, lambda ctx, name=name: seen.append((name, ctx)))
    return seen
