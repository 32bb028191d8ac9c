"""Observability hooks: subscribe callables to events by shell-style glob.

Emitting is on the retry and conflict paths, so the check for "does anyone listen?" is one
dict lookup: callers ask `wants(event)` before they build a context dict.
"""

from __future__ import annotations

import asyncio
import fnmatch
import inspect
import logging
import types
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

logger = logging.getLogger("cqrs_resilience")

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


class HookRegistry:
    """Subscribers by glob pattern; a raising subscriber is logged, never propagated."""

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
    """The name hooks report: the handler class for bound methods, else the function."""
    target: Any = fn
    while target is not None:
        owner = getattr(target, "__self__", None)
        if owner is not None and not isinstance(owner, types.ModuleType):
            return type(owner).__name__
        target = getattr(target, "__wrapped__", None)
    return str(getattr(fn, "__qualname__", type(fn).__name__))


_global = HookRegistry()


def get_hook_registry() -> HookRegistry:
    """The process-wide registry that behaviours use unless given `hooks=`."""
    return _global
