"""`circuit_breaker()`: stop calling a dependency that keeps failing, and probe it now and then.

Polly v8's semantics. Closed, the breaker counts outcomes in a sliding window of
`sampling_duration_s` made of ten buckets (Polly's rolling health metrics): counting is O(1)
per call and old outcomes leave a bucket at a time. When the window holds at least
`minimum_throughput` calls and at least `failure_ratio` of them failed, the circuit opens for
`break_duration_s`: calls are refused with `BrokenCircuitError` without running. The first call
after the break is the trial (half-open) and the others are still refused while it runs; its
success closes the circuit with an empty window, its failure opens it again.

What counts: a failure is what `on` picks (by default, what `retry()` retries). Any other
outcome, a value or an error `on` does not pick (a `ValueError`: the dependency answered),
counts as a success, as in Polly. Cancellation and other `BaseException`s count as neither, and
a trial that ends that way hands its turn to the next caller. So does a trial still running
after `break_duration_s`, so one hung call cannot hold the circuit half-open for ever.

State changes happen under a lock, so threads calling a sync function agree on one trial. A
closed circuit counts successes without it (only starting a new bucket takes it): a rare
lost increment under threads costs less than a lock on every call.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal, ParamSpec, TypeAlias, TypeVar, cast

from ._checks import setting
from ._clock import Clock
from ._errors import BrokenCircuitError
from ._hooks import (
    CIRCUIT_CLOSED,
    CIRCUIT_HALF_OPENED,
    CIRCUIT_OPENED,
    HookRegistry,
    announce,
    announce_sync,
    describe_handler,
    get_hook_registry,
    observed,
)
from ._pipeline import NOT_AWAITABLE, BehaviorBase, returns_awaitable
from ._retry_on import RetryOn, command_of, command_type, predicate

P = ParamSpec("P")
T = TypeVar("T")

CircuitState: TypeAlias = Literal["closed", "open", "half_open"]

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"

BUCKETS = 10
"""Buckets per sampling window, as in Polly: outcomes leave the window a tenth at a time."""

# A refusal is `BrokenCircuitError(retry_after)` built by `BaseException.__new__`, which keeps the
# argument in `args` as the error's __init__ would, without running that __init__: its checks
# would double the cost of refusing a call. `retry_after` is the breaker's own, a float > 0.
_new_error = BaseException.__new__

# (event, failure ratio, throughput): what a state change reports to hooks.
_Change: TypeAlias = tuple[str, float | None, int | None]


class CircuitBreaker(BehaviorBase):
    """The behavior `circuit_breaker()` returns: one circuit, whatever it is applied to."""

    called = "circuit_breaker()"

    __slots__ = (
        "_blocked_until",
        "_break_s",
        "_bucket_end",
        "_bucket_s",
        "_bucket_start",
        "_calls",
        "_failures",
        "_hooks",
        "_is_failure",
        "_last_failure",
        "_lock",
        "_now",
        "_old",
        "_old_calls",
        "_old_failures",
        "_state",
        "_trial",
        "_trials",
        "break_duration_s",
        "failure_ratio",
        "minimum_throughput",
        "on",
        "sampling_duration_s",
    )

    def __init__(
        self,
        *,
        failure_ratio: float = 0.1,
        minimum_throughput: int = 100,
        sampling_duration_s: float = 30.0,
        break_duration_s: float = 5.0,
        on: RetryOn | None = None,
        hooks: HookRegistry | None = None,
        clock: Clock | None = None,
    ) -> None:
        setting("failure_ratio", failure_ratio, "a number in (0, 1]", lambda v: 0 < v <= 1)
        setting(
            "minimum_throughput", minimum_throughput, "an int >= 2", lambda v: v >= 2, integer=True
        )
        # Polly's floor: a shorter window has buckets too short to mean anything.
        setting(
            "sampling_duration_s",
            sampling_duration_s,
            "a finite number of seconds >= 0.5",
            lambda v: 0.5 <= v < math.inf,
        )
        setting(
            "break_duration_s",
            break_duration_s,
            "a finite number of seconds > 0",
            lambda v: 0 < v < math.inf,
        )
        self.failure_ratio = float(failure_ratio)
        self.minimum_throughput = minimum_throughput
        self.sampling_duration_s = float(sampling_duration_s)
        self.break_duration_s = float(break_duration_s)
        self.on = on
        try:
            self._is_failure = predicate(on)  # retry()'s own reading of `on`, defaults included
        except TypeError as exc:
            raise TypeError(str(exc).replace("retry(", "circuit_breaker(", 1)) from None
        self._hooks = hooks
        self._now: Callable[[], float] = clock.monotonic if clock is not None else time.monotonic
        self._lock = threading.Lock()
        self._break_s = self.break_duration_s
        self._bucket_s = self.sampling_duration_s / BUCKETS
        self._old: deque[tuple[float, int, int]] = deque()
        self._state: str = CLOSED
        self._blocked_until = -math.inf
        self._trial = 0  # the id of the trial call in flight; 0 when none
        self._trials = 0
        self._last_failure: Exception | None = None
        self._clear_window()

    @property
    def state(self) -> CircuitState:
        """`"closed"`, `"open"` or `"half_open"`; an open circuit turns half-open at a call."""
        return cast(CircuitState, self._state)

    def reset(self) -> None:
        """Close the circuit now, with an empty window (after a manual fix, or between tests)."""
        with self._lock:
            was = self._state
            self._close()
        if was is not CLOSED:
            hooks = self._hooks or get_hook_registry()
            if observed(hooks, CIRCUIT_CLOSED):
                # handler.type None: no call closed it.
                context = self._context(CIRCUIT_CLOSED, None, None, None, ())
                announce_sync(hooks, CIRCUIT_CLOSED, context)

    def __repr__(self) -> str:
        on = f", on={self.on!r}" if self.on is not None else ""
        return (
            f"circuit_breaker(failure_ratio={self.failure_ratio}, "
            f"minimum_throughput={self.minimum_throughput}, "
            f"sampling_duration_s={self.sampling_duration_s}, "
            f"break_duration_s={self.break_duration_s}{on}) [{self._state}]"
        )

    def _wrap_async(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        handler_type = describe_handler(fn)
        is_failure = self._is_failure
        now = self._now
        async_fn = cast(Callable[P, Awaitable[Any]], fn)

        @functools.wraps(fn)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
            trial = 0
            if self._state is not CLOSED:
                t, until = now(), self._blocked_until
                # Refusing takes no lock: a stale read only refuses a call that a racing
                # thread was about to make the trial anyway.
                if t < until and (self._state is OPEN or self._trial):
                    raise _new_error(BrokenCircuitError, until - t) from self._last_failure
                trial, change = self._admit()
                if change is not None:
                    try:
                        await self._announce(change, handler_type, args)
                    except BaseException:  # cancelled in a hook: the trial never ran
                        self._release(trial)
                        raise
            try:
                result = await async_fn(*args, **kwargs)
            except Exception as exc:
                change = self._failed(exc, trial) if is_failure(exc) else self._succeeded(trial)
                if change is not None:
                    await self._announce(change, handler_type, args, exc)
                raise
            except BaseException:
                if trial:
                    self._release(trial)
                raise
            if trial:
                change = self._succeeded(trial)
                if change is not None:
                    await self._announce(change, handler_type, args)
            else:  # the hot path, inlined: count one success in the current bucket
                t = now()
                if t >= self._bucket_end:
                    self._next_bucket(t)
                self._calls += 1
            return result

        return guarded

    def _wrap_sync(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        handler_type = describe_handler(fn)
        is_failure = self._is_failure
        now = self._now
        twin: Callable[P, Any] | None = None  # the async wrapper, once fn returned an awaitable

        @functools.wraps(fn)
        def guarded_sync(*args: P.args, **kwargs: P.kwargs) -> Any:
            nonlocal twin
            if twin is not None:
                return twin(*args, **kwargs)
            trial = 0
            if self._state is not CLOSED:
                t, until = now(), self._blocked_until
                if t < until and (self._state is OPEN or self._trial):
                    raise _new_error(BrokenCircuitError, until - t) from self._last_failure
                trial, change = self._admit()
                if change is not None:
                    try:
                        self._announce_sync(change, handler_type, args)
                    except BaseException:
                        self._release(trial)
                        raise
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                change = self._failed(exc, trial) if is_failure(exc) else self._succeeded(trial)
                if change is not None:
                    self._announce_sync(change, handler_type, args, exc)
                raise
            except BaseException:
                if trial:
                    self._release(trial)
                raise
            if type(result) not in NOT_AWAITABLE and returns_awaitable(result):
                # fn is async in disguise (a lambda around an async function): its outcome
                # comes when the awaitable is done, and later calls go the async way.
                twin = self._wrap_async(fn)
                return self._outcome_of(result, trial, handler_type, args)
            if trial:
                change = self._succeeded(trial)
                if change is not None:
                    self._announce_sync(change, handler_type, args)
            else:
                t = now()
                if t >= self._bucket_end:
                    self._next_bucket(t)
                self._calls += 1
            return result

        return guarded_sync

    async def _outcome_of(
        self, awaitable: Awaitable[Any], trial: int, handler_type: str, args: tuple[Any, ...]
    ) -> Any:
        """Count the outcome of a sync function's call that returned `awaitable`, as the
        async wrapper counts its call's (the call was admitted, as the trial if `trial`)."""
        try:
            result = await awaitable
        except Exception as exc:
            change = self._failed(exc, trial) if self._is_failure(exc) else self._succeeded(trial)
            if change is not None:
                await self._announce(change, handler_type, args, exc)
            raise
        except BaseException:
            if trial:
                self._release(trial)
            raise
        change = self._succeeded(trial)
        if change is not None:
            await self._announce(change, handler_type, args)
        return result

    # The window: the current bucket in `_calls`/`_failures`, older ones in `_old`.

    def _clear_window(self) -> None:
        self._old.clear()
        self._old_calls = self._old_failures = 0
        self._calls = self._failures = 0
        self._bucket_start = self._bucket_end = -math.inf

    def _next_bucket(self, now: float) -> None:
        """`_roll` for the unlocked success path: once per bucket, so the lock costs little."""
        with self._lock:
            if now >= self._bucket_end:
                self._roll(now)

    def _roll(self, now: float) -> None:
        """Start a new bucket at `now` and drop the buckets that left the window."""
        if self._calls:
            self._old.append((self._bucket_start, self._calls, self._failures))
            self._old_calls += self._calls
            self._old_failures += self._failures
        self._calls = self._failures = 0
        self._bucket_start = now
        self._bucket_end = now + self._bucket_s
        self._evict(now)

    def _evict(self, now: float) -> None:
        old = self._old
        while old and now - old[0][0] >= self.sampling_duration_s:
            _, calls, failures = old.popleft()
            self._old_calls -= calls
            self._old_failures -= failures

    # State changes. Each returns what to announce, or None.

    def _admit(self) -> tuple[int, _Change | None]:
        """Let a call through a circuit that is not closed, as the trial, or refuse it."""
        now = self._now()
        with self._lock:
            state = self._state
            if state is CLOSED:
                return 0, None
            if now < self._blocked_until and (state is OPEN or self._trial):
                raise _new_error(
                    BrokenCircuitError, self._blocked_until - now
                ) from self._last_failure
            # The break is over, or the trial gave its turn back (or outlived it): this is it.
            self._state = HALF_OPEN
            self._trials += 1
            self._trial = self._trials
            self._blocked_until = now + self._break_s
            return self._trial, ((CIRCUIT_HALF_OPENED, None, None) if state is OPEN else None)

    def _failed(self, exc: Exception, trial: int) -> _Change | None:
        with self._lock:
            now = self._now()
            if trial:
                if trial != self._trial or self._state is not HALF_OPEN:
                    return None  # a trial whose turn passed to another
                self._open(now, exc)
                return CIRCUIT_OPENED, None, None
            if self._state is not CLOSED:
                return None  # a call made before the circuit opened; the break stands
            if now >= self._bucket_end:
                self._roll(now)
            else:
                self._evict(now)
            self._calls += 1
            self._failures += 1
            calls = self._calls + self._old_calls
            failures = self._failures + self._old_failures
            if calls >= self.minimum_throughput and failures / calls >= self.failure_ratio:
                self._open(now, exc)
                return CIRCUIT_OPENED, failures / calls, calls
            return None

    def _succeeded(self, trial: int) -> _Change | None:
        if not trial:
            now = self._now()
            if now >= self._bucket_end:
                self._next_bucket(now)
            self._calls += 1
            return None
        with self._lock:
            if trial != self._trial or self._state is not HALF_OPEN:
                return None
            self._close()
            return CIRCUIT_CLOSED, None, None

    def _release(self, trial: int) -> None:
        """A trial ended without an outcome (cancelled): the next caller makes the trial."""
        with self._lock:
            if trial == self._trial:
                self._trial = 0

    def _open(self, now: float, exc: Exception) -> None:
        self._state = OPEN
        self._trial = 0
        self._blocked_until = now + self._break_s
        self._last_failure = exc

    def _close(self) -> None:
        self._state = CLOSED
        self._trial = 0
        self._blocked_until = -math.inf
        self._last_failure = None
        self._clear_window()

    # Announcing (to the log, the telemetry and the hooks), only when someone listens.

    def _context(
        self,
        event: str,
        handler_type: str | None,
        change: _Change | None,
        exc: Exception | None,
        args: tuple[Any, ...],
    ) -> dict[str, Any]:
        command = command_of(args)
        return {
            "event": event,
            "handler.type": handler_type,
            "command.type": command_type(command),
            "error": exc,
            "break_duration_s": self.break_duration_s,
            # The window that opened the circuit; None when a failed trial reopened it.
            "failure_ratio": change[1] if change is not None else None,
            "throughput": change[2] if change is not None else None,
        }

    def _prepare(
        self, change: _Change, handler_type: str, args: tuple[Any, ...], exc: Exception | None
    ) -> tuple[HookRegistry, dict[str, Any]] | None:
        event = change[0]
        hooks = self._hooks or get_hook_registry()
        if not observed(hooks, event):
            return None
        error = exc if event == CIRCUIT_OPENED else None
        return hooks, self._context(event, handler_type, change, error, args)

    async def _announce(
        self,
        change: _Change,
        handler_type: str,
        args: tuple[Any, ...],
        exc: Exception | None = None,
    ) -> None:
        found = self._prepare(change, handler_type, args, exc)
        if found is not None:
            await announce(found[0], change[0], found[1])

    def _announce_sync(
        self,
        change: _Change,
        handler_type: str,
        args: tuple[Any, ...],
        exc: Exception | None = None,
    ) -> None:
        found = self._prepare(change, handler_type, args, exc)
        if found is not None:
            announce_sync(found[0], change[0], found[1])


def circuit_breaker(
    *,
    failure_ratio: float = 0.1,
    minimum_throughput: int = 100,
    sampling_duration_s: float = 30.0,
    break_duration_s: float = 5.0,
    on: RetryOn | None = None,
    hooks: HookRegistry | None = None,
    clock: Clock | None = None,
) -> CircuitBreaker:
    """Refuse calls at once while the functions it wraps keep failing; probe after a break.

    Opens when, within the last `sampling_duration_s`, at least `minimum_throughput` calls saw
    a failure ratio of at least `failure_ratio`; refuses with `BrokenCircuitError` for
    `break_duration_s`, then lets one trial call through. `on` picks what counts as a failure
    (types or a predicate; by default what `retry()` retries). Apply one breaker to several
    functions to make them share one circuit. A sync callable whose call returns an awaitable
    (a lambda around an async function) has the outcome counted when that is awaited.

    The defaults are Polly v8's (10% of at least 100 calls in 30 s; a 5 s break). A small
    `minimum_throughput` lets a burst open the circuit on its first outcomes: failures that
    come back at once are counted before the slower successes of the same burst.
    """
    return CircuitBreaker(
        failure_ratio=failure_ratio,
        minimum_throughput=minimum_throughput,
        sampling_duration_s=sampling_duration_s,
        break_duration_s=break_duration_s,
        on=on,
        hooks=hooks,
        clock=clock,
    )
