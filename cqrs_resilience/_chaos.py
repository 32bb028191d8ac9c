"""`inject_faults()`: a chaos behavior, to see in tests and drills what the others do.

It fails calls at random (before they run, so nothing happens) and slows every call down. The
faults come from one seeded `random.Random` per behavior, so a seeded run fails the same
calls in the same order each time. `FaultyRepository` injects at the store instead, where a
fault can also strike after a write committed.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeAlias, TypeVar, cast

from ._checks import setting
from ._clock import SYSTEM_CLOCK, Clock
from ._errors import TransientError
from ._pipeline import NOT_AWAITABLE, BehaviorBase, returns_awaitable

P = ParamSpec("P")
T = TypeVar("T")

FaultError: TypeAlias = type[BaseException] | Callable[[], BaseException]
"""An exception type (called with no arguments) or a factory making a fresh exception."""


class FaultInjector(BehaviorBase):
    """The behavior `inject_faults()` returns; `injected` counts the faults it raised."""

    called = "inject_faults()"

    def __init__(
        self,
        rate: float,
        *,
        error: FaultError = TransientError,
        latency_s: float = 0.0,
        seed: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        number = "a number"
        rate = setting("rate", rate, "between 0 and 1", lambda v: 0 <= v <= 1, kind=number)
        latency_s = setting(
            "latency_s", latency_s, "a finite number >= 0", lambda v: 0 <= v < math.inf, kind=number
        )
        if not callable(error):
            raise TypeError(f"error must be an exception type or a factory, got {error!r}")
        self.rate = float(rate)
        self.error = error
        self.latency_s = float(latency_s)
        self.seed = seed
        self.clock = clock
        self.random = random.Random(seed)
        self.injected = 0

    def __repr__(self) -> str:
        parts = [repr(self.rate)]
        if self.error is not TransientError:
            parts.append(f"error={getattr(self.error, '__qualname__', self.error)}")
        if self.latency_s:
            parts.append(f"latency_s={self.latency_s}")
        if self.seed is not None:
            parts.append(f"seed={self.seed!r}")
        return f"inject_faults({', '.join(parts)})"

    def _fault(self) -> BaseException | None:
        """The exception to raise instead of this call, or None to let it run."""
        if not self.rate or self.random.random() >= self.rate:
            return None
        self.injected += 1
        exc = self.error()
        if not isinstance(exc, BaseException):
            raise TypeError(f"inject_faults(error=...) must make an exception, got {exc!r}")
        exc.add_note(f"injected by {self!r}")
        return exc

    def _wrap(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        if not self.rate and not self.latency_s:
            return fn  # nothing to inject: the function itself, at no cost
        return super()._wrap(fn)

    def _wrap_async(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        latency_s = self.latency_s
        async_fn = cast(Callable[P, Awaitable[Any]], fn)
        sleep = self.clock.sleep if self.clock is not None else asyncio.sleep

        @functools.wraps(fn)
        async def chaotic(*args: P.args, **kwargs: P.kwargs) -> Any:
            if latency_s:
                await sleep(latency_s)
            fault = self._fault()
            if fault is not None:
                raise fault
            return await async_fn(*args, **kwargs)

        return chaotic

    def _wrap_sync(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        latency_s = self.latency_s
        # A sync function blocks its caller anyway; its latency blocks too (time.sleep).
        sleep_sync = (self.clock or SYSTEM_CLOCK).sleep_sync
        twin: Callable[P, Any] | None = None  # the async wrapper, once fn returned an awaitable

        @functools.wraps(fn)
        def chaotic_sync(*args: P.args, **kwargs: P.kwargs) -> Any:
            nonlocal twin
            if twin is not None:
                return twin(*args, **kwargs)
            if latency_s:
                sleep_sync(latency_s)
            fault = self._fault()
            if fault is not None:
                raise fault
            result = fn(*args, **kwargs)
            if type(result) not in NOT_AWAITABLE and returns_awaitable(result):
                # fn is async in disguise (a lambda around an async function): the caller
                # awaits this result; later calls wait on the event loop instead of blocking it.
                twin = self._wrap_async(fn)
            return result

        return chaotic_sync


def inject_faults(
    rate: float,
    *,
    error: FaultError = TransientError,
    latency_s: float = 0.0,
    seed: int | None = None,
    clock: Clock | None = None,
) -> FaultInjector:
    """Make a fraction `rate` of calls raise `error` instead of running; delay every call.

    `error` is an exception type or a zero-argument factory; each fault is a fresh exception
    with a note saying it was injected. `latency_s` goes through `clock` (a `FakeClock` in
    tests); on a sync function it blocks, as the function does. The same `seed` fails the same
    calls. `rate=0` without latency returns the function unchanged. A sync callable found to
    return awaitables (a lambda around an async function) is slowed and failed the async way
    from then on.
    """
    return FaultInjector(rate, error=error, latency_s=latency_s, seed=seed, clock=clock)
