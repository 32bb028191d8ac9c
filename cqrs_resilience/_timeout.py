"""`timeout()`: cancel a call that runs too long, and give everything inside it a deadline.

The call is cancelled at its deadline and `CommandTimeoutError` raised in its place: a
`TimeoutError`, so an outer `retry()` retries it by default and `except TimeoutError` catches
it. A cancellation from outside is never mistaken for the timeout: it propagates as
`CancelledError` (the task's cancel count tells them apart, as `asyncio.timeout` does).

A loop timer per call would cost more than the rest of the call, so each behavior keeps its
live calls in a queue per event loop, oldest first, under one timer. Every call of one
behavior waits the same `seconds`, so deadlines arrive in the order calls start: appending
keeps the queue sorted, and the timer only ever needs the oldest live deadline. A call that
ends marks its entry; the timer, when it fires, cancels what is due and re-arms for the rest.

The timer runs on the behavior's clock: the loop's for the system clock, `FakeClock`'s own
timers in tests (so fake time passing the deadline fires it), and a sleeping task on any
other clock.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, cast

from ._checks import setting
from ._clock import SYSTEM_CLOCK, Clock, SystemClock
from ._deadline import DEADLINE, tighten
from ._errors import CommandTimeoutError
from ._hooks import describe_handler
from ._pipeline import async_only

P = ParamSpec("P")
T = TypeVar("T")

# A queue entry is a two-item list, not an object, because one is made per call:
# [the task, or None once it ended or was cancelled by the timer; its deadline].
_TASK, _WHEN = 0, 1
_COMPACT_AT = 64
"""Ended calls stuck behind a slow one are swept out once there are this many and they are
more than half the queue (as asyncio does with cancelled timers)."""


class _Expiries:
    """The live calls of one `timeout()` on one event loop, by deadline, under one timer."""

    __slots__ = ("armed", "clock", "dead", "entries", "loop", "now", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Clock | None) -> None:
        self.loop = loop
        self.clock = clock
        self.now: Callable[[], float] = time.monotonic if clock is None else clock.monotonic
        self.entries: deque[list[Any]] = deque()
        self.armed = False
        self.dead = 0  # ended entries still in `entries`, behind a live one
        self.timer: object = None

    def arm(self, when: float) -> None:
        """Have `expire` called at `when`, on the clock the deadlines are on."""
        self.armed = True
        clock = self.clock
        if clock is None:
            self.timer = self.loop.call_later(when - time.monotonic(), self.expire)
            return
        call_at = getattr(clock, "call_at", None)
        if call_at is not None:
            self.timer = call_at(when, self.expire)
        else:
            self.timer = self.loop.create_task(self._sleep_then_expire(when - clock.monotonic()))

    async def _sleep_then_expire(self, seconds: float) -> None:
        assert self.clock is not None
        await self.clock.sleep(max(seconds, 0.0))
        self.expire()

    def expire(self) -> None:
        """Cancel every call whose deadline has come; re-arm for the oldest one left."""
        self.armed = False
        entries, now = self.entries, self.now()
        while entries:
            entry = entries[0]
            task = entry[_TASK]
            if task is None:
                entries.popleft()
                self.dead -= 1
            elif entry[_WHEN] > now:
                self.arm(entry[_WHEN])
                return
            else:
                entries.popleft()
                entry[_TASK] = None  # tells the call it was us
                task.cancel()

    def finish(self, entry: list[Any]) -> None:
        """A call ended before its deadline (the happy path inlines this)."""
        entry[_TASK] = None
        entries = self.entries
        if entries[0] is entry:
            entries.popleft()
            self.sweep()
        else:
            self.bury()

    def bury(self) -> None:
        """An entry ended behind a live one: count it, and sweep when the dead pile up."""
        self.dead += 1
        entries = self.entries
        if self.dead >= _COMPACT_AT and self.dead * 2 > len(entries):
            live = [entry for entry in entries if entry[_TASK] is not None]
            entries.clear()
            entries.extend(live)
            self.dead = 0

    def sweep(self) -> None:
        """Drop ended entries from the front."""
        entries = self.entries
        while entries and entries[0][_TASK] is None:
            entries.popleft()
            self.dead -= 1


def _check_seconds(seconds: object) -> float:
    return setting(
        "timeout(seconds=...)",
        seconds,
        "a finite number of seconds > 0",
        lambda v: 0 < v < math.inf,
        kind="a number",
    )


class Timeout:
    """The behavior `timeout()` returns; apply it to an async function."""

    def __init__(self, seconds: float, *, clock: Clock | None = None) -> None:
        self.seconds = _check_seconds(seconds)
        self.clock = clock
        # The system clock goes through the loop's own timers; None says so.
        self._timer_clock = None if clock is None or type(clock) is SystemClock else clock
        self._queue: _Expiries | None = None

    def __repr__(self) -> str:
        clock = f", clock={self.clock!r}" if self.clock is not None else ""
        return f"timeout({self.seconds:g}{clock})"

    def _queue_on(self, loop: asyncio.AbstractEventLoop) -> _Expiries:
        """A fresh queue for another loop. The one it replaces lives on while its calls and
        its timer hold it, so switching loops (a new loop per test, a loop per thread) costs a
        timer, never a missed deadline."""
        self._queue = _Expiries(loop, self._timer_clock)
        return self._queue

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        if not callable(fn):
            raise TypeError(f"timeout() wraps an async function, got {fn!r}")
        # A sync call cannot be cancelled: refused now, or, from a lambda, before it is awaited.
        call = cast(Callable[P, Awaitable[T]], async_only(fn, "timeout()"))
        seconds = self.seconds
        deadline_clock = self.clock or SYSTEM_CLOCK
        now = time.monotonic if self._timer_clock is None else self._timer_clock.monotonic
        handler_type = describe_handler(fn)
        get_loop, get_task = asyncio.get_running_loop, asyncio.current_task

        @functools.wraps(fn)
        async def timed(*args: P.args, **kwargs: P.kwargs) -> T:
            loop = get_loop()
            queue = self._queue
            if queue is None or queue.loop is not loop:
                queue = self._queue_on(loop)
            task = get_task(loop)
            if task is None:
                raise RuntimeError("timeout() needs to run inside an asyncio task")
            when = now() + seconds
            entry = [task, when]
            entries = queue.entries
            entries.append(entry)
            if not queue.armed:
                queue.arm(when)
            cancelling = task.cancelling()
            if DEADLINE.get() is None:
                token = DEADLINE.set((when, deadline_clock))
            else:
                token = tighten(when, deadline_clock)
            try:
                result = await call(*args, **kwargs)
            except BaseException as exc:
                DEADLINE.reset(token)
                if entry[_TASK] is not None:
                    queue.finish(entry)
                    raise
                # Our timer cancelled the task; more cancels than ours mean one came from outside.
                if task.uncancel() <= cancelling and isinstance(exc, asyncio.CancelledError):
                    raise CommandTimeoutError(
                        f"{handler_type} timed out after {seconds:g} s"
                    ) from exc
                raise
            DEADLINE.reset(token)
            if entry[_TASK] is None:  # timed out, but the call swallowed the cancellation
                task.uncancel()
            else:
                entry[_TASK] = None
                if entries[0] is entry:
                    entries.popleft()
                    if entries and entries[0][_TASK] is None:
                        queue.sweep()
                else:
                    queue.bury()
            return result

        return timed


def timeout(seconds: float, *, clock: Clock | None = None) -> Timeout:
    """Cancel an async call after `seconds` and raise `CommandTimeoutError` from it (a
    `TimeoutError`: `except TimeoutError` and `retry()`'s defaults handle it).

    Everything called inside sees the deadline: a `retry()` there never sleeps past it, and
    a nested `timeout()` keeps whichever deadline is earlier. An outer cancellation still
    propagates as `CancelledError`. `clock` (a `FakeClock` in tests) decides when it fires.
    A sync function cannot be cancelled: it is a `TypeError` when decorating. A lambda (or a
    `functools.wraps` decorator) leading to an async function is taken, and what each call
    returns is checked before it is awaited.
    """
    return Timeout(seconds, clock=clock)
