"""One example of every error `cqrs_resilience.http.problem()` answers, with the answer it must
get: the status table of docs/how-to/http.md, as the HTTP tests check it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec

from cqrs_resilience import (
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
    UnknownStrategyError,
    VersionPrunedError,
)
from cqrs_resilience.stores import SchemaError, StoreClosedError, StoreConfigurationError

SECRET = "postgresql://app:hunter2@db.internal:5432/orders"
"""What a store's or a driver's message may quote; no answer may repeat it."""


class Pay(msgspec.Struct):
    amount: int


def invalid_body() -> msgspec.ValidationError:
    try:
        msgspec.json.decode(b'{"amount": "ten"}', type=Pay)
    except msgspec.ValidationError as exc:
        return exc
    raise AssertionError("the body decoded")


def malformed_body() -> msgspec.DecodeError:
    try:
        msgspec.json.decode(b"not json", type=Pay)
    except msgspec.DecodeError as exc:
        return exc
    raise AssertionError("the body decoded")


class Row(msgspec.Struct, frozen=True):
    """An error, and the answer `problem()` must give it."""

    name: str
    make: Callable[[], BaseException]
    status: int
    code: str
    headers: dict[str, str] = {}
    command_id: str | None = None
    own_text: bool = False
    """The detail is the error's own message (it is about the client's input)."""


ROWS = [
    Row(
        "InvalidIdempotencyKeyError",
        lambda: InvalidIdempotencyKeyError("the Idempotency-Key header must be ..."),
        400,
        "invalid_idempotency_key",
        own_text=True,
    ),
    Row(
        "CommandInProgressError",
        lambda: CommandInProgressError("pay-o1", retry_after=2.2),
        409,
        "command_in_progress",
        {"Retry-After": "3"},
        command_id="pay-o1",
    ),
    Row(
        "CommandInProgressError (no retry_after)",
        lambda: CommandInProgressError("pay-o1"),
        409,
        "command_in_progress",
        command_id="pay-o1",
    ),
    Row(
        "ConcurrencyError",
        lambda: ConcurrencyError(aggregate_id="o1", expected_version=1, actual_version=2),
        409,
        "concurrency_conflict",
    ),
    Row(
        "MergeConflictError",
        lambda: MergeConflictError([Conflict(("status",), "new", "paid", "cancelled")]),
        409,
        "merge_conflict",
    ),
    Row(
        "VersionPrunedError",
        lambda: VersionPrunedError("o1", 3, 120),
        409,
        "version_too_old",
    ),
    Row(
        "IdempotencyKeyReuseError",
        lambda: IdempotencyKeyReuseError("pay-o1", "o1"),
        422,
        "idempotency_key_reuse",
        command_id="pay-o1",
    ),
    Row(
        "InvalidStateError",
        lambda: InvalidStateError("o1", "$.items[0]", "Expected `str`, got `int`"),
        422,
        "invalid_state",
    ),
    Row("msgspec.ValidationError", invalid_body, 422, "invalid_body", own_text=True),
    Row("msgspec.DecodeError", malformed_body, 422, "invalid_body", own_text=True),
    Row(
        "UnknownStrategyError",
        lambda: UnknownStrategyError("nope", ["deep", "field"]),
        422,
        "unknown_merge_strategy",
    ),
    Row(
        "BrokenCircuitError",
        lambda: BrokenCircuitError(4.2),
        503,
        "circuit_open",
        {"Retry-After": "5"},
    ),
    Row(
        "BrokenCircuitError (retry_after not known)",
        BrokenCircuitError,
        503,
        "circuit_open",
        {"Retry-After": "1"},
    ),
    Row(
        "TransientError",
        lambda: TransientError(f"connecting to {SECRET}: refused", retry_after=0.25),
        503,
        "temporarily_unavailable",
        {"Retry-After": "1"},
    ),
    Row(
        "TransientError (no retry_after)",
        lambda: TransientError(f"connecting to {SECRET}: refused"),
        503,
        "temporarily_unavailable",
    ),
    Row(
        "StoreClosedError",
        lambda: StoreClosedError(f"writing to {SECRET}: the connection pool is closed"),
        503,
        "shutting_down",
    ),
    Row(
        "CommandTimeoutError",
        lambda: CommandTimeoutError("pay timed out after 2 s"),
        504,
        "timeout",
    ),
    Row("TimeoutError", lambda: TimeoutError("read timed out"), 504, "timeout"),
    Row("asyncio.TimeoutError", asyncio.TimeoutError, 504, "timeout"),
    Row(
        "ConfigurationError",
        lambda: ConfigurationError("max_retries must be >= 0, got -1"),
        500,
        "internal_error",
    ),
    Row("StoreError", lambda: StoreError(f"{SECRET}: disk I/O error"), 500, "internal_error"),
    Row(
        "SchemaError",
        lambda: SchemaError(f"{SECRET}: no such table: aggregates"),
        500,
        "internal_error",
    ),
    Row(
        "StoreConfigurationError",
        lambda: StoreConfigurationError(f"connecting to {SECRET}: the server refused"),
        500,
        "internal_error",
    ),
    Row(
        "CorruptStateError",
        lambda: CorruptStateError("o1", 3, f"row from {SECRET} does not decode"),
        500,
        "internal_error",
    ),
    Row(
        "InvalidResponseError",
        lambda: InvalidResponseError("c-1", f"it cannot be encoded: {SECRET}"),
        500,
        "internal_error",
        command_id="c-1",
    ),
    Row(
        "UndecodableCommandError",
        lambda: UndecodableCommandError("AddItem", f"JSON is malformed: {SECRET}"),
        500,
        "internal_error",
    ),
    Row(
        "CqrsResilienceError",
        lambda: CqrsResilienceError(f"response of {SECRET} cannot be encoded"),
        500,
        "internal_error",
    ),
]
