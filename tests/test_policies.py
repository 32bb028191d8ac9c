"""Retry policies: budgets, schedules, validation from construction and from decoding."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cqrs_resilience import (
    ConfigurationError,
    ExponentialBackoffPolicy,
    FixedRetryPolicy,
    RetryPolicy,
)


def test_defaults_match_the_contract() -> None:
    """The documented defaults hold."""
    assert FixedRetryPolicy() == FixedRetryPolicy(max_retries=3, delay_ms=1000, jitter=True)
    assert ExponentialBackoffPolicy() == ExponentialBackoffPolicy(
        max_retries=5, initial_delay_ms=100, multiplier=2.0, max_delay_ms=5000, jitter=True
    )


def test_both_policies_are_retry_policies() -> None:
    """Both built-ins satisfy the RetryPolicy protocol, and so does a user class."""

    class Linear:
        max_retries = 2

        def backoff_ms(self, retry: int) -> float:
            return 10.0 * retry

    assert isinstance(FixedRetryPolicy(), RetryPolicy)
    assert isinstance(ExponentialBackoffPolicy(), RetryPolicy)
    assert isinstance(Linear(), RetryPolicy)


def test_exponential_schedule_without_jitter_is_exact() -> None:
    """The reference's delay pattern: 100, 200, 400, 800, 1600 ms, then the cap."""
    policy = ExponentialBackoffPolicy(max_retries=8, jitter=False)
    assert [policy.backoff_ms(k) for k in range(1, 9)] == [
        100,
        200,
        400,
        800,
        1600,
        3200,
        5000,
        5000,
    ]


def test_fixed_schedule_without_jitter_is_exact() -> None:
    """A fixed policy waits delay_ms before every retry."""
    policy = FixedRetryPolicy(delay_ms=250, jitter=False)
    assert [policy.backoff_ms(k) for k in (1, 2, 3)] == [250, 250, 250]


def test_huge_retry_numbers_stay_at_the_cap() -> None:
    """A very late retry does not overflow; it waits the cap."""
    policy = ExponentialBackoffPolicy(max_retries=10_000, jitter=False)
    assert policy.backoff_ms(5_000) == 5000


@given(
    initial=st.floats(0, 10_000),
    multiplier=st.floats(1, 10),
    extra=st.floats(0, 100_000),
    retry=st.integers(1, 2_000),
)
def test_jittered_exponential_delay_is_within_half_and_whole(
    initial: float, multiplier: float, extra: float, retry: int
) -> None:
    """With jitter the delay lies in [d/2, d] and never above the cap."""
    cap = initial + extra
    policy = ExponentialBackoffPolicy(
        initial_delay_ms=initial, multiplier=multiplier, max_delay_ms=cap, jitter=True
    )
    plain = ExponentialBackoffPolicy(
        initial_delay_ms=initial, multiplier=multiplier, max_delay_ms=cap, jitter=False
    )
    try:
        expected = min(initial * multiplier ** (retry - 1), cap)
    except OverflowError:
        expected = cap
    d = plain.backoff_ms(retry)
    assert d == expected
    assert d / 2 <= policy.backoff_ms(retry) <= d <= cap


@given(delay=st.floats(0, 1e7), retry=st.integers(1, 100))
def test_jittered_fixed_delay_is_within_half_and_whole(delay: float, retry: int) -> None:
    """A jittered fixed delay lies in [d/2, d]."""
    assert delay / 2 <= FixedRetryPolicy(delay_ms=delay).backoff_ms(retry) <= delay


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: FixedRetryPolicy(max_retries=-1), "max_retries"),
        (lambda: FixedRetryPolicy(delay_ms=-5), "delay_ms"),
        (lambda: FixedRetryPolicy(max_retries=1.5), "max_retries"),  # type: ignore[arg-type]
        (lambda: ExponentialBackoffPolicy(max_retries=-2), "max_retries"),
        (lambda: ExponentialBackoffPolicy(initial_delay_ms=-1), "initial_delay_ms"),
        (lambda: ExponentialBackoffPolicy(multiplier=0.5), "multiplier"),
        (lambda: ExponentialBackoffPolicy(multiplier=float("nan")), "multiplier"),
        (
            lambda: ExponentialBackoffPolicy(initial_delay_ms=500, max_delay_ms=100),
            "max_delay_ms",
        ),
    ],
)
def test_bad_configuration_names_the_field(factory: object, field: str) -> None:
    """Invalid values raise a ValueError naming the field."""
    with pytest.raises(ValueError, match=field) as info:
        factory()  # type: ignore[operator]
    assert isinstance(info.value, ConfigurationError)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b'{"type": "fixed", "max_retries": -1}', "max_retries"),
        (b'{"type": "exponential", "multiplier": 0.1}', "multiplier"),
        (b'{"type": "exponential", "initial_delay_ms": 10, "max_delay_ms": 1}', "max_delay_ms"),
        (b'{"type": "fixed", "delay_ms": "soon"}', "delay_ms"),
    ],
)
def test_bad_configuration_from_json_is_a_validation_error(payload: bytes, field: str) -> None:
    """Decoding validates: a bad field gives msgspec.ValidationError naming it."""
    with pytest.raises(msgspec.ValidationError, match=field):
        msgspec.json.decode(payload, type=FixedRetryPolicy | ExponentialBackoffPolicy)


def test_unknown_policy_type_is_rejected_when_decoding() -> None:
    """An unknown policy tag does not decode."""
    with pytest.raises(msgspec.ValidationError, match="type"):
        msgspec.json.decode(b'{"type": "random"}', type=FixedRetryPolicy | ExponentialBackoffPolicy)


@pytest.mark.parametrize("policy", [FixedRetryPolicy(max_retries=7), ExponentialBackoffPolicy()])
def test_policies_round_trip_through_json_and_msgpack(policy: object) -> None:
    """A policy encodes and decodes to an equal policy of the same type."""
    kind = FixedRetryPolicy | ExponentialBackoffPolicy
    assert msgspec.json.decode(msgspec.json.encode(policy), type=kind) == policy
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(policy), type=kind) == policy
