"""Retry and conflict resolution for CQRS command handlers.

Behaviors are plain higher-order functions (`retry`, `timeout`, `resolve_conflicts`) composed with
`pipeline()`; the handler classes are thin shells generated from the same behaviors.
"""

from ._breaker import CircuitBreaker, circuit_breaker
from ._budget import RetryBudget
from ._chaos import FaultInjector, inject_faults
from ._clock import Clock, FakeClock, SystemClock, is_testing, set_testing
from ._conflict import (
    FetchBaseState,
    FetchLatestState,
    GetIncomingState,
    ResolveConflicts,
    UpdateCommand,
    resolve_conflicts,
)
from ._conflict_config import ConflictConfig, ConflictResolutionPolicy
from ._errors import (
    BrokenCircuitError,
    CommandInProgressError,
    CommandTimeoutError,
    ConcurrencyError,
    ConfigurationError,
    Conflict,
    CorruptStateError,
    CqrsResilienceError,
    IdempotencyKeyReuseError,
    InvalidIdempotencyKeyError,
    InvalidResponseError,
    InvalidStateError,
    MergeConflictError,
    StoreError,
    TransientError,
    UndecodableCommandError,
    VersionPrunedError,
)
from ._faults import FaultyRepository
from ._handlers import (
    CircuitBreakerMixin,
    ConflictCommandHandler,
    ConflictResolutionMixin,
    PipelinedCommandHandler,
    ResilientCommandHandler,
    RetryableCommandHandler,
    RetryBehaviorMixin,
    TimeoutMixin,
)
from ._hooks import (
    CIRCUIT_CLOSED,
    CIRCUIT_HALF_OPENED,
    CIRCUIT_OPENED,
    CONFLICT_DETECTED,
    CONFLICT_FAILED,
    CONFLICT_RESOLVED,
    RETRY_BUDGET_EXHAUSTED,
    RETRY_EXHAUSTED,
    RETRY_SCHEDULED,
    HookRegistry,
    get_hook_registry,
)
from ._idempotency import command_scope, current_command_id
from ._merge_engine import OnMergeConflict
from ._merge_registry import MergeStrategyRegistry, UnknownStrategyError
from ._merge_strategies import (
    DeepMergeStrategy,
    FieldLevelMergeStrategy,
    IMergeStrategy,
    MergeStrategy,
    ThreeWayMergeStrategy,
    TimestampLastWinsStrategy,
)
from ._merge_three_way import three_way_merge
from ._messages import Command, CommandResponse, ConflictResilient, Retryable, new_command_id
from ._pipeline import Behavior, Pipeline, pipeline
from ._policies import ExponentialBackoffPolicy, FixedRetryPolicy, RetryPolicy
from ._repository import Aggregate, InMemoryRepository, Repository
from ._response_store import RecordedResponse, ResponseStore
from ._responses import Idempotent, idempotent
from ._retry import Retry, retry
from ._retry_on import DEFAULT_RETRY_ON
from ._timeout import Timeout, timeout
from ._turns import Turns

__version__ = "0.1.0"

__all__ = [
    "Aggregate",
    "Behavior",
    "BrokenCircuitError",
    "CIRCUIT_CLOSED",
    "CIRCUIT_HALF_OPENED",
    "CIRCUIT_OPENED",
    "CONFLICT_DETECTED",
    "CONFLICT_FAILED",
    "CONFLICT_RESOLVED",
    "CircuitBreaker",
    "CircuitBreakerMixin",
    "Clock",
    "Command",
    "CommandInProgressError",
    "CommandResponse",
    "CommandTimeoutError",
    "ConcurrencyError",
    "ConfigurationError",
    "Conflict",
    "ConflictCommandHandler",
    "ConflictConfig",
    "ConflictResilient",
    "ConflictResolutionMixin",
    "ConflictResolutionPolicy",
    "CorruptStateError",
    "CqrsResilienceError",
    "DEFAULT_RETRY_ON",
    "DeepMergeStrategy",
    "ExponentialBackoffPolicy",
    "FakeClock",
    "FaultInjector",
    "FaultyRepository",
    "FetchBaseState",
    "FetchLatestState",
    "FieldLevelMergeStrategy",
    "FixedRetryPolicy",
    "GetIncomingState",
    "HookRegistry",
    "IMergeStrategy",
    "IdempotencyKeyReuseError",
    "Idempotent",
    "InMemoryRepository",
    "InvalidIdempotencyKeyError",
    "InvalidResponseError",
    "InvalidStateError",
    "MergeConflictError",
    "MergeStrategy",
    "MergeStrategyRegistry",
    "OnMergeConflict",
    "Pipeline",
    "PipelinedCommandHandler",
    "RETRY_BUDGET_EXHAUSTED",
    "RETRY_EXHAUSTED",
    "RETRY_SCHEDULED",
    "RecordedResponse",
    "Repository",
    "ResilientCommandHandler",
    "ResolveConflicts",
    "ResponseStore",
    "Retry",
    "RetryBehaviorMixin",
    "RetryBudget",
    "RetryPolicy",
    "Retryable",
    "RetryableCommandHandler",
    "StoreError",
    "SystemClock",
    "ThreeWayMergeStrategy",
    "Timeout",
    "TimeoutMixin",
    "TimestampLastWinsStrategy",
    "TransientError",
    "Turns",
    "UndecodableCommandError",
    "UnknownStrategyError",
    "UpdateCommand",
    "VersionPrunedError",
    "__version__",
    "circuit_breaker",
    "command_scope",
    "current_command_id",
    "get_hook_registry",
    "idempotent",
    "inject_faults",
    "is_testing",
    "new_command_id",
    "pipeline",
    "resolve_conflicts",
    "retry",
    "set_testing",
    "three_way_merge",
    "timeout",
]
