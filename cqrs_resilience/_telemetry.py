"""The seam through which optional instrumentation sees commands, attempts and events.

The core depends on no telemetry library. It knows two slots, both empty unless something
(`cqrs_resilience.otel.instrument()`, the `hook_events` pytest fixture) fills them:

- `MEASURE`: one `Measure`, told when a handled command starts; the `CommandRecord` it returns
  is told when an attempt fails and when another starts, and when the command ends. While it
  is None everything runs as without this module: `handle()` pays one global read, and a
  behavior inside it nothing at all.
- `EVENT_SINKS`: callables that receive every event the behaviors announce, `(name,
  context)`, whatever `HookRegistry` the behavior reports to. Read only on the paths that
  emit events (a retry, a conflict, a circuit changing state), never on the happy path.

A handled command is a call of `PipelinedCommandHandler.handle()` for a command not already
being handled, or of the outermost `retry()` / `resolve_conflicts()` around a function taking
a command: the call that opens the command's idempotency scope. Its record hangs on that scope
(`Scope.telemetry`), where the behaviors inside find it.

An attempt is one run of the innermost handler. The first starts with the command; an attempt
ends when a behavior catches its failure to handle it (a retry, a conflict round) and the next
starts when that behavior calls again; the last ends with the command. So with
`retry → resolve_conflicts → process`, each run of `process` is one attempt, and the backoff
sleeps and conflict merges between them belong to no attempt. No attempt is measured on the
happy path: the one attempt is the command, timed by the same two clock reads.

A `Measure` and its records are called on the command path without a guard around each call
(the core stays flat), so they must not raise: telemetry never changes a command's outcome.
`otel` guards every call it makes into OpenTelemetry, logging each kind of failure once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._idempotency import Scope

EventSink = Callable[[str, dict[str, Any]], None]
"""Receives `(event name, hook context)` for every announced event; should not raise."""


class CommandRecord(Protocol):
    """One handled command, as the instrumentation follows it."""

    def attempt_failed(self, error: BaseException, /) -> None:
        """A behavior caught this failure of the current attempt (to retry it, or give up)."""

    def attempt_started(self) -> None:
        """A behavior calls its handler again: the next attempt starts."""

    def finish(self, error: BaseException | None, /) -> None:
        """The command ended: with this error, or None on success."""

    def abandon(self) -> None:
        """The call was no command after all: a sync function returned an awaitable, and the
        command runs, under a record of its own, when that is awaited. Record nothing."""


class Measure(Protocol):
    """What instrumentation implements to follow commands and their attempts."""

    def command(self, handler_type: str, command: Any, *, attempts: bool) -> CommandRecord:
        """A handled command starts. `attempts` is False when the behaviors cannot report
        its attempts (a handler's argument with no `command_id`: it has no scope)."""
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


# What the behaviors call on the retry and conflict paths.


def record_of(scope: Scope | None, command: Any) -> CommandRecord | None:
    """The record of the handled command a behavior's call is about, if it is one: the
    scope's command, or a rebuild of it (same `command_id`). A retry deeper inside, around a
    call about something else, has none. Called on the retry and conflict paths only."""
    if scope is None:
        return None
    root = scope.root or scope
    record: CommandRecord | None = root.telemetry
    if record is None:
        return None
    if command is root.command or getattr(command, "command_id", None) == root.command_id:
        return record
    return None
