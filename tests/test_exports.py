"""The public surface: everything the contract names is exported, and nothing private is."""

from __future__ import annotations

import cqrs_resilience

CONTRACT = {
    "BrokenCircuitError",
    "CIRCUIT_CLOSED",
    "CIRCUIT_HALF_OPENED",
    "CIRCUIT_OPENED",
    "CONFLICT_DETECTED",
    "CONFLICT_FAILED",
    "CONFLICT_RESOLVED",
    "RETRY_BUDGET_EXHAUSTED",
    "RETRY_EXHAUSTED",
    "RETRY_SCHEDULED",
    "Command",
    "CommandResponse",
    "CommandInProgressError",
    "CommandTimeoutError",
    "ConcurrencyError",
    "Conflict",
    "ConflictResilient",
    "ExponentialBackoffPolicy",
    "FixedRetryPolicy",
    "CqrsResilienceError",
    "HookRegistry",
    "InvalidIdempotencyKeyError",
    "MergeConflictError",
    "PipelinedCommandHandler",
    "Retryable",
    "RetryableCommandHandler",
    "RetryBehaviorMixin",
    "RetryPolicy",
    "TransientError",
    "circuit_breaker",
    "get_hook_registry",
    "inject_faults",
    "pipeline",
    "retry",
}


def test_contract_names_are_exported() -> None:
    """Every name of the contract imports from the top-level package."""
    assert CONTRACT <= set(cqrs_resilience.__all__)
    for name in CONTRACT:
        assert getattr(cqrs_resilience, name) is not None


def test_all_is_sorted_and_complete() -> None:
    """__all__ is one sorted list of names that all exist, and public objects are in it."""
    assert cqrs_resilience.__all__ == sorted(cqrs_resilience.__all__)
    for name in cqrs_resilience.__all__:
        assert hasattr(cqrs_resilience, name), name
    public = {
        name
        for name, value in vars(cqrs_resilience).items()
        if not name.startswith("_")
        and getattr(value, "__module__", "").startswith("cqrs_resilience.")
    }
    assert public <= set(cqrs_resilience.__all__)


def test_public_objects_live_in_private_modules() -> None:
    """Exported classes and functions are defined in underscore modules, re-exported here."""
    for name in cqrs_resilience.__all__:
        module = getattr(getattr(cqrs_resilience, name), "__module__", None)
        if module and module.startswith("cqrs_resilience."):
            assert module.split(".")[1].startswith("_"), (name, module)
