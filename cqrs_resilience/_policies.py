"""Retry policies: how many retries, and how long to wait before each."""

from __future__ import annotations

import math
import random
from typing import Protocol, runtime_checkable

import msgspec

from ._checks import MORE_CALLS, setting
from ._errors import ConfigurationError


@runtime_checkable
class RetryPolicy(Protocol):
    """What a retry policy is: a retry budget and the wait before each retry."""

    @property
    def max_retries(self) -> int:
        """Retries: at most N more calls after the first (3: at most 4 calls in all)."""
        ...

    def backoff_ms(self, retry: int) -> float:
        """Milliseconds to wait before retry number `retry` (1-based), jitter applied."""
        ...


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an int ({MORE_CALLS}), got {value!r}")
    if value < 0:
        raise ConfigurationError(f"{name} must be >= 0 ({MORE_CALLS}), got {value}")


def _check_ms(name: str, value: object) -> None:
    setting(
        name,
        value,
        "a finite number >= 0",
        lambda v: 0 <= v < math.inf,
        kind="a number of milliseconds",
    )


def _jittered(delay: float, jitter: bool) -> float:
    # Full jitter down to half the delay: spreads a thundering herd, never exceeds the cap.
    return random.uniform(delay / 2, delay) if jitter else delay


class FixedRetryPolicy(msgspec.Struct, kw_only=True, frozen=True, tag_field="type", tag="fixed"):
    """The same delay before every retry."""

    max_retries: int = 3
    """Retries: at most N more calls after the first (3: at most 4 calls in all)."""
    delay_ms: float = 1000
    """Milliseconds to wait before each retry (before jitter)."""
    jitter: bool = True
    """Wait a random time between half the delay and the delay, to spread retries out."""

    def __post_init__(self) -> None:
        _check_count("max_retries", self.max_retries)
        _check_ms("delay_ms", self.delay_ms)

    def backoff_ms(self, retry: int) -> float:
        return _jittered(self.delay_ms, self.jitter)


class ExponentialBackoffPolicy(
    msgspec.Struct, kw_only=True, frozen=True, tag_field="type", tag="exponential"
):
    """Delays growing by `multiplier` from `initial_delay_ms`, capped at `max_delay_ms`."""

    max_retries: int = 5
    """Retries: at most N more calls after the first (5: at most 6 calls in all)."""
    initial_delay_ms: float = 100
    multiplier: float = 2.0
    max_delay_ms: float = 5000
    jitter: bool = True

    def __post_init__(self) -> None:
        _check_count("max_retries", self.max_retries)
        _check_ms("initial_delay_ms", self.initial_delay_ms)
        _check_ms("max_delay_ms", self.max_delay_ms)
        setting(
            "multiplier",
            self.multiplier,
            "a finite number >= 1",
            lambda v: 1 <= v < math.inf,
            kind="a number",
        )
        if self.max_delay_ms < self.initial_delay_ms:
            raise ConfigurationError(
                f"max_delay_ms ({self.max_delay_ms}) must be >= initial_delay_ms "
                f"({self.initial_delay_ms})"
            )

    def backoff_ms(self, retry: int) -> float:
        try:
            delay = min(self.initial_delay_ms * self.multiplier ** (retry - 1), self.max_delay_ms)
        except OverflowError:
            delay = self.max_delay_ms
        return _jittered(delay, self.jitter)


AnyRetryPolicy = FixedRetryPolicy | ExponentialBackoffPolicy
"""The built-in policies: the type a command's `retry_policy` field encodes and decodes as."""
