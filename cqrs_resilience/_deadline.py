"""The deadline a `timeout()` sets, seen by everything called inside it.

One context variable holds it, so a `retry()` any number of calls deeper sees the deadline
of every `timeout()` around it without being handed anything. A deadline is kept with the
clock it was taken on, so time left is measured on the clock that will enforce it.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import TypeAlias

from ._clock import Clock

Deadline: TypeAlias = tuple[float, Clock]
"""When (on the clock's `monotonic()` scale) and the clock it is on."""

DEADLINE: ContextVar[Deadline | None] = ContextVar("cqrs_resilience.deadline", default=None)


def tighten(when: float, clock: Clock) -> Token[Deadline | None]:
    """Set the deadline to `when` unless one around it ends earlier; `DEADLINE.reset` it."""
    outer = DEADLINE.get()
    if outer is not None:
        outer_when, outer_clock = outer
        if outer_clock is clock:
            if outer_when <= when:
                return DEADLINE.set(outer)
        elif outer_when - outer_clock.monotonic() <= when - clock.monotonic():
            return DEADLINE.set(outer)
    return DEADLINE.set((when, clock))


def time_left() -> float | None:
    """Seconds until the innermost deadline (negative once passed), or None without one."""
    deadline = DEADLINE.get()
    if deadline is None:
        return None
    when, clock = deadline
    return when - clock.monotonic()
