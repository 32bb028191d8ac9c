"""pytest fixtures for testing code that uses cqrs_resilience; loaded automatically by pytest.

- `fake_clock`: a `FakeClock` (autojump): pass it as `clock=` to `retry()` or a handler and
  read the backoff schedule from `fake_clock.sleeps`, without waiting.
- `no_backoff`: `set_testing()` for one test: retries happen, sleeps do not.
- `hook_events`: a `HookEvents` recording every event the behaviors announce during the test,
  whatever `HookRegistry` they report to (the global one or a private `hooks=`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from typing import Any

import pytest

from ._clock import FakeClock, set_testing
from ._telemetry import add_event_sink

__all__ = ["HookEvents", "fake_clock", "hook_events", "no_backoff"]


class HookEvents:
    """The events announced during a test, in order, as `(name, context)` pairs.

    It sees what behaviors announce (every `handler.*` event), not what code passes to
    `registry.emit()` itself. Iterate it, index it, or ask `names()` / `contexts(pattern)`.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, context: dict[str, Any]) -> None:
        self.events.append((name, context))

    def names(self) -> list[str]:
        """The event names, in order."""
        return [name for name, _ in self.events]

    def contexts(self, pattern: str = "*") -> list[dict[str, Any]]:
        """The contexts of the events whose names match the shell-style `pattern`."""
        return [context for name, context in self.events if fnmatch.fnmatchcase(name, pattern)]

    def clear(self) -> None:
        """Forget what was recorded so far."""
        self.events.clear()

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)

    def __getitem__(self, index: int) -> tuple[str, dict[str, Any]]:
        return self.events[index]

    def __repr__(self) -> str:
        return f"HookEvents({self.names()})"


@pytest.fixture
def fake_clock() -> FakeClock:
    """A fake clock that jumps through every backoff at once and records it."""
    return FakeClock()


@pytest.fixture
def no_backoff() -> Iterator[None]:
    """Remove every backoff sleep for the duration of the test."""
    with set_testing():
        yield


@pytest.fixture
def hook_events() -> Iterator[HookEvents]:
    """Every event the behaviors announce during the test, from any hook registry."""
    recorder = HookEvents()
    stop = add_event_sink(recorder)
    try:
        yield recorder
    finally:
        stop()
