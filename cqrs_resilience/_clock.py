"""Time, as the retry behavior sees it: injectable per behavior, switchable off for tests.

Tests pass a `FakeClock` (`retry(clock=...)`, `Handler(clock=...)`) to see every backoff
without waiting, or call `set_testing()` to remove sleeping process-wide, as stamina does.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol


class Clock(Protocol):
    """Where backoff sleeps go."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch, for timestamps stores keep."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` in async code; cancellable at once."""
        ...

    def sleep_sync(self, seconds: float) -> None:
        """Wait `seconds` in sync code."""
        ...


class SystemClock:
    """The real clock: `time.monotonic`, `asyncio.sleep`, `time.sleep`."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def sleep_sync(self, seconds: float) -> None:
        time.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()


class FakeTimer:
    """What `FakeClock.call_at` returns: `cancel()` it and it never fires."""

    __slots__ = ("callback", "when")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback: Callable[[], object] | None = callback

    def cancel(self) -> None:
        self.callback = None

    def __repr__(self) -> str:
        return f"FakeTimer(when={self.when}, {'cancelled' if self.callback is None else 'armed'})"


class FakeClock:
    """A test clock whose time moves only when told, or by itself when everything sleeps.

    With `autojump=True` (the default) a sleep returns at once and moves time forward by its
    length, so a test sees the whole backoff schedule in `sleeps` without waiting. With
    `autojump=False` sleepers wait until `advance()` passes their deadline, which lets a test
    act mid-backoff (for example cancel the sleeping task).

    Timers (`call_at`, which `timeout()` uses) fire as time passes them, whichever way it
    moves; a sleep cut short by a timer that cancels the sleeping task ends at the timer.
    """

    def __init__(self, *, autojump: bool = True, start: float = 0.0) -> None:
        self.autojump = autojump
        self.now = start
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._timers: list[tuple[float, int, FakeTimer]] = []
        self._order = itertools.count()
        self._sleeper_added: asyncio.Event | None = None

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        """The fake time, as wall-clock seconds too (its epoch is `start`)."""
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.autojump:
            self._move_to(self.now + seconds, cut_short=True)
            await asyncio.sleep(0)  # still a suspension point, as a real sleep is
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), waiter))
        if self._sleeper_added is not None:
            self._sleeper_added.set()
        await waiter

    def sleep_sync(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._move_to(self.now + seconds)

    def call_at(self, when: float, callback: Callable[[], object]) -> FakeTimer:
        """Call `callback` when this clock's time next moves to or past `when`."""
        timer = FakeTimer(when, callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    def _move_to(self, target: float, *, cut_short: bool = False) -> None:
        """Move time to `target`, firing due timers in order, each at its own time.

        With `cut_short` (an async sleep) time stops at a timer that cancels the sleeping
        task: its sleep would have ended there.
        """
        timers = self._timers
        if timers and timers[0][0] <= target:
            task = _running_task() if cut_short else None
            cancelling = task.cancelling() if task is not None else 0
            while timers and timers[0][0] <= target:
                when, _, timer = heapq.heappop(timers)
                callback, timer.callback = timer.callback, None
                if callback is None:
                    continue
                self.now = max(self.now, when)
                callback()
                if task is not None and task.cancelling() > cancelling:
                    return
        self.now = max(self.now, target)

    @property
    def pending(self) -> int:
        """How many async sleepers are waiting for time to move."""
        return sum(1 for _, _, w in self._sleepers if not w.done())

    def advance(self, seconds: float) -> None:
        """Move time forward: fire the timers it passes and wake every sleeper whose deadline
        has come."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back: advance({seconds})")
        self._move_to(self.now + seconds)
        while self._sleepers and self._sleepers[0][0] <= self.now:
            _, _, waiter = heapq.heappop(self._sleepers)
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for_sleepers(self, count: int = 1) -> None:
        """Return once `count` tasks sleep on this clock (without advancing it)."""
        while self.pending < count:
            self._sleeper_added = asyncio.Event()
            await self._sleeper_added.wait()

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now}, sleeps={len(self.sleeps)}, pending={self.pending})"


def _running_task() -> asyncio.Task[object] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop: a sync sleep outside async code
        return None


_testing = False


class _TestingSwitch:
    """What `set_testing` returns: already applied; as a context manager, undone on exit."""

    def __init__(self, previous: bool) -> None:
        self._previous = previous

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _testing
        _testing = self._previous


def set_testing(testing: bool = True) -> _TestingSwitch:
    """Remove (or restore) every backoff sleep, process-wide; retries still happen.

    Use it plainly in a conftest, or as `with set_testing(): ...` to limit it to a block.
    """
    global _testing
    previous, _testing = _testing, testing
    return _TestingSwitch(previous)


def is_testing() -> bool:
    """Whether `set_testing()` removed sleeping."""
    return _testing
