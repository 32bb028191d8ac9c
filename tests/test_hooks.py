"""HookRegistry: glob subscriptions, sync and async subscribers, isolation from failures."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from cqrs_resilience import (
    RETRY_EXHAUSTED,
    RETRY_SCHEDULED,
    FakeClock,
    HookRegistry,
    get_hook_registry,
)
from cqrs_resilience._hooks import EVENTS
from cqrs_resilience.pytest_plugin import HookEvents
from tests.observability import every_event

EVENT_CONSTANTS = (
    "RETRY_SCHEDULED",
    "RETRY_EXHAUSTED",
    "RETRY_BUDGET_EXHAUSTED",
    "CONFLICT_DETECTED",
    "CONFLICT_RESOLVED",
    "CONFLICT_FAILED",
    "CIRCUIT_OPENED",
    "CIRCUIT_HALF_OPENED",
    "CIRCUIT_CLOSED",
)


async def test_glob_patterns_select_events(hooks: HookRegistry) -> None:
    """Shell-style globs pick the events a subscriber sees."""
    seen: list[str] = []
    hooks.subscribe("handler.retry.*", lambda ctx: seen.append("retry:" + ctx["e"]))
    hooks.subscribe("handler.*", lambda ctx: seen.append("any:" + ctx["e"]))
    hooks.subscribe("handler.conflict.resolved", lambda ctx: seen.append("exact:" + ctx["e"]))
    await hooks.emit("handler.retry.scheduled", {"e": "s"})
    await hooks.emit("handler.conflict.resolved", {"e": "r"})
    await hooks.emit("other.event", {"e": "o"})
    assert seen == ["retry:s", "any:s", "any:r", "exact:r"]


async def test_async_subscribers_are_awaited(hooks: HookRegistry) -> None:
    """An async subscriber has finished when emit returns."""
    done: list[dict[str, Any]] = []

    @hooks.hook("handler.retry.*")
    async def record(ctx: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        done.append(ctx)

    await hooks.emit("handler.retry.exhausted", {"attempt": 3})
    assert done == [{"attempt": 3}]


def test_sync_emit_runs_async_subscribers_without_a_loop(hooks: HookRegistry) -> None:
    """From sync code with no running loop, an async subscriber runs to completion."""
    done: list[int] = []

    async def record(ctx: dict[str, Any]) -> None:
        done.append(ctx["n"])

    hooks.subscribe("x", record)
    hooks.emit_sync("x", {"n": 1})
    assert done == [1]


async def test_sync_emit_inside_a_loop_schedules_async_subscribers(hooks: HookRegistry) -> None:
    """From sync code inside a running loop, an async subscriber runs as a task."""
    done = asyncio.Event()

    async def record(ctx: dict[str, Any]) -> None:
        done.set()

    hooks.subscribe("x", record)
    hooks.emit_sync("x", {})
    await asyncio.wait_for(done.wait(), 5)


async def test_raising_subscribers_are_logged_and_the_rest_still_run(
    hooks: HookRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """One failing subscriber is logged at WARNING and does not stop the others."""
    seen: list[str] = []

    def broken(ctx: dict[str, Any]) -> None:
        raise RuntimeError("subscriber bug")

    hooks.subscribe("e", broken)
    hooks.subscribe("e", lambda ctx: seen.append("after"))
    with caplog.at_level(logging.WARNING, logger="cqrs_resilience"):
        await hooks.emit("e", {})
        hooks.emit_sync("e", {})
    assert seen == ["after", "after"]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


async def test_unsubscribe_stops_delivery(hooks: HookRegistry) -> None:
    """The function subscribe returns removes the subscription."""
    seen: list[int] = []
    unsubscribe = hooks.subscribe("e", lambda ctx: seen.append(1))
    assert hooks.wants("e")
    unsubscribe()
    await hooks.emit("e", {})
    assert seen == []
    assert not hooks.wants("e")


def test_wants_reflects_later_subscriptions(hooks: HookRegistry) -> None:
    """The no-subscriber answer is cached but refreshed when someone subscribes."""
    assert not hooks.wants("handler.retry.scheduled")
    hooks.subscribe("handler.*", lambda ctx: None)
    assert hooks.wants("handler.retry.scheduled")


def test_bad_subscriptions_are_rejected(hooks: HookRegistry) -> None:
    """Empty patterns and non-callables are refused up front."""
    with pytest.raises(ValueError, match="pattern"):
        hooks.subscribe("", lambda ctx: None)
    with pytest.raises(TypeError, match="callable"):
        hooks.subscribe("e", "not a function")  # type: ignore[arg-type]


def test_the_global_registry_is_one_object() -> None:
    """get_hook_registry() returns the same process-wide registry every time."""
    assert get_hook_registry() is get_hook_registry()
    assert isinstance(get_hook_registry(), HookRegistry)


async def test_global_registry_receives_events_from_behaviors_by_default() -> None:
    """Behaviors without hooks= report to the process-wide registry."""
    from cqrs_resilience import FakeClock, FixedRetryPolicy, TransientError, retry

    seen: list[int] = []
    unsubscribe = get_hook_registry().subscribe(
        "handler.retry.scheduled", lambda ctx: seen.append(ctx["attempt"])
    )
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TransientError("once")

    try:
        await retry(FixedRetryPolicy(jitter=False), clock=FakeClock())(flaky)()
    finally:
        unsubscribe()
    assert seen == [1]


async def test_every_event_names_itself_in_its_context(
    clock: FakeClock, hooks: HookRegistry, events: list[tuple[str, dict[str, Any]]]
) -> None:
    """Each of the nine events is emitted, and its context's `event` is its name."""
    await every_event(clock, hooks)
    assert {name for name, _ in events} == set(EVENTS)
    for name, context in events:
        assert context["event"] == name


def test_event_names_are_exported() -> None:
    """The top-level constants are the event names, one per event."""
    import cqrs_resilience

    exported = {getattr(cqrs_resilience, name) for name in EVENT_CONSTANTS}
    assert exported == set(EVENTS)
    assert cqrs_resilience.RETRY_SCHEDULED == "handler.retry.scheduled"
    assert cqrs_resilience.CONFLICT_FAILED == "handler.conflict.failed"


async def test_shipped_hook_events_fixture_sees_every_registry(
    hook_events: HookEvents, fake_clock: FakeClock
) -> None:
    """hook_events records the events of the global registry and of private ones alike."""
    await every_event(fake_clock, HookRegistry())  # a private registry
    assert set(hook_events.names()) == set(EVENTS)
    assert hook_events.names()[:2] == [RETRY_SCHEDULED, RETRY_EXHAUSTED]
    assert hook_events.contexts("handler.retry.scheduled")[0]["delay_ms"] == 250
    assert all(context["event"] == name for name, context in hook_events)
    count = len(hook_events)
    hook_events.clear()
    await every_event(fake_clock)  # the global registry
    assert len(hook_events) == count
    assert hook_events[0][0] == RETRY_SCHEDULED
    assert repr(hook_events).startswith("HookEvents(['handler.retry.scheduled'")


def test_hook_events_fixture_stops_recording_after_the_test(pytester: pytest.Pytester) -> None:
    """The fixture is registered by the plugin and removes its sink when the test ends."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        """
        from cqrs_resilience import _telemetry

        def test_uses_it(hook_events):
            assert hook_events in _telemetry.EVENT_SINKS

        def test_after():
            assert _telemetry.EVENT_SINKS == ()
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)
