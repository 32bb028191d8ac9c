"""Errors: the attributes users read off them."""

from __future__ import annotations

import math
import pickle
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cqrs_resilience import (
    BrokenCircuitError,
    ConcurrencyError,
    ConfigurationError,
    Conflict,
    MergeConflictError,
    TransientError,
)


def test_concurrency_error_carries_versions() -> None:
    """aggregate_id, expected_version and actual_version are attributes, with a default message."""
    error = ConcurrencyError(aggregate_id="o1", expected_version=3, actual_version=5)
    assert (error.aggregate_id, error.expected_version, error.actual_version) == ("o1", 3, 5)
    assert "o1" in str(error) and "5" in str(error)
    assert str(ConcurrencyError("custom")) == "custom"
    assert ConcurrencyError().aggregate_id is None


def test_a_conflict_at_the_version_read_says_another_writer_is_resolving() -> None:
    """Equal versions are how a store says another writer is resolving a conflict on the
    aggregate: the message says that, not "at version 6, expected 6"."""
    error = ConcurrencyError(aggregate_id="o1", expected_version=6, actual_version=6)
    assert str(error) == (
        "aggregate 'o1': another writer is resolving a conflict on it, so this write "
        "(read at version 6) was not made"
    )
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_transient_error_carries_retry_after() -> None:
    """retry_after is kept in seconds, None by default."""
    assert TransientError("x", retry_after=1.5).retry_after == 1.5
    assert TransientError("x").retry_after is None


def test_merge_conflict_error_lists_every_path() -> None:
    """A MergeConflictError keeps all conflicts and names their paths."""
    conflicts = [
        Conflict(("status",), "a", "b", "c"),
        Conflict(path=("items", 0, "qty"), base=1, current=2, incoming=3),
    ]
    error = MergeConflictError(conflicts)
    assert error.conflicts == conflicts
    assert "status" in str(error) and "items/0/qty" in str(error)
    assert conflicts[1].incoming == 3


def test_configuration_error_is_a_value_error() -> None:
    """Bad configuration can be caught as ValueError."""
    assert issubclass(ConfigurationError, ValueError)


OPEN_3 = "the circuit is open; a trial call is allowed in 3.000 s"


@pytest.mark.parametrize(
    ("args", "kwargs", "retry_after", "text"),
    [
        ((3,), {}, 3.0, OPEN_3),
        ((), {"retry_after": 3}, 3.0, OPEN_3),
        ((3, "down for maintenance"), {}, 3.0, "down for maintenance"),
        ((), {"retry_after": 3, "message": "down"}, 3.0, "down"),
        (("down for maintenance",), {}, 0.0, "down for maintenance"),
        ((), {"message": "down"}, 0.0, "down"),
        ((), {}, 0.0, "the circuit is open"),
        ((0,), {}, 0.0, "the circuit is open; a trial call is allowed in 0.000 s"),
    ],
    ids=["3", "retry_after=3", "3, msg", "keywords", "msg", "message=", "bare", "0"],
)
def test_broken_circuit_error_builds_every_documented_way(
    args: tuple[Any, ...], kwargs: dict[str, Any], retry_after: float, text: str
) -> None:
    """Each documented way to build a BrokenCircuitError gives a float retry_after and prints,
    and pickles back to an equal error."""
    error = BrokenCircuitError(*args, **kwargs)
    assert type(error.retry_after) is float and error.retry_after == retry_after
    assert str(error) == text
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), again.args, str(again)) == (BrokenCircuitError, error.args, text)
    assert again.retry_after == retry_after and again.message == error.message


@pytest.mark.parametrize(
    "retry_after",
    [-1, -0.5, math.nan, math.inf, 10**400, True],
    ids=["-1", "-0.5", "nan", "inf", "10**400", "True"],
)
def test_broken_circuit_error_refuses_a_retry_after_out_of_range(retry_after: Any) -> None:
    """retry_after is seconds, a finite number >= 0: anything else is a ConfigurationError
    naming it, as TransientError's check is."""
    with pytest.raises(ConfigurationError, match="retry_after must be"):
        BrokenCircuitError(retry_after)


def test_broken_circuit_error_takes_one_message() -> None:
    """A message first and another second is a TypeError saying what it takes."""
    with pytest.raises(TypeError, match=r"takes \(retry_after, message\)"):
        BrokenCircuitError("down", "again")  # type: ignore[call-overload]


@given(
    st.floats(min_value=0, max_value=1e12, allow_nan=False),
    st.none() | st.text(),
)
def test_broken_circuit_error_round_trips(retry_after: float, message: str | None) -> None:
    """Any retry_after >= 0 and message survive pickling, and the message prints as given."""
    error = pickle.loads(pickle.dumps(BrokenCircuitError(retry_after, message)))
    assert error.retry_after == retry_after and error.message == message
    assert message is None or str(error) == message


def _library_errors() -> list[type[BaseException]]:
    import cqrs_resilience
    import cqrs_resilience.stores

    found = {
        value
        for module in (cqrs_resilience, cqrs_resilience.stores)
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, BaseException)
    }
    return sorted(found, key=lambda kind: kind.__name__)


@pytest.mark.parametrize("kind", _library_errors(), ids=lambda kind: kind.__name__)
def test_every_public_error_is_a_cqrs_resilience_error(kind: type[BaseException]) -> None:
    """One `except CqrsResilienceError` catches every error the library exports."""
    from cqrs_resilience import CqrsResilienceError

    assert issubclass(kind, CqrsResilienceError)


def test_errors_keep_the_builtin_bases_users_catch() -> None:
    """The base adds to the builtin bases, never replaces them."""
    from cqrs_resilience import (
        CommandTimeoutError,
        CqrsResilienceError,
        IdempotencyKeyReuseError,
        InvalidIdempotencyKeyError,
        StoreError,
    )

    assert issubclass(CommandTimeoutError, TimeoutError)
    assert issubclass(InvalidIdempotencyKeyError, ValueError)
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(IdempotencyKeyReuseError, ValueError)
    assert issubclass(IdempotencyKeyReuseError, StoreError)
    assert not issubclass(CqrsResilienceError, ValueError)


def test_command_in_progress_error_names_the_command_and_when_to_ask_again() -> None:
    """`command_id` and `retry_after` are attributes, said in the message, kept by pickling."""
    from cqrs_resilience import CommandInProgressError

    error = CommandInProgressError("order-7", retry_after=2.5)
    assert (error.command_id, error.retry_after) == ("order-7", 2.5)
    assert "order-7" in str(error) and "2.5" in str(error)
    again = pickle.loads(pickle.dumps(error))
    assert (again.command_id, again.retry_after, str(again)) == ("order-7", 2.5, str(error))
    assert CommandInProgressError("x").retry_after is None
