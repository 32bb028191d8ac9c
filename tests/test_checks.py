"""Every numeric setting refuses absurd values at construction, with a ConfigurationError
that names it: never an OverflowError then, or later in arithmetic on the setting."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from cqrs_resilience import (
    ConfigurationError,
    ExponentialBackoffPolicy,
    FixedRetryPolicy,
    RetryBudget,
    circuit_breaker,
    inject_faults,
    retry,
    timeout,
)
from cqrs_resilience._retention import Retention

SETTINGS: dict[str, Callable[[Any], object]] = {
    "timeout(seconds=...)": lambda v: timeout(v),
    "ratio": lambda v: RetryBudget(ratio=v),
    "min_retries_per_s": lambda v: RetryBudget(min_retries_per_s=v),
    "ttl_s": lambda v: RetryBudget(ttl_s=v),
    "sampling_duration_s": lambda v: circuit_breaker(sampling_duration_s=v),
    "break_duration_s": lambda v: circuit_breaker(break_duration_s=v),
    "failure_ratio": lambda v: circuit_breaker(failure_ratio=v),
    "rate": lambda v: inject_faults(v),
    "latency_s": lambda v: inject_faults(0.1, latency_s=v),
    "delay_ms": lambda v: FixedRetryPolicy(delay_ms=v),
    "initial_delay_ms": lambda v: ExponentialBackoffPolicy(initial_delay_ms=v, max_delay_ms=v),
    "multiplier": lambda v: ExponentialBackoffPolicy(multiplier=v),
    "max_delay_cap_s": lambda v: retry(max_delay_cap_s=v),
    "keep_commands_s": lambda v: Retention(100, v),
}


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("value", [10**400, -(10**400), math.nan, math.inf, -1, True, "1"])
def test_absurd_numbers_are_refused_naming_the_setting(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"^{name.replace('(', '.').replace(')', '.')}"):
        SETTINGS[name](value)


def test_a_huge_integer_is_reported_by_its_size() -> None:
    """An integer too long to print (past Python's digit limit) is described, not printed."""
    with pytest.raises(ConfigurationError, match="an integer of 16610 bits"):
        timeout(10**5000)
