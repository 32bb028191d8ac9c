"""The errors cqrs_resilience raises and understands.

Exception
 └── CqrsResilienceError             every error of this library: one `except` catches them all
      ├── ConcurrencyError           two writers raced on one aggregate (conflict resolution's job)
      ├── TransientError             worth retrying: the same call may succeed a moment later
      ├── BrokenCircuitError         an open circuit breaker refused the call (not retried)
      ├── MergeConflictError         a merge met changes it may not reconcile; lists every Conflict
      ├── CommandInProgressError     the same command is being handled elsewhere; ask again later
      ├── CommandTimeoutError        (also TimeoutError) `timeout()` ran out
      ├── ConfigurationError         (also ValueError) a setting out of range, named in the message
      ├── InvalidIdempotencyKeyError (also ValueError) an Idempotency-Key no command id can be
      ├── InvalidResponseError       (also ValueError) a response `idempotent()` cannot record
      ├── UndecodableCommandError    (also ValueError) a queued job that carries no command
      └── StoreError                 a store failed in a way the same call will not fix
           ├── StoreClosedError         the repository (or the pool it was given) was closed
           ├── SchemaError              the store's tables are missing or unusable
           ├── StoreConfigurationError  (also ValueError) wrong path, database, user or password
           ├── CorruptStateError        (also ValueError) a stored row does not decode
           ├── InvalidStateError        (also ValueError) a state the store refuses to write
           ├── VersionPrunedError       (also LookupError) an old version a store no longer keeps
           └── IdempotencyKeyReuseError (also ValueError) one command_id, two different commands

The store errors live here, not in `stores/`, because `InMemoryRepository` raises them too.
"""

from __future__ import annotations

import math
from typing import Any, overload

import msgspec


class CqrsResilienceError(Exception):
    """The base of every error this library raises: `except CqrsResilienceError` catches them
    all (each keeps its other bases too: a `ConfigurationError` is still a `ValueError`)."""


class ConfigurationError(CqrsResilienceError, ValueError):
    """A retry policy or conflict config was given a value outside its allowed range."""


class ConcurrencyError(CqrsResilienceError):
    """An optimistic-concurrency check failed: the aggregate moved on since it was read, or
    another writer is resolving a conflict on it (then `actual_version` equals
    `expected_version`: the write was not made, so as not to race that writer).

    `turns`, set by the library's stores, is what conflict resolution on this aggregate
    waits through (the store itself, so writers in other processes wait too).
    """

    turns: Any = None

    def __init__(
        self,
        message: str | None = None,
        *,
        aggregate_id: Any = None,
        expected_version: int | None = None,
        actual_version: int | None = None,
    ) -> None:
        if message is None:
            message = _concurrency_message(aggregate_id, expected_version, actual_version)
        super().__init__(message)
        self.aggregate_id = aggregate_id
        self.expected_version = expected_version
        self.actual_version = actual_version

    def __reduce__(self) -> tuple[Any, ...]:  # a store in `turns` stays in its process
        state = {k: v for k, v in self.__dict__.items() if k != "turns"}
        return type(self), (str(self),), state


def _concurrency_message(aggregate_id: Any, expected: int | None, actual: int | None) -> str:
    if actual is not None and actual == expected:
        # The stores' way of saying a resolution elsewhere holds the aggregate.
        return (
            f"aggregate {aggregate_id!r}: another writer is resolving a conflict on it, so "
            f"this write (read at version {expected}) was not made"
        )
    return f"aggregate {aggregate_id!r} is at version {actual}, expected {expected}"


class TransientError(CqrsResilienceError):
    """A failure worth retrying; `retry_after` (seconds) is the least the next delay may be."""

    def __init__(self, message: str = "transient failure", *, retry_after: float | None = None):
        if retry_after is not None and retry_after < 0:
            raise ConfigurationError(f"retry_after must be >= 0 seconds, got {retry_after}")
        super().__init__(message)
        self.retry_after = retry_after


class BrokenCircuitError(CqrsResilienceError):
    """An open circuit breaker refused the call without running it.

    `retry_after` is the seconds left before the breaker lets a trial call through (a float
    >= 0; 0.0 when not known). Not a `TransientError`: retrying at once only meets the open
    circuit again, so `retry()` leaves it alone unless asked (`on=BrokenCircuitError`, when it
    waits at least `retry_after`). The failure that opened the circuit is chained as
    `__cause__`.

    Build it as `BrokenCircuitError(retry_after=0.0, message=None)`, by position or keyword;
    a first argument that is no number is the message (`BrokenCircuitError("maintenance")`).
    """

    # `args` is what was given, normalized to `(retry_after,)` or `(retry_after, message)`
    # (or `()`), so the error pickles as it was built and the properties read it back. An
    # open breaker builds its refusals through `BaseException.__new__`, which fills `args`
    # without running this __init__ (its checks would double the cost of refusing a call).
    @overload
    def __init__(self, retry_after: float | None = None, message: str | None = None) -> None: ...
    @overload
    def __init__(self, message: str, /) -> None: ...

    def __init__(self, retry_after: object = None, message: object = None) -> None:
        if retry_after is not None and not isinstance(retry_after, int | float):
            if message is not None:
                raise TypeError(
                    "BrokenCircuitError takes (retry_after, message): "
                    f"got {retry_after!r} and {message!r}"
                )
            retry_after, message = None, retry_after  # the message alone
        if retry_after is None and message is None:
            super().__init__()
            return
        seconds = 0.0 if retry_after is None else _seconds(retry_after)
        super().__init__(*((seconds,) if message is None else (seconds, message)))

    @property
    def retry_after(self) -> float:
        """Seconds until the breaker lets a trial call through; 0.0 when not known."""
        return float(self.args[0]) if self.args else 0.0

    @property
    def message(self) -> str | None:
        return self.args[1] if len(self.args) > 1 else None

    def __str__(self) -> str:
        if len(self.args) > 1:
            return str(self.args[1])
        if not self.args:
            return "the circuit is open"
        return f"the circuit is open; a trial call is allowed in {self.retry_after:.3f} s"


def _seconds(value: int | float) -> float:
    """`retry_after` as a float >= 0, or a ConfigurationError naming it."""
    wanted = "retry_after must be a finite number of seconds >= 0"
    try:
        seconds = float(value)
    except OverflowError:  # an int too big for a float: named by its size, not its digits
        bits = int(value).bit_length()
        raise ConfigurationError(f"{wanted}, got an integer of {bits} bits") from None
    if isinstance(value, bool) or not 0 <= seconds < math.inf:
        raise ConfigurationError(f"{wanted}, got {value!r}")
    return seconds


class Conflict(msgspec.Struct, frozen=True):
    """One path that both sides changed to different values since `base`."""

    path: tuple[str | int, ...]
    base: Any
    current: Any
    incoming: Any


class MergeConflictError(CqrsResilienceError):
    """A merge found concurrent changes it may not reconcile; `conflicts` lists all of them."""

    def __init__(self, conflicts: list[Conflict], message: str | None = None) -> None:
        if message is None:
            paths = ", ".join("/".join(map(str, c.path)) or "<root>" for c in conflicts[:10])
            more = f" and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""
            message = f"{len(conflicts)} conflicting change(s) at: {paths}{more}"
        super().__init__(message)
        self.conflicts = conflicts

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.conflicts, str(self)), self.__dict__


class StoreError(CqrsResilienceError):
    """A store failed in a way the same call will not fix; the driver's error is chained."""


class StoreClosedError(StoreError):
    """The repository, or the connection pool it was given, is closed."""


class SchemaError(StoreError):
    """The store's tables are missing or unusable (dropped, renamed, not permitted)."""


class StoreConfigurationError(StoreError, ValueError):
    """The store cannot be reached as configured: wrong path, database, user or password."""


class CorruptStateError(StoreError, ValueError):
    """A stored aggregate does not decode as the repository's aggregate type."""

    def __init__(self, aggregate_id: str, version: int | None, reason: str) -> None:
        at = f" version {version}" if version is not None else ""
        super().__init__(f"stored state of aggregate {aggregate_id!r}{at} is corrupt: {reason}")
        self.aggregate_id = aggregate_id
        self.version = version
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries intact
        return type(self), (self.aggregate_id, self.version, self.reason), self.__dict__


class InvalidStateError(StoreError, ValueError):
    """A store refused to write a state it could not read back as the aggregate type.

    `path` locates the offending value in the state, in msgspec's notation (`$.items[0]`);
    nothing was written.
    """

    def __init__(self, aggregate_id: Any, path: str, reason: str) -> None:
        super().__init__(f"aggregate {aggregate_id!r} not stored: {reason} - at `{path}`")
        self.aggregate_id = aggregate_id
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.aggregate_id, self.path, self.reason), self.__dict__


class VersionPrunedError(StoreError, LookupError):
    """A version the aggregate had, but the store no longer keeps (see `keep_versions`)."""

    def __init__(self, aggregate_id: Any, version: int, oldest_kept: int) -> None:
        super().__init__(
            f"version {version} of aggregate {aggregate_id!r} was pruned; the store keeps "
            f"versions from {oldest_kept} on (keep_versions)"
        )
        self.aggregate_id = aggregate_id
        self.version = version
        self.oldest_kept = oldest_kept

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.aggregate_id, self.version, self.oldest_kept), self.__dict__


class IdempotencyKeyReuseError(StoreError, ValueError):
    """A write came under a `command_id` the store already recorded for a different command.

    Resending the same command gets its first outcome back; a different command under a used
    id is refused rather than answered with another command's outcome (its write would be lost).
    """

    def __init__(self, command_id: str, aggregate_id: Any = None) -> None:
        writing = f" (writing aggregate {aggregate_id!r})" if aggregate_id is not None else ""
        super().__init__(
            f"command_id {command_id!r} was already used by a different command{writing}; "
            "give each command its own id"
        )
        self.command_id = command_id
        self.aggregate_id = aggregate_id

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.command_id, self.aggregate_id), self.__dict__


class CommandInProgressError(CqrsResilienceError):
    """The same command (its `command_id`) is being handled elsewhere and gave no response in
    time; nothing was applied twice. Ask again later: `retry_after` (seconds) says when, where
    known (None otherwise)."""

    def __init__(self, command_id: str, retry_after: float | None = None) -> None:
        later = f"; ask again in {retry_after:.3g} s" if retry_after is not None else ""
        super().__init__(f"command {command_id!r} is being handled elsewhere{later}")
        self.command_id = command_id
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.command_id, self.retry_after), self.__dict__


class CommandTimeoutError(CqrsResilienceError, TimeoutError):
    """A `timeout()` ran out and cancelled the call. Still a `TimeoutError`, so code (and the
    default retries) that handle the builtin handle it."""


class InvalidIdempotencyKeyError(CqrsResilienceError, ValueError):
    """An `Idempotency-Key` that cannot be a command id (see the rules of `command_id`)."""


class InvalidResponseError(CqrsResilienceError, ValueError):
    """A command's response that `idempotent()` cannot record, or read back: it would not
    read back equal as the function's return type, or is too big for the store. Nothing was
    recorded; the command's writes stay (they are its effect)."""

    def __init__(self, command_id: str, reason: str) -> None:
        super().__init__(f"the response to command {command_id!r} is not recorded: {reason}")
        self.command_id = command_id
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.command_id, self.reason), self.__dict__


class UndecodableCommandError(CqrsResilienceError, ValueError):
    """A job on a queue carries no command of the type its task takes (the schema changed, or
    garbage was queued): the job fails at once, never retried, and the queue goes on."""

    def __init__(self, command_type: str, reason: str) -> None:
        super().__init__(f"a queued job carries no {command_type} command: {reason}")
        self.command_type = command_type
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.command_type, self.reason), self.__dict__
