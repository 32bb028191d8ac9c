"""The seam through which optional instrumentation sees commands, attempts and events.

The core depends on no telemetry library. It knows two slots, both empty unless something
(`cqrs_resilience.otel.instrument()`, the `hook_events` pytest fixture) fills them:

- `MEASURE`: one `Measure`, told when a handled command starts and ends and when each attempt
  starts and ends. `handle()`, `retry()` and `resolve_conflicts()` read it once per call;
  while it is None they run exactly as without this module, so the uninstrumented happy path
  pays one global read per behaviour.
- `EVENT_SINKS`: callables that receive every event the behaviours announce, `(name,
  context)`, whatever `HookRegistry` the behaviour reports to. Read only on the paths that
  emit events (a retry, a conflict, a circuit changing state), never on the happy path.

A handled command is a call of `PipelinedCommandHandler.handle()`, or of the outermost
`retry()` / `resolve_conflicts()` that opens the command's idempotency scope (a function-style
pipeline). An attempt is one call a `retry()` or `resolve_conflicts()` makes to what it wraps;
the `Measure` decides which of nested attempts to record.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

EventSink = Callable[[str, dict[str, Any]], None]
"""Receives `(event name, hook context)` for every announced event; must not raise."""


class Finish(Protocol):
    """Ends what a `Measure` started: with the error that ended it, or None on success."""

    def __call__(self, error: BaseException | None, /) -> None: ...


class Measure(Protocol):
    """What instrumentation implements to time commands and attempts."""

    def command(self, handler_type: str, command: Any) -> Finish:
        """A handled command starts; call the result when it ends."""
        ...

    def attempt(self, handler_type: str, command: Any) -> Finish:
        """An attempt at `command` starts; call the result when it ends."""
        ...


MEASURE: Measure | None = None
EVENT_SINKS: tuple[EventSink, ...] = ()


def set_measure(measure: Measure | None) -> Callable[[], None]:
    """Install `measure` in place of any other; returns a function that removes it (and only
    it: once another measure replaced it, the function does nothing)."""
    global MEASURE
    MEASURE = measure

    def remove() -> None:
        global MEASURE
        if MEASURE is measure:
            MEASURE = None

    return remove


def add_event_sink(sink: EventSink) -> Callable[[], None]:
    """Send every announced event to `sink` too; returns a function that stops it."""
    global EVENT_SINKS
    EVENT_SINKS = (*EVENT_SINKS, sink)

    def remove() -> None:
        global EVENT_SINKS
        EVENT_SINKS = tuple(s for s in EVENT_SINKS if s is not sink)

    return remove


# What the behaviours call on their instrumented path (only while MEASURE is set).


async def run_command(
    measure: Measure, handler_type: str, command: Any, call: Callable[[], Awaitable[T]]
) -> T:
    """Run `call()` as one handled command."""
    finish = measure.command(handler_type, command)
    try:
        result = await call()
    except BaseException as exc:
        finish(exc)
        raise
    finish(None)
    return result


def run_command_sync(measure: Measure, handler_type: str, command: Any, call: Callable[[], T]) -> T:
    """`run_command` for sync functions."""
    finish = measure.command(handler_type, command)
    try:
        result = call()
    except BaseException as exc:
        finish(exc)
        raise
    finish(None)
    return result


def timed(
    measure: Measure, handler_type: str, command: Any, fn: Callable[..., Awaitable[T]]
) -> Callable[..., Awaitable[T]]:
    """`fn`, each call of it measured as one attempt at `command`."""

    async def attempt(*args: Any, **kwargs: Any) -> T:
        finish = measure.attempt(handler_type, command)
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            finish(exc)
            raise
        finish(None)
        return result

    return attempt


def timed_sync(
    measure: Measure, handler_type: str, command: Any, fn: Callable[..., T]
) -> Callable[..., T]:
    """`timed` for sync functions."""

    def attempt(*args: Any, **kwargs: Any) -> T:
        finish = measure.attempt(handler_type, command)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            finish(exc)
            raise
        finish(None)
        return result

    return attempt
