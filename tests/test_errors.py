"""Errors: the attributes users read off them."""

from __future__ import annotations

from cqrs_resilience import (
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
