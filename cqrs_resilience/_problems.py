"""`problem()`: how to answer each error of the library over HTTP (RFC 9457 problem details).

The status of an error is the first of its classes, most specific first, that `_KINDS` names:
an `IdempotencyKeyReuseError` (a `StoreError` and a `ValueError`) is 422, not a store's 500.
`CqrsResilienceError` itself is looked up last, so `CommandTimeoutError` (a
`CqrsResilienceError` and a `TimeoutError`) gets the timeout's 504.

A problem's `type` is `about:blank` (RFC 9457 4.2.1): its `title` is the status's phrase and
its `code`, an extension member, names the kind of problem with a word that stays the same
across releases: two problems of one status (409 for a command in progress and for a
conflict) are told apart by `code`. The library has no site to host a problem type URI at,
and a URI nobody can dereference says less than a plain word. `detail` is written here for
the client, never the error's own text, except where that text is about the client's own
input (a bad key, a body that does not decode, a state the store refuses): an error's text
can quote SQL, paths or hosts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, ClassVar, NamedTuple

import msgspec

from ._errors import (
    BrokenCircuitError,
    CommandInProgressError,
    CommandTimeoutError,
    ConcurrencyError,
    ConfigurationError,
    CqrsResilienceError,
    IdempotencyKeyReuseError,
    InvalidIdempotencyKeyError,
    InvalidStateError,
    MergeConflictError,
    StoreClosedError,
    StoreError,
    TransientError,
    VersionPrunedError,
)
from ._merge_registry import UnknownStrategyError
from ._messages import check_command_id


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """How to answer an error over HTTP: `status`, `headers` to add (`Retry-After`) and an
    RFC 9457 problem `body` (`type`, `title`, `status`, `detail`, `code`, and `command_id`
    when the error knows it), sent as `media_type`; `to_json()` gives the body's bytes."""

    status: int
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    body: dict[str, Any] = msgspec.field(default_factory=dict)

    media_type: ClassVar[str] = "application/problem+json"

    def to_json(self) -> bytes:
        """The body as JSON, for a response whose content type is `media_type`."""
        return msgspec.json.encode(self.body)


class _Kind(NamedTuple):
    status: int
    code: str
    detail: str | Callable[[BaseException], str | None]
    """For the client: a fixed sentence, or one made from the error (None: `_FALLBACK`)."""
    retry_after: bool = False
    """Send the error's `retry_after` as a `Retry-After` header, when it has one."""


_DETAIL_LENGTH = 300
_RETRY_AFTER_MAX = 2**31
"""The largest `Retry-After` sent: what RFC 9111 (1.2.2) tells recipients to read a larger
delta-seconds as."""


def _own_text(exc: BaseException) -> str | None:
    """The error's message: for errors that describe the client's own input."""
    return str(exc) or None


def _invalid_state(exc: BaseException) -> str | None:
    reason, path = _attribute(exc, "reason"), _attribute(exc, "path")
    if not isinstance(reason, str) or not isinstance(path, str):
        return None
    return f"the command would store a state this service cannot keep: {reason} (at `{path}`)"


_INTERNAL = _Kind(500, "internal_error", "the service failed to handle the command")
_TIMEOUT = _Kind(
    504,
    "timeout",
    "the command did not finish in time; it may or may not have taken effect",
)

_KINDS: dict[type[BaseException], _Kind] = {
    # The client's request is wrong as sent.
    InvalidIdempotencyKeyError: _Kind(400, "invalid_idempotency_key", _own_text),
    IdempotencyKeyReuseError: _Kind(
        422,
        "idempotency_key_reuse",
        "this idempotency key was already used for a different command; "
        "send a new command with a new key",
    ),
    InvalidStateError: _Kind(422, "invalid_state", _invalid_state),
    # A body that does not decode: malformed (a `DecodeError`) or not the command (its
    # subclass `ValidationError`). msgspec's message says where, never what else it read.
    msgspec.DecodeError: _Kind(422, "invalid_body", _own_text),
    # Commands choose their merge strategy (API.md 8): an unknown name came from the command.
    UnknownStrategyError: _Kind(
        422,
        "unknown_merge_strategy",
        "the command asks for a merge strategy this service does not have",
    ),
    # The request met the current state of the data.
    CommandInProgressError: _Kind(
        409,
        "command_in_progress",
        "the same command is being handled elsewhere; ask again later",
        retry_after=True,
    ),
    ConcurrencyError: _Kind(
        409,
        "concurrency_conflict",
        "another command changed the same data first; read it again and send a new command",
    ),
    MergeConflictError: _Kind(
        409,
        "merge_conflict",
        "another command changed the same fields to other values; "
        "read the data again and send a new command",
    ),
    # A command based on a version so old the store no longer keeps it: re-read, as for 409.
    VersionPrunedError: _Kind(
        409,
        "version_too_old",
        "the version the command was based on is no longer kept; "
        "read the data again and send a new command",
    ),
    # Try again later: the same request may succeed.
    BrokenCircuitError: _Kind(
        503,
        "circuit_open",
        "a service this one depends on is failing; calls to it are refused for a while",
        retry_after=True,
    ),
    TransientError: _Kind(
        503,
        "temporarily_unavailable",
        "a temporary failure outlasted every retry; try again later",
        retry_after=True,
    ),
    # A closed store is a service shutting down: another instance, or this one restarted, serves.
    StoreClosedError: _Kind(
        503, "shutting_down", "the service is shutting down; send the command again"
    ),
    CommandTimeoutError: _TIMEOUT,
    TimeoutError: _TIMEOUT,
    # The service's own fault: nothing the client can change. Their text is for the logs.
    ConfigurationError: _INTERNAL,  # a setting out of range, made in code at run time
    StoreError: _INTERNAL,  # a schema, a DSN, a corrupt row, a driver failure
}
"""The status of each error the library answers: the first of an error's classes (most
specific first) found here wins. `CqrsResilienceError` itself is looked up last, so an error
that is also a builtin this table knows (a `TimeoutError`) gets that builtin's row."""

_FALLBACK = "the request failed"


def problem(exc: BaseException) -> Problem | None:
    """How to answer `exc` over HTTP, or None when it is not an error this library answers.

    Maps every `CqrsResilienceError`, the builtin `TimeoutError` and `msgspec.DecodeError`
    (a body that does not decode) to a status, a `Retry-After` header where known, and an
    RFC 9457 body; the table is in the docs' HTTP page.
    """
    kind = _kind_of(exc)
    if kind is None:
        return None
    detail = kind.detail if isinstance(kind.detail, str) else _detail_of(exc, kind.detail)
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(kind.status).phrase,
        "status": kind.status,
        "detail": _clean(detail or _FALLBACK),
        "code": kind.code,
    }
    command_id = _attribute(exc, "command_id")
    if check_command_id(command_id) is None:
        body["command_id"] = command_id
    headers: dict[str, str] = {}
    if kind.retry_after:
        seconds = _retry_after(_attribute(exc, "retry_after"))
        if seconds is not None:
            headers["Retry-After"] = seconds
    return Problem(status=kind.status, headers=headers, body=body)


def _kind_of(exc: BaseException) -> _Kind | None:
    for klass in type(exc).__mro__:
        if klass is CqrsResilienceError:
            continue  # last: a builtin base further along is more specific
        kind = _KINDS.get(klass)
        if kind is not None:
            return kind
    return _INTERNAL if isinstance(exc, CqrsResilienceError) else None


def _detail_of(exc: BaseException, make: Callable[[BaseException], str | None]) -> str | None:
    try:
        return make(exc)
    except Exception:  # an error whose __str__ fails still gets its answer
        return None


def _attribute(exc: BaseException, name: str) -> object:
    """`exc.name`, or None when it has none (or reading it fails: an error built oddly must
    still get its answer)."""
    try:
        return getattr(exc, name, None)
    except Exception:
        return None


def _retry_after(seconds: object) -> str | None:
    """`Retry-After` for `seconds`: whole seconds rounded up, at least 1; None if unknown."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return None
    if not 0 <= seconds < math.inf:
        return None
    return str(min(max(1, math.ceil(seconds)), _RETRY_AFTER_MAX))


def _clean(text: str) -> str:
    """`text` as JSON takes it (no lone surrogate), cut to `_DETAIL_LENGTH` characters."""
    if len(text) > _DETAIL_LENGTH:
        text = text[: _DETAIL_LENGTH - 3] + "..."
    return text.encode("utf-8", "replace").decode()
