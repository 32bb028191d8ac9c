"""Observability hooks: subscribe callables to events by shell-style glob; announcing events.

A behavior announces an event to three audiences: the log (logger `"cqrs_resilience"`, at the
event's level in `LEVELS`), the telemetry seam's event sinks (`_telemetry`), and the
subscribers of its `HookRegistry`. Events happen only off the happy path (a retry, a conflict,
a circuit changing state), and even there a behavior asks `observed(hooks, event)` (a dict
lookup, a tuple check and `logger.isEnabledFor`) before it builds a context or a message.
"""

from __future__ import annotations

import asyncio
import fnmatch
import inspect
import logging
import types
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

from . import _telemetry

logger = logging.getLogger("cqrs_resilience")
# The application decides where logs go; without this, Python's last-resort handler would
# print our warnings to stderr.
logger.addHandler(logging.NullHandler())

HookContext: TypeAlias = dict[str, Any]
Hook: TypeAlias = Callable[[HookContext], Awaitable[None] | None]
H = TypeVar("H", bound=Hook)

RETRY_SCHEDULED = "handler.retry.scheduled"
RETRY_EXHAUSTED = "handler.retry.exhausted"
RETRY_BUDGET_EXHAUSTED = "handler.retry.budget_exhausted"
CONFLICT_DETECTED = "handler.conflict.detected"
CONFLICT_RESOLVED = "handler.conflict.resolved"
CONFLICT_FAILED = "handler.conflict.failed"
CIRCUIT_OPENED = "handler.circuit.opened"
CIRCUIT_HALF_OPENED = "handler.circuit.half_opened"
CIRCUIT_CLOSED = "handler.circuit.closed"

EVENTS = (
    RETRY_SCHEDULED,
    RETRY_EXHAUSTED,
    RETRY_BUDGET_EXHAUSTED,
    CONFLICT_DETECTED,
    CONFLICT_RESOLVED,
    CONFLICT_FAILED,
    CIRCUIT_OPENED,
    CIRCUIT_HALF_OPENED,
    CIRCUIT_CLOSED,
)

LEVELS: dict[str, int] = {
    RETRY_SCHEDULED: logging.DEBUG,
    RETRY_EXHAUSTED: logging.WARNING,
    RETRY_BUDGET_EXHAUSTED: logging.WARNING,
    CONFLICT_DETECTED: logging.DEBUG,
    CONFLICT_RESOLVED: logging.DEBUG,
    CONFLICT_FAILED: logging.WARNING,
    CIRCUIT_OPENED: logging.WARNING,
    CIRCUIT_HALF_OPENED: logging.INFO,
    CIRCUIT_CLOSED: logging.INFO,
}
"""The level each event is logged at: routine handling at DEBUG, giving up and an opened
circuit at WARNING, a circuit probing or recovering at INFO."""

# Formatted by logging itself, from the context as the record's args, only when emitted.
_MESSAGES: dict[str, str] = {
    RETRY_SCHEDULED: "%(handler.type)s (%(command.type)s): retry %(attempt)s of "
    "%(max_retries)s in %(delay_ms).0f ms after %(error)r",
    RETRY_EXHAUSTED: "%(handler.type)s (%(command.type)s): gave up after %(attempt)s of "
    "%(max_retries)s retries: %(reason)s: %(error)r",
    RETRY_BUDGET_EXHAUSTED: "%(handler.type)s (%(command.type)s): gave up after %(attempt)s of "
    "%(max_retries)s retries: %(reason)s: %(error)r",
    CONFLICT_DETECTED: "%(handler.type)s (%(command.type)s): conflict %(attempt)s of "
    "%(max_retries)s (%(policy)s): %(error)r",
    CONFLICT_RESOLVED: "%(handler.type)s (%(command.type)s): conflict resolved after "
    "%(attempt)s of %(max_retries)s resolution attempts (%(policy)s)",
    CONFLICT_FAILED: "%(handler.type)s (%(command.type)s): conflict not resolved "
    "(%(policy)s): %(error)r",
    CIRCUIT_OPENED: "circuit opened for %(break_duration_s)s s by %(handler.type)s: %(error)r",
    CIRCUIT_HALF_OPENED: "circuit half-open: %(handler.type)s makes the trial call",
    CIRCUIT_CLOSED: "circuit closed: %(handler.type)s's trial call succeeded",
}
_RESET_MESSAGE = "circuit closed by reset()"
_COMMAND = " (%(command.type)s)"
_OF_MAX = " of %(max_retries)s"


def _message(event: str, context: HookContext) -> str:
    """The format of `event`'s log line, for this context: a call about no command (a plain
    function's arguments) is named by its function alone, `charge: ...`, not `charge (str)`;
    retries a tenacity `stop=` strategy counts have no "of N"."""
    message = _MESSAGES.get(event, "%(event)s")
    if event == CIRCUIT_CLOSED and context.get("handler.type") is None:
        return _RESET_MESSAGE
    if context.get("command.type") is None:
        message = message.replace(_COMMAND, "")
    if "max_retries" in context and context["max_retries"] is None:
        message = message.replace(_OF_MAX, "")
    return message


class HookRegistry:
    """Subscribers by glob pattern; a raising subscriber is logged, never propagated.

    A subscriber gets one dict, the event's context. Every context has `event` (the event's
    name), `handler.type` (the handler class, or the function) and `command.type` (the
    command's class; None for a call about no command, such as a plain function's arguments).

    The retry events add `attempt` (scheduled: k for the k-th retry, about to happen;
    exhausted: the retries made), `max_retries` (the retries allowed; None when a tenacity
    `stop=` strategy counts them), `delay_ms` (the wait before the retry, after jitter and
    `retry_after`; None when giving up), `error` (the exception), `policy`, `strategy` (None),
    `budget` (the `RetryBudget`, or None) and `reason`: when giving up, why (all retries used,
    a cap, the deadline, the retry budget, the circuit breaker, a stop strategy), the same text
    that ends the log line and the error's note; None for a scheduled retry.

    The conflict events add `attempt` (the resolution attempt the event is about, 1 for the
    first),
    `max_retries` (the config's `max_attempts`), `delay_ms` (None), `error`, `policy` and
    `strategy` (the merge strategy's name under MERGE, else None).

    The circuit events add `error` (the failure that opened the circuit; None for the others),
    `break_duration_s`, and `failure_ratio` and `throughput` (of the window that opened it;
    None when a failed trial call reopened it).
    """

    def __init__(self) -> None:
        self._subscriptions: list[tuple[str, Hook]] = []
        self._by_event: dict[str, tuple[Hook, ...]] = {}
        self._background: set[asyncio.Task[None]] = set()

    def hook(self, pattern: str) -> Callable[[H], H]:
        """Decorator: call the function with the context of every event matching `pattern`."""

        def subscribe(fn: H) -> H:
            self.subscribe(pattern, fn)
            return fn

        return subscribe

    def subscribe(self, pattern: str, fn: Hook) -> Callable[[], None]:
        """Subscribe `fn` to `pattern`; returns a function that unsubscribes it."""
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"hook pattern must be a non-empty string, got {pattern!r}")
        if not callable(fn):
            raise TypeError(f"hook must be callable, got {fn!r}")
        entry = (pattern, fn)
        self._subscriptions.append(entry)
        self._by_event.clear()

        def unsubscribe() -> None:
            if entry in self._subscriptions:
                self._subscriptions.remove(entry)
                self._by_event.clear()

        return unsubscribe

    def clear(self) -> None:
        """Remove every subscriber."""
        self._subscriptions.clear()
        self._by_event.clear()

    def subscribers(self, event: str) -> tuple[Hook, ...]:
        """The subscribers of `event`, in subscription order."""
        found = self._by_event.get(event)
        if found is None:
            found = tuple(
                fn for pattern, fn in self._subscriptions if fnmatch.fnmatchcase(event, pattern)
            )
            self._by_event[event] = found
        return found

    def wants(self, event: str) -> bool:
        """Whether anyone listens to `event`: check before building a context."""
        found = self._by_event.get(event)
        return bool(found if found is not None else self.subscribers(event))

    async def emit(self, event: str, context: HookContext) -> None:
        """Call every subscriber of `event`, awaiting async ones."""
        for fn in self.subscribers(event):
            try:
                result = fn(context)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.warning("hook %r for %s raised; ignored", fn, event, exc_info=True)

    def emit_sync(self, event: str, context: HookContext) -> None:
        """Call every subscriber from sync code.

        An async subscriber runs on the running loop as a task (this code cannot wait for
        it), or to completion in a fresh loop when none runs.
        """
        for fn in self.subscribers(event):
            try:
                result = fn(context)
                if inspect.iscoroutine(result):
                    self._run_detached(result, event, fn)
            except Exception:
                logger.warning("hook %r for %s raised; ignored", fn, event, exc_info=True)

    def _run_detached(self, coro: Any, event: str, fn: Hook) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(coro)
            return
        task = loop.create_task(coro)
        self._background.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                logger.warning("hook %r for %s raised; ignored", fn, event, exc_info=t.exception())

        task.add_done_callback(done)

    def __repr__(self) -> str:
        patterns = sorted({pattern for pattern, _ in self._subscriptions})
        return f"HookRegistry({len(self._subscriptions)} subscriber(s) on {patterns})"


def describe_handler(fn: Callable[..., Any]) -> str:
    """The name hooks report as `handler.type`: the handler class for bound methods, else the
    function (or the callable object's class) innermost in the `__wrapped__` chain. With
    `command.type` (the command's class, or None for a call about no command) it makes the
    label of log lines: `SendEmailHandler (SendEmail)`, or `charge` alone."""
    target: Any = fn
    while True:
        owner = getattr(target, "__self__", None)
        if owner is not None and not isinstance(owner, types.ModuleType):
            return type(owner).__name__
        inner = getattr(target, "__wrapped__", None)
        if inner is None:
            break
        target = inner
    # The innermost: a function by its name, a callable object by its class.
    return str(getattr(target, "__qualname__", type(target).__name__))


_global = HookRegistry()


def get_hook_registry() -> HookRegistry:
    """The process-wide registry that behaviors use unless given `hooks=`."""
    return _global


# Announcing: what the behaviors call, so the log and the telemetry see every event too.


def observed(hooks: HookRegistry, event: str) -> bool:
    """Whether announcing `event` reaches anyone (a subscriber, a telemetry sink, the log):
    check before building a context."""
    found = hooks._by_event.get(event)  # wants(), inlined: this runs on every retry
    if found or _telemetry.EVENT_SINKS or (found is None and hooks.wants(event)):
        return True
    return logger.isEnabledFor(LEVELS[event])


def _log_and_sink(event: str, context: HookContext) -> None:
    level = LEVELS.get(event, logging.DEBUG)
    if logger.isEnabledFor(level):
        logger.log(level, _message(event, context), context)
    for sink in _telemetry.EVENT_SINKS:
        try:
            sink(event, context)
        except Exception:
            logger.warning("event sink %r for %s raised; ignored", sink, event, exc_info=True)


async def announce(hooks: HookRegistry, event: str, context: HookContext) -> None:
    """Log `event`, hand it to the telemetry sinks, then to `hooks`' subscribers."""
    _log_and_sink(event, context)
    await hooks.emit(event, context)


def announce_sync(hooks: HookRegistry, event: str, context: HookContext) -> None:
    """`announce` from sync code."""
    _log_and_sink(event, context)
    hooks.emit_sync(event, context)
