"""`RetryBudget`: retries as a share of recent traffic, so an outage cannot multiply the load.

Finagle's design: every first attempt deposits, every retry withdraws, and a retry is made
only when the balance covers it. Deposits and withdrawals expire after `ttl_s`, so retries
over the last `ttl_s` are at most `ratio` of the first attempts seen in it, plus a reserve of
`min_retries_per_s * ttl_s` for callers too quiet to earn retries. A policy's `max_retries`
bounds one call; the budget bounds them all together, however many retry at once.

Amounts are integers, so no rounding can let one retry too many through: `ratio` as a
fraction p/q makes a deposit worth p and a retry cost q. The window is a ring of ten slices
(as Finagle's `WindowedAdder`); a deposit reads the clock, compares it with the end of the
current slice, and adds to one attribute. There is no lock: in one event loop nothing runs
between those steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from fractions import Fraction

from ._checks import setting
from ._clock import Clock, SystemClock

SLICES = 10
"""The window is this many slices: an entry expires between 0.9 and 1.0 `ttl_s` after it
was made."""


def _number(name: str, value: object, low: float, high: float) -> float:
    bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
    return setting(
        name,
        value,
        f"a finite number {bounds}",
        lambda v: low <= v <= high and math.isfinite(v),
        kind="a number",
    )


class RetryBudget:
    """At most `ratio` retries per first attempt over the last `ttl_s` seconds, plus
    `min_retries_per_s` always allowed; pass it as `retry(budget=...)`.

    One budget shared by several behaviors is one budget: share it between everything that
    calls the same dependency.
    """

    __slots__ = (
        "_cost",
        "_current",
        "_deposit",
        "_index",
        "_now",
        "_pos",
        "_reserve",
        "_ring",
        "_slice_end",
        "_sum",
        "_width",
        "clock",
        "min_retries_per_s",
        "ratio",
        "ttl_s",
    )

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_retries_per_s: float = 10.0,
        ttl_s: float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        self.ratio = _number("ratio", ratio, 0, 1000)
        self.min_retries_per_s = _number("min_retries_per_s", min_retries_per_s, 0, math.inf)
        self.ttl_s = _number("ttl_s", ttl_s, 1, 60)
        self.clock = clock
        share = Fraction(self.ratio).limit_denominator(1_000_000)
        # A deposit is worth p, a retry costs q: p/q retries per first attempt, exactly.
        self._deposit = share.numerator
        self._cost = share.denominator if share else 1
        self._reserve = math.floor(round(self.min_retries_per_s * self.ttl_s, 9)) * self._cost
        self._now: Callable[[], float] = (
            time.monotonic if clock is None or type(clock) is SystemClock else clock.monotonic
        )
        self._width = self.ttl_s / SLICES
        self._ring = [0] * SLICES  # the other slices' sums; the current one is `_current`
        self._pos = 0
        self._sum = 0  # of `_ring`
        self._current = 0
        self._index = math.floor(self._now() / self._width)
        self._slice_end = (self._index + 1) * self._width

    def deposit(self) -> None:
        """Credit one first attempt (`retry()` does it at the start of every call)."""
        if self._now() >= self._slice_end:
            self._roll()
        self._current += self._deposit

    def try_withdraw(self) -> bool:
        """Take one retry from the budget if it covers one; False (and no change) if not."""
        if self._now() >= self._slice_end:
            self._roll()
        if self._reserve + self._sum + self._current < self._cost:
            return False
        self._current -= self._cost
        return True

    @property
    def balance(self) -> int:
        """How many retries the budget would allow now."""
        if self._now() >= self._slice_end:
            self._roll()
        return max(self._reserve + self._sum + self._current, 0) // self._cost

    def _roll(self) -> None:
        """Time left the current slice: close it and expire the slices that fell out."""
        index = max(math.floor(self._now() / self._width), self._index + 1)
        steps = index - self._index
        ring = self._ring
        if steps >= SLICES:
            ring[:] = [0] * SLICES
            self._sum = 0
        else:
            pos = self._pos
            ring[pos] = self._current
            self._sum += self._current
            for _ in range(steps):
                pos = (pos + 1) % SLICES
                self._sum -= ring[pos]
                ring[pos] = 0
            self._pos = pos
        self._current = 0
        self._index = index
        self._slice_end = (index + 1) * self._width

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio:g}, min_retries_per_s={self.min_retries_per_s:g}, "
            f"ttl_s={self.ttl_s:g}, balance={self.balance})"
        )
