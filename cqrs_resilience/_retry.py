"""`retry()`: the behaviour that retries transient failures with backoff.

The first attempt runs outside tenacity, inside a bare try/except, so a call that succeeds
pays almost nothing. Only after a retryable failure does tenacity's machinery take over: its
call state counts attempts, `stop_after_attempt` ends the budget, and the policy becomes a
tenacity wait strategy. Each call has its own state; nothing is shared between calls.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeAlias, TypeVar, cast, overload

import tenacity

from ._clock import SYSTEM_CLOCK, Clock, is_testing
from ._errors import TransientError
from ._hooks import (
    RETRY_EXHAUSTED,
    RETRY_SCHEDULED,
    HookRegistry,
    describe_handler,
    get_hook_registry,
)
from ._messages import Command
from ._policies import ExponentialBackoffPolicy, RetryPolicy

P = ParamSpec("P")
T = TypeVar("T")

RetryOn: TypeAlias = type[Exception] | tuple[type[Exception], ...] | Callable[[BaseException], bool]

DEFAULT_RETRY_ON: tuple[type[Exception], ...] = (TransientError, ConnectionError, TimeoutError)
"""Retried when `on` is not given. `asyncio.TimeoutError` is `TimeoutError` on 3.11+."""

DEFAULT_POLICY = ExponentialBackoffPolicy()
_POLICY_TYPES: set[type] = set()


def _predicate(on: RetryOn | None) -> Callable[[Exception], bool]:
    """Turn `on` into a test; only `Exception`s ever reach it, so cancellation never retries."""
    if on is None:
        on = DEFAULT_RETRY_ON
    if isinstance(on, type) and issubclass(on, BaseException):
        on = (on,)
    if isinstance(on, tuple):
        for kind in on:
            if not (isinstance(kind, type) and issubclass(kind, BaseException)):
                raise TypeError(f"retry(on=...) takes exception types, got {kind!r}")
        kinds = on
        return lambda exc: isinstance(exc, kinds)
    if callable(on):
        return cast(Callable[[Exception], bool], on)
    raise TypeError(f"retry(on=...) takes exception types or a predicate, got {on!r}")


def command_of(args: tuple[Any, ...]) -> Any:
    """The command a call is about: its first argument, or its second after a `self`."""
    for arg in args[:2]:
        if isinstance(arg, Command):
            return arg
    return args[0] if args else None


class _PolicyWait(tenacity.wait.wait_base):
    """A retry policy seen as a tenacity wait strategy (seconds)."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return self.policy.backoff_ms(retry_state.attempt_number) / 1000


class _Attempts:
    """One call's retry state: the tenacity call state, its stop and wait, and who it is for."""

    __slots__ = ("command", "policy", "state", "stop", "wait")

    def __init__(self, policy: RetryPolicy, command: Any, fn: Any, args: Any, kwargs: Any):
        self.policy = policy
        self.command = command
        self.state = tenacity.RetryCallState(cast(Any, None), fn, args, kwargs)
        self.stop = tenacity.stop_after_attempt(policy.max_retries + 1)
        self.wait = _PolicyWait(policy)


class Retry:
    """The behaviour `retry()` returns; apply it to an async or sync function."""

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        on: RetryOn | None = None,
        hooks: HookRegistry | None = None,
        clock: Clock | None = None,
    ) -> None:
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise TypeError(
                f"retry() takes a RetryPolicy (max_retries and backoff_ms()), got {policy!r}"
            )
        self.policy = policy
        self.on = on
        self.hooks = hooks
        self.clock = clock
        self._should_retry = _predicate(on)

    def __repr__(self) -> str:
        parts = [repr(self.policy)] if self.policy is not None else []
        if self.on is not None:
            parts.append(f"on={self.on!r}")
        return f"retry({', '.join(parts)})"

    @overload
    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]: ...
    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        if not callable(fn):
            raise TypeError(f"retry() wraps a callable, got {fn!r}")
        should_retry = self._should_retry
        handler_type = describe_handler(fn)
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
        ):
            async_fn = cast(Callable[P, Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def retrying(*args: P.args, **kwargs: P.kwargs) -> Any:
                try:
                    return await async_fn(*args, **kwargs)
                except Exception as exc:
                    if not should_retry(exc):
                        raise
                    failure = exc
                return await self._retry_async(handler_type, async_fn, args, kwargs, failure)

            return retrying

        @functools.wraps(fn)
        def retrying_sync(*args: P.args, **kwargs: P.kwargs) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not should_retry(exc):
                    raise
                failure = exc
            return self._retry_sync(handler_type, fn, args, kwargs, failure)

        return retrying_sync

    # The retry path: everything below runs only after a retryable failure.

    def _start(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Attempts:
        command = command_of(args)
        policy = getattr(command, "retry_policy", None) or self.policy or DEFAULT_POLICY
        # A Protocol isinstance check costs microseconds; check each policy type once.
        if type(policy) not in _POLICY_TYPES:
            if not isinstance(policy, RetryPolicy):
                raise TypeError(
                    f"{type(command).__name__}.retry_policy must be a RetryPolicy, got {policy!r}"
                )
            _POLICY_TYPES.add(type(policy))
        return _Attempts(policy, command, fn, args, kwargs)

    def _delay(self, run: _Attempts, exc: Exception) -> float | None:
        """Seconds to wait before the next attempt, or None when the budget is spent."""
        if run.stop(run.state):
            attempts = run.state.attempt_number
            exc.add_note(f"gave up after {attempts} attempt{'s' if attempts != 1 else ''}")
            return None
        if is_testing():
            return 0.0
        delay = run.wait(run.state)
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int | float) and retry_after > delay:
            delay = float(retry_after)
        return delay

    def _context(
        self, handler_type: str, run: _Attempts, exc: Exception, delay: float | None
    ) -> dict[str, Any]:
        return {
            "handler.type": handler_type,
            "command.type": type(run.command).__name__ if run.command is not None else None,
            # The k-th retry is about to happen (scheduled), or k retries were made (exhausted).
            "attempt": run.state.attempt_number - 1,
            "max_retries": run.policy.max_retries,
            "delay_ms": delay * 1000 if delay is not None else None,
            "error": exc,
            "policy": run.policy,
            "strategy": None,
        }

    async def _retry_async(
        self,
        handler_type: str,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        exc: Exception,
    ) -> Any:
        run = self._start(fn, args, kwargs)
        hooks = self.hooks or get_hook_registry()
        sleep = self.clock.sleep if self.clock is not None else asyncio.sleep
        while True:
            delay = self._delay(run, exc)
            if delay is None:
                if hooks.wants(RETRY_EXHAUSTED):
                    await hooks.emit(RETRY_EXHAUSTED, self._context(handler_type, run, exc, None))
                raise exc
            run.state.prepare_for_next_attempt()
            if hooks.wants(RETRY_SCHEDULED):
                await hooks.emit(RETRY_SCHEDULED, self._context(handler_type, run, exc, delay))
            if delay > 0 or not is_testing():
                await sleep(delay)
            try:
                return await fn(*args, **kwargs)
            except Exception as new:
                if not self._should_retry(new):
                    raise
                exc = new

    def _retry_sync(
        self,
        handler_type: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        exc: Exception,
    ) -> Any:
        run = self._start(fn, args, kwargs)
        hooks = self.hooks or get_hook_registry()
        clock = self.clock or SYSTEM_CLOCK
        while True:
            delay = self._delay(run, exc)
            if delay is None:
                if hooks.wants(RETRY_EXHAUSTED):
                    hooks.emit_sync(RETRY_EXHAUSTED, self._context(handler_type, run, exc, None))
                raise exc
            run.state.prepare_for_next_attempt()
            if hooks.wants(RETRY_SCHEDULED):
                hooks.emit_sync(RETRY_SCHEDULED, self._context(handler_type, run, exc, delay))
            if delay > 0:
                clock.sleep_sync(delay)
            try:
                return fn(*args, **kwargs)
            except Exception as new:
                if not self._should_retry(new):
                    raise
                exc = new


@overload
def retry(policy: Callable[P, T], /) -> Callable[P, T]: ...
@overload
def retry(
    policy: RetryPolicy | None = None,
    *,
    on: RetryOn | None = None,
    hooks: HookRegistry | None = None,
    clock: Clock | None = None,
) -> Retry: ...


def retry(
    policy: RetryPolicy | Callable[..., Any] | None = None,
    *,
    on: RetryOn | None = None,
    hooks: HookRegistry | None = None,
    clock: Clock | None = None,
) -> Retry | Callable[..., Any]:
    """Retry transient failures of an async or sync function, with backoff between attempts.

    `policy` is the default; a `retry_policy` on the call's command wins. `on` picks what is
    retried (types or a predicate); cancellation and interpreter exits never are. When the
    budget is spent the last error is raised itself, with a note saying how many attempts.
    `@retry` without parentheses uses the defaults.
    """
    if policy is not None and not isinstance(policy, RetryPolicy) and callable(policy):
        return Retry(on=on, hooks=hooks, clock=clock)(policy)
    return Retry(policy, on=on, hooks=hooks, clock=clock)
