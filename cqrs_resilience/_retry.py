"""`retry()`: the behavior that retries transient failures with backoff.

The first attempt runs outside tenacity, inside a bare try/except, so a call that succeeds
pays almost nothing. Only after a retryable failure does tenacity's machinery take over: its
call state counts attempts, `stop_after_attempt` ends the retries, and the policy becomes a
tenacity wait strategy; tenacity's own `stop=` and `wait=` strategies plug in the same way,
with the call state's times read from the behavior's clock. Each call has its own state;
what calls share is only what the user shares: a `RetryBudget`, or the deadline of a
`timeout()` around them, which no backoff may sleep past.

A call whose first argument is a command runs in the command's idempotency scope (see
`_idempotency`), so a write that committed before a timeout is recognized when retried, with
`retry()` alone as with a handler. What a command asks for is bounded by the behavior's caps:
its own `retry_policy` may not retry more than `max_retries_cap` times nor wait longer than
`max_delay_cap_s` before one retry; an error's `retry_after` is outside input too and is capped
the same way. The behavior's own policy is code, and trusted.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeAlias, TypeVar, cast, overload

import tenacity

from . import _telemetry
from ._budget import RetryBudget
from ._checks import setting
from ._clock import SYSTEM_CLOCK, Clock, is_testing
from ._deadline import time_left
from ._errors import BrokenCircuitError
from ._hooks import (
    RETRY_BUDGET_EXHAUSTED,
    RETRY_EXHAUSTED,
    RETRY_SCHEDULED,
    HookRegistry,
    announce,
    announce_sync,
    describe_handler,
    get_hook_registry,
    observed,
)
from ._idempotency import (
    CURRENT,
    Scope,
    attempt,
    attempt_needs_own_counts,
    enter,
)
from ._pipeline import NOT_AWAITABLE, BehaviorBase, returns_awaitable
from ._policies import ExponentialBackoffPolicy, RetryPolicy
from ._retry_on import RetryOn, command_of, command_type, predicate

P = ParamSpec("P")
T = TypeVar("T")

Stop: TypeAlias = Callable[[tenacity.RetryCallState], bool]
"""A tenacity stop strategy (`stop_after_attempt(5) | stop_after_delay(30)`, ...)."""
Wait: TypeAlias = Callable[[tenacity.RetryCallState], float]
"""A tenacity wait strategy, in seconds (`wait_random_exponential(max=10)`, ...)."""

DEFAULT_POLICY = ExponentialBackoffPolicy()
_POLICY_TYPES: set[type] = set()

MAX_RETRIES_CAP = 10
"""The most retries (more calls after the first) a command's own policy may ask for, unless
the behavior says otherwise."""
MAX_DELAY_CAP_S = 60.0
"""The longest wait before one retry that a command's policy or an error's `retry_after` may
ask for, in seconds, unless the behavior says otherwise."""


def check_cap(name: str, value: object, *, seconds: bool = False) -> None:
    """Caps are code, but a wrong one must fail at construction, naming the argument."""
    setting(
        name,
        value,
        "a finite number >= 0",
        lambda v: 0 <= v < math.inf,
        kind="a number" if seconds else "an int",
        integer=not seconds,
    )


class _PolicyWait(tenacity.wait.wait_base):
    """A retry policy seen as a tenacity wait strategy (seconds), at most `cap_s` when the
    policy came from outside; a negative or NaN delay counts as none."""

    def __init__(self, policy: RetryPolicy, cap_s: float) -> None:
        self.policy = policy
        self.cap_s = cap_s

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        delay = self.policy.backoff_ms(retry_state.attempt_number) / 1000
        return min(delay, self.cap_s) if delay > 0 else 0.0


def _seconds(value: float) -> str:
    return f"{max(value, 0.0):.3g} s" if value < 100 else f"{value:.0f} s"


def _attempts(state: tenacity.RetryCallState) -> str:
    count = state.attempt_number
    return f"gave up after {count} attempt{'s' if count != 1 else ''}"


def _stop_reason(stop: Stop, state: tenacity.RetryCallState) -> str:
    """Why a tenacity stop strategy ended the retries, in its own terms."""
    if isinstance(stop, tenacity.stop_any):
        for part in stop.stops:
            if part(state):
                return _stop_reason(part, state)
    if isinstance(stop, tenacity.stop_after_attempt):
        return f"all {stop.max_attempt_number} attempts made (stop_after_attempt)"
    if isinstance(stop, tenacity.stop_after_delay):
        return f"the deadline of {_seconds(stop.max_delay)} passed (stop_after_delay)"
    if isinstance(stop, tenacity.stop_before_delay):
        return (
            f"the next wait would end after the deadline of {_seconds(stop.max_delay)} "
            "(stop_before_delay)"
        )
    name = getattr(stop, "__qualname__", None) or type(stop).__name__
    return f"the stop strategy {name} ended them"


class _Attempts:
    """One call's retry state: the tenacity call state, its stop and wait, who it is for, the
    idempotency scope its re-attempts run in, and once it gives up, why."""

    __slots__ = (
        "asked",
        "changes",
        "command",
        "max_retries",
        "policy",
        "reason",
        "scope",
        "skipped",
        "state",
        "stop",
        "wait",
    )

    def __init__(
        self,
        policy: RetryPolicy,
        stop: Stop,
        wait: Wait,
        max_retries: int | None,
        command: Any,
        call: tuple[Any, tuple[Any, ...], dict[str, Any]],
        scope: tuple[Scope | None, int],
        asked: int | None = None,
    ):
        self.policy = policy
        self.max_retries = max_retries
        self.asked = asked  # the retries a command's policy asked for, when a cap cut them
        self.reason: str | None = None
        self.command = command
        self.state = tenacity.RetryCallState(cast(Any, None), *call)
        self.stop = stop
        self.wait = wait
        self.scope, self.changes = scope
        self.skipped = 0.0  # seconds of waits `set_testing()` skipped


class Retry(BehaviorBase):
    """The behavior `retry()` returns; apply it to an async or sync function."""

    called = "retry()"

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        stop: Stop | None = None,
        wait: Wait | None = None,
        on: RetryOn | None = None,
        budget: RetryBudget | None = None,
        hooks: HookRegistry | None = None,
        clock: Clock | None = None,
        max_retries_cap: int = MAX_RETRIES_CAP,
        max_delay_cap_s: float = MAX_DELAY_CAP_S,
    ) -> None:
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise TypeError(
                f"retry() takes a RetryPolicy (max_retries and backoff_ms()), got {policy!r}"
            )
        for name, strategy in (("stop", stop), ("wait", wait)):
            if strategy is not None and not callable(strategy):
                raise TypeError(
                    f"retry({name}=...) takes a tenacity {name} strategy, got {strategy!r}"
                )
        if budget is not None and not isinstance(budget, RetryBudget):
            raise TypeError(f"retry(budget=...) takes a RetryBudget, got {budget!r}")
        check_cap("max_retries_cap", max_retries_cap)
        check_cap("max_delay_cap_s", max_delay_cap_s, seconds=True)
        self.policy = policy
        self.stop = stop
        self.wait = wait
        self.on = on
        self.budget = budget
        self.hooks = hooks
        self.clock = clock
        self.max_retries_cap = max_retries_cap
        self.max_delay_cap_s = float(max_delay_cap_s)
        self._should_retry = predicate(on)
        self._now = (clock or SYSTEM_CLOCK).monotonic

    def __repr__(self) -> str:
        parts = [repr(self.policy)] if self.policy is not None else []
        for name in ("stop", "wait", "on", "budget"):
            if getattr(self, name) is not None:
                parts.append(f"{name}={getattr(self, name)!r}")
        if self.max_retries_cap != MAX_RETRIES_CAP:
            parts.append(f"max_retries_cap={self.max_retries_cap}")
        if self.max_delay_cap_s != MAX_DELAY_CAP_S:
            parts.append(f"max_delay_cap_s={self.max_delay_cap_s}")
        return f"retry({', '.join(parts)})"

    def _wrap_async(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        should_retry = self._should_retry
        handler_type = describe_handler(fn)
        deposit = self.budget.deposit if self.budget is not None else None
        # tenacity's strategies may count time from the first attempt: read the clock for them.
        now = self._now if self.stop is not None or self.wait is not None else None
        async_fn = cast(Callable[P, Awaitable[Any]], fn)

        @functools.wraps(fn)
        async def retrying(*args: P.args, **kwargs: P.kwargs) -> Any:
            # The command's idempotency scope; inside handle() it is already open.
            scope, token = CURRENT.get(), None
            if scope is None or not args or args[0] is not scope.command:
                scope, token = enter(args)
            changes = scope.changes if scope is not None else 0
            if deposit is not None:
                deposit()
            started = now() if now is not None else 0.0
            try:
                # Instrumented, the call that opened its command's scope handles it.
                if token is not None and (measure := _telemetry.MEASURE) is not None:
                    call = (async_fn, args, kwargs)
                    return await self._handled_async(
                        handler_type, call, (scope, changes), started, measure
                    )
                try:
                    return await async_fn(*args, **kwargs)
                except Exception as exc:
                    if not should_retry(exc):
                        raise
                    failure = exc
                call = (async_fn, args, kwargs)
                return await self._retry_async(
                    handler_type, call, failure, (scope, changes), started
                )
            finally:
                if token is not None:
                    CURRENT.reset(token)

        return retrying

    def _wrap_sync(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        should_retry = self._should_retry
        handler_type = describe_handler(fn)
        deposit = self.budget.deposit if self.budget is not None else None
        now = self._now if self.stop is not None or self.wait is not None else None
        twin: Callable[P, Any] | None = None  # the async wrapper, once fn returned an awaitable

        @functools.wraps(fn)
        def retrying_sync(*args: P.args, **kwargs: P.kwargs) -> Any:
            nonlocal twin
            if twin is not None:
                return twin(*args, **kwargs)
            scope, token = CURRENT.get(), None
            if scope is None or not args or args[0] is not scope.command:
                scope, token = enter(args)
            changes = scope.changes if scope is not None else 0
            if deposit is not None:
                deposit()
            started = now() if now is not None else 0.0
            try:
                if token is not None and (measure := _telemetry.MEASURE) is not None:
                    call = (fn, args, kwargs)
                    result = self._handled_sync(
                        handler_type, call, (scope, changes), started, measure
                    )
                else:
                    try:
                        result = fn(*args, **kwargs)
                    except Exception as exc:
                        if not should_retry(exc):
                            raise
                        call = (fn, args, kwargs)
                        result = self._retry_sync(
                            handler_type, call, exc, (scope, changes), started
                        )
            finally:
                if token is not None:
                    CURRENT.reset(token)
            if type(result) not in NOT_AWAITABLE and returns_awaitable(result):
                # fn is async in disguise (a lambda around an async function): this call's
                # attempts, and every later call, go the async way.
                twin = self._wrap_async(fn)
                return self._adopt(fn, result, args, kwargs)
            return result

        return retrying_sync

    def _adopt(
        self, fn: Callable[..., Any], awaitable: Any, args: tuple[Any, ...], kwargs: Any
    ) -> Any:
        """The async way for a call of sync `fn` that returned `awaitable`: a coroutine that
        awaits it as the first attempt and calls `fn` again for each retry. Attempts made
        before, at sync calls that raised, are not counted against the policy again."""
        pending = [awaitable]

        @functools.wraps(fn)
        def first_then_anew(*args: Any, **kwargs: Any) -> Any:
            return pending.pop() if pending else fn(*args, **kwargs)

        return self._wrap_async(first_then_anew)(*args, **kwargs)

    # Instrumented, a call that opened its command's scope is a handled command.

    async def _handled_async(
        self,
        handler_type: str,
        call: tuple[Callable[..., Awaitable[Any]], tuple[Any, ...], dict[str, Any]],
        scope: tuple[Scope | None, int],
        started: float,
        measure: _telemetry.Measure,
    ) -> Any:
        fn, args, kwargs = call
        opened = scope[0]
        command = opened.command if opened is not None else command_of(args)
        record = measure.command(handler_type, command, attempts=True)
        if opened is not None:  # always: this call opened it
            opened.telemetry = record
        try:
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                if not self._should_retry(exc):
                    raise
                result = await self._retry_async(handler_type, call, exc, scope, started)
        except BaseException as exc:
            record.finish(exc)
            raise
        record.finish(None)
        return result

    def _handled_sync(
        self,
        handler_type: str,
        call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]],
        scope: tuple[Scope | None, int],
        started: float,
        measure: _telemetry.Measure,
    ) -> Any:
        fn, args, kwargs = call
        opened = scope[0]
        command = opened.command if opened is not None else command_of(args)
        record = measure.command(handler_type, command, attempts=True)
        if opened is not None:  # always: this call opened it
            opened.telemetry = record
        try:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if not self._should_retry(exc):
                    raise
                result = self._retry_sync(handler_type, call, exc, scope, started)
        except BaseException as exc:
            record.finish(exc)
            raise
        if type(result) not in NOT_AWAITABLE and returns_awaitable(result):
            record.abandon()  # the command runs when the awaitable is, under its own record
            return result
        record.finish(None)
        return result

    # The retry path: everything below runs only after a retryable failure.

    def _start(
        self,
        call: tuple[Any, tuple[Any, ...], dict[str, Any]],
        scope: tuple[Scope | None, int],
        started: float,
        failure: Exception,
    ) -> _Attempts:
        command = command_of(call[1])
        policy = getattr(command, "retry_policy", None)
        if policy is not None:
            # Outside input: checked before use (a Protocol isinstance check costs microseconds,
            # so once per policy type), and bounded by the caps.
            if type(policy) not in _POLICY_TYPES:
                if not isinstance(policy, RetryPolicy):
                    raise TypeError(
                        f"{type(command).__name__}.retry_policy must be a RetryPolicy, "
                        f"got {policy!r}"
                    ) from failure
                _POLICY_TYPES.add(type(policy))
            wanted = policy.max_retries
            max_retries, cap_s = min(wanted, self.max_retries_cap), self.max_delay_cap_s
            cut = wanted if max_retries < wanted else None
        else:
            policy = self.policy or DEFAULT_POLICY  # checked when the behavior was made
            max_retries, cap_s, cut = policy.max_retries, math.inf, None
        # Strategies written in code replace the policy's count or delays, and are trusted.
        if self.stop is None:
            stop: Stop = tenacity.stop_after_attempt(max_retries + 1)
        else:
            stop, max_retries = self.stop, None
        wait = self.wait if self.wait is not None else _PolicyWait(policy, cap_s)
        run = _Attempts(policy, stop, wait, max_retries, command, call, scope, cut)
        if self.stop is not None or self.wait is not None:
            run.state.start_time = started
        return run

    def _delay(self, run: _Attempts, exc: Exception) -> float | str:
        """Seconds to wait before the next attempt, or the event to emit when giving up.

        In tenacity's order (wait, then stop, so `stop_before_delay` sees the wait), then the
        deadline of any `timeout()` around the call, then the budget, which is only drawn on
        for a retry that will happen.
        """
        state = run.state
        if self.stop is not None or self.wait is not None:
            # What tenacity's own strategies read, on our clock.
            state.outcome = tenacity.Future.construct(state.attempt_number, exc, True)
            state.outcome_timestamp = self._now() + run.skipped
        if is_testing():
            delay = 0.0
            if self.stop is not None:
                # A skipped wait still counts for a time-based stop, or it would never stop.
                run.skipped += run.wait(state)
        else:
            delay = run.wait(state)
            retry_after = getattr(exc, "retry_after", None)
            if isinstance(retry_after, int | float) and not isinstance(retry_after, bool):
                # A server's Retry-After is outside input: at most the cap, whatever the policy.
                delay = max(delay, min(float(retry_after), self.max_delay_cap_s))
        state.upcoming_sleep = delay
        if run.stop(state):
            return self._give_up(run, exc, RETRY_EXHAUSTED, self._stopped(run))
        left = time_left()
        if left is not None and delay > left:
            reason = (
                f"the next wait of {_seconds(delay)} would end after the deadline "
                f"({_seconds(left)} left)"
            )
            return self._give_up(run, exc, RETRY_EXHAUSTED, reason)
        if self.budget is not None and not self.budget.try_withdraw():
            reason = f"the retry budget is spent ({self.budget!r})"
            return self._give_up(run, exc, RETRY_BUDGET_EXHAUSTED, reason)
        return delay

    def _stopped(self, run: _Attempts) -> str:
        """Why the count ran out: the stop strategy, a cap on the command's policy, or the
        policy's own count."""
        if self.stop is not None:
            return _stop_reason(self.stop, run.state)
        if run.asked is not None:
            return f"max_retries_cap={run.max_retries} caps the command's max_retries={run.asked}"
        if run.max_retries == 0:
            return "retries are off (max_retries=0)"
        return f"all retries used (max_retries={run.max_retries})"

    def _refused(self, run: _Attempts, refusal: BrokenCircuitError) -> str:
        """A circuit breaker inside refused a retry (its refusal is not retried): give up."""
        reason = f"the circuit breaker refused retry {run.state.attempt_number - 1}: {refusal}"
        return self._give_up(run, refusal, RETRY_EXHAUSTED, reason)

    @staticmethod
    def _give_up(run: _Attempts, exc: Exception, event: str, reason: str) -> str:
        """Note on `exc` how many attempts were made and why no more: `event` to announce."""
        run.reason = reason
        exc.add_note(f"{_attempts(run.state)}: {reason}")
        return event

    def _context(
        self, event: str, handler_type: str, run: _Attempts, exc: Exception, delay: float | None
    ) -> dict[str, Any]:
        return {
            "event": event,
            "handler.type": handler_type,
            "command.type": command_type(run.command),
            # The k-th retry is about to happen (scheduled), or k retries were made (exhausted).
            "attempt": run.state.attempt_number - 1,
            "max_retries": run.max_retries,
            "delay_ms": delay * 1000 if delay is not None else None,
            "error": exc,
            "policy": run.policy,
            "strategy": None,
            "budget": self.budget,
            "reason": run.reason,
        }

    async def _retry_async(
        self,
        handler_type: str,
        call: tuple[Callable[..., Awaitable[Any]], tuple[Any, ...], dict[str, Any]],
        exc: Exception,
        scope: tuple[Scope | None, int],
        started: float,
    ) -> Any:
        run = self._start(call, scope, started, exc)
        fn, args, kwargs = call
        hooks = self.hooks or get_hook_registry()
        sleep = self.clock.sleep if self.clock is not None else asyncio.sleep
        record = None
        if _telemetry.MEASURE is not None:
            record = _telemetry.record_of(run.scope, run.command)
            if record is not None:
                record.attempt_failed(exc)
        while True:
            delay = self._delay(run, exc)
            if isinstance(delay, str):
                if observed(hooks, delay):
                    await announce(hooks, delay, self._context(delay, handler_type, run, exc, None))
                raise exc
            run.state.prepare_for_next_attempt()
            if observed(hooks, RETRY_SCHEDULED):
                context = self._context(RETRY_SCHEDULED, handler_type, run, exc, delay)
                await announce(hooks, RETRY_SCHEDULED, context)
            if delay > 0 or not is_testing():
                await sleep(delay)
                run.state.idle_for += delay
            if record is not None:
                record.attempt_started()
            try:
                if not attempt_needs_own_counts(run.scope, run.changes):
                    return await fn(*args, **kwargs)
                with attempt(run.scope, run.changes):
                    return await fn(*args, **kwargs)
            except Exception as new:
                if not self._should_retry(new):
                    if isinstance(new, BrokenCircuitError):
                        event = self._refused(run, new)
                        if observed(hooks, event):
                            context = self._context(event, handler_type, run, new, None)
                            await announce(hooks, event, context)
                    raise
                exc = new
                if record is not None:
                    record.attempt_failed(exc)

    def _retry_sync(
        self,
        handler_type: str,
        call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]],
        exc: Exception,
        scope: tuple[Scope | None, int],
        started: float,
    ) -> Any:
        run = self._start(call, scope, started, exc)
        fn, args, kwargs = call
        hooks = self.hooks or get_hook_registry()
        clock = self.clock or SYSTEM_CLOCK
        record = None
        if _telemetry.MEASURE is not None:
            record = _telemetry.record_of(run.scope, run.command)
            if record is not None:
                record.attempt_failed(exc)
        while True:
            delay = self._delay(run, exc)
            if isinstance(delay, str):
                if observed(hooks, delay):
                    announce_sync(hooks, delay, self._context(delay, handler_type, run, exc, None))
                raise exc
            run.state.prepare_for_next_attempt()
            if observed(hooks, RETRY_SCHEDULED):
                context = self._context(RETRY_SCHEDULED, handler_type, run, exc, delay)
                announce_sync(hooks, RETRY_SCHEDULED, context)
            if delay > 0:
                clock.sleep_sync(delay)
                run.state.idle_for += delay
            if record is not None:
                record.attempt_started()
            try:
                if not attempt_needs_own_counts(run.scope, run.changes):
                    return fn(*args, **kwargs)
                with attempt(run.scope, run.changes):
                    return fn(*args, **kwargs)
            except Exception as new:
                if not self._should_retry(new):
                    if isinstance(new, BrokenCircuitError):
                        event = self._refused(run, new)
                        if observed(hooks, event):
                            context = self._context(event, handler_type, run, new, None)
                            announce_sync(hooks, event, context)
                    raise
                exc = new
                if record is not None:
                    record.attempt_failed(exc)


@overload
def retry(policy: Callable[P, T], /) -> Callable[P, T]: ...
@overload
def retry(
    policy: RetryPolicy | None = None,
    *,
    stop: Stop | None = None,
    wait: Wait | None = None,
    on: RetryOn | None = None,
    budget: RetryBudget | None = None,
    hooks: HookRegistry | None = None,
    clock: Clock | None = None,
    max_retries_cap: int = MAX_RETRIES_CAP,
    max_delay_cap_s: float = MAX_DELAY_CAP_S,
) -> Retry: ...


def retry(
    policy: RetryPolicy | Callable[..., Any] | None = None,
    *,
    stop: Stop | None = None,
    wait: Wait | None = None,
    on: RetryOn | None = None,
    budget: RetryBudget | None = None,
    hooks: HookRegistry | None = None,
    clock: Clock | None = None,
    max_retries_cap: int = MAX_RETRIES_CAP,
    max_delay_cap_s: float = MAX_DELAY_CAP_S,
) -> Retry | Callable[..., Any]:
    """Retry transient failures of an async or sync function, with backoff between attempts.

    `policy` is the default; a `retry_policy` on the call's command wins, bounded by
    `max_retries_cap` retries and `max_delay_cap_s` seconds before any one retry (as is an
    error's `retry_after`). tenacity's own `stop` and `wait` strategies, when given, replace
    the policy's count and delays (whichever policy applies); being code, they are not capped,
    and they run on `clock`. `on` picks what is retried (types, a predicate or a tenacity
    `retry_if_...`); cancellation and interpreter exits never are. `budget` (a `RetryBudget`)
    bounds retries across calls. Inside a `timeout()`, no wait runs past its deadline.

    When retrying ends early, the last error is raised itself, with a note saying how many
    attempts and why. `@retry` without parentheses uses the defaults. A sync callable whose
    call returns an awaitable (a lambda around an async function) is retried the async way:
    the call returns a coroutine to await.
    """
    fn = None
    if policy is not None and not isinstance(policy, RetryPolicy) and callable(policy):
        fn, policy = policy, None
    behavior = Retry(
        policy,
        stop=stop,
        wait=wait,
        on=on,
        budget=budget,
        hooks=hooks,
        clock=clock,
        max_retries_cap=max_retries_cap,
        max_delay_cap_s=max_delay_cap_s,
    )
    return behavior if fn is None else behavior(fn)
