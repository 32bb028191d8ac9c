"""The errors cqrs_resilience raises and understands.

Exception
 ├── ConcurrencyError        two writers raced on one aggregate (conflict resolution's job)
 ├── TransientError          worth retrying: the same call may succeed a moment later
 ├── MergeConflictError      a merge met changes it may not reconcile; lists every Conflict
 └── ValueError
      └── ConfigurationError a policy or config field out of range, named in the message
"""

from __future__ import annotations

from typing import Any

import msgspec


class ConfigurationError(ValueError):
    """A retry policy or conflict config was given a value outside its allowed range."""


class ConcurrencyError(Exception):
    """An optimistic-concurrency check failed: the aggregate moved on since it was read."""

    def __init__(
        self,
        message: str | None = None,
        *,
        aggregate_id: Any = None,
        expected_version: int | None = None,
        actual_version: int | None = None,
    ) -> None:
        if message is None:
            message = f"aggregate {aggregate_id!r} is at version {actual_version}, " + (
                f"expected {expected_version}"
            )
        super().__init__(message)
        self.aggregate_id = aggregate_id
        self.expected_version = expected_version
        self.actual_version = actual_version


class TransientError(Exception):
    """A failure worth retrying; `retry_after` (seconds) is the least the next delay may be."""

    def __init__(self, message: str = "transient failure", *, retry_after: float | None = None):
        if retry_after is not None and retry_after < 0:
            raise ConfigurationError(f"retry_after must be >= 0 seconds, got {retry_after}")
        super().__init__(message)
        self.retry_after = retry_after


class Conflict(msgspec.Struct, frozen=True):
    """One path that both sides changed to different values since `base`."""

    path: tuple[str | int, ...]
    base: Any
    current: Any
    incoming: Any


class MergeConflictError(Exception):
    """A merge found concurrent changes it may not reconcile; `conflicts` lists all of them."""

    def __init__(self, conflicts: list[Conflict], message: str | None = None) -> None:
        if message is None:
            paths = ", ".join("/".join(map(str, c.path)) or "<root>" for c in conflicts[:10])
            more = f" and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""
            message = f"{len(conflicts)} conflicting change(s) at: {paths}{more}"
        super().__init__(message)
        self.conflicts = conflicts
