"""`idempotent(store)`: a resend gets the first response, whatever happened since.

A resend is the normal case behind a queue or an HTTP `Idempotency-Key`: the client did not
hear the answer and asks again. The behavior records each command's first successful
response in `store`, under its `command_id` with the command's fingerprint, and answers a
resend of the same command with it: the same value, byte for byte, without running what it
wraps, with one read of the store, before any timeout, retry, breaker or conflict resolution
(it is meant to be outermost). The same id with a different command is `IdempotencyKeyReuseError`.

In flight:
- twice in one process, the second send waits for the first (`_in_flight`) and gets its
  response or its exception (a `timeout()` inside bounds both); if the first was cancelled,
  one of the waiters runs the command;
- in two processes, each write the first makes to `store` keeps a claim on the response
  (`_response_store`), so the second waits up to `wait_s` for the response, then raises
  `CommandInProgressError`; nothing is applied twice either way (section 8 of the contract);
- a process that died after the command's writes and before its response was recorded leaves
  a claim that lapses `wait_s` after its last write: a resend then runs the command again, and
  its writes replay their first outcomes.

Only successful responses are recorded: a send that raised is answered by running again. A
response is encoded with msgspec (msgpack) and decoded with the wrapped function's return
annotation, so a resend gets a value of the same type; one that cannot be encoded, is bigger
than the store's `max_state_bytes` or does not read back equal is refused at the first send
(`InvalidResponseError`), and nothing is recorded (the command's writes stay: they are its
effect).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import typing
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import msgspec

from ._checks import setting
from ._errors import CommandInProgressError, IdempotencyKeyReuseError, InvalidResponseError
from ._idempotency import CURRENT, Claim, Scope, enter, is_command
from ._in_flight import AGAIN, IN_FLIGHT
from ._messages import require_command_id
from ._pipeline import async_only, name_of
from ._response_store import RecordedResponse, ResponseStore
from ._retry_on import command_of
from ._stack import with_stack_fallback

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_WAIT_S = 30.0
POLL_S = (0.01, 0.5)
"""The first and the longest pause between looks at a response another process owes."""
_MISSING: Any = object()
_PROCESS = uuid.uuid4().hex  # whose claims are whose: this process's sends, numbered
_SENDS = itertools.count()
_UNENCODABLE = (TypeError, ValueError, OverflowError, RecursionError)


class Idempotent:
    """The behavior `idempotent()` returns; apply it to an async one-command handler."""

    called = "idempotent()"

    def __init__(
        self,
        store: ResponseStore,
        *,
        keep_s: float | None = None,
        wait_s: float = DEFAULT_WAIT_S,
        response_type: Any = _MISSING,
    ) -> None:
        if not isinstance(store, ResponseStore):
            raise TypeError(
                f"idempotent() records responses in a store that keeps them (the library's "
                f"repositories do), got {store!r}"
            )
        if keep_s is not None:
            setting("keep_s", keep_s, "a finite number of seconds > 0, or None", _positive)
        setting("wait_s", wait_s, "a finite number of seconds >= 0", _finite)
        self.store = store
        self.keep_s = keep_s
        self.wait_s = float(wait_s)
        self._response_type = response_type

    def __repr__(self) -> str:
        return f"idempotent({self.store!r})"

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        handler = async_only(fn, self.called)
        response_type = self._response_type
        if response_type is _MISSING:
            response_type = _return_annotation(fn)
        codec = _Codec(response_type)

        @functools.wraps(fn)
        async def answering(*args: P.args, **kwargs: P.kwargs) -> T:
            command = command_of(args)
            if not is_command(command):  # no command, no id to answer by
                result: T = await handler(*args, **kwargs)
                return result
            scope, token = CURRENT.get(), None
            if scope is None or command is not scope.command:
                scope, token = enter(args)
            try:
                assert scope is not None
                return await self._answer(handler, args, kwargs, scope, codec)
            finally:
                if token is not None:
                    CURRENT.reset(token)

        return answering

    async def _answer(
        self,
        handler: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        scope: Scope,
        codec: _Codec,
    ) -> T:
        command_id = require_command_id(scope.command_id)
        fingerprint = scope.fingerprint()
        key = (id(self.store), command_id)
        deadline = self.store.clock.monotonic() + self.wait_s
        while True:
            joined = IN_FLIGHT.join(key, fingerprint)
            if joined is False:
                raise IdempotencyKeyReuseError(command_id, None)
            if joined is not True:  # sent already, and still running in this process
                response = await joined  # its outcome: it lands whatever happens to it
                if response is AGAIN:
                    continue
                return typing.cast(T, codec.decode(response, command_id))
            try:
                response = await self._send(handler, args, kwargs, scope, codec, deadline)
            except asyncio.CancelledError:
                IN_FLIGHT.land(key, (True, AGAIN))
                raise
            except BaseException as exc:
                IN_FLIGHT.land(key, (False, exc))
                raise
            IN_FLIGHT.land(key, (True, response))
            return typing.cast(T, codec.decode(response, command_id))

    async def _send(
        self,
        handler: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        scope: Scope,
        codec: _Codec,
        deadline: float,
    ) -> bytes:
        """This process's send of the command: the response recorded for it (the first one)."""
        command_id, fingerprint = scope.command_id, scope.fingerprint()
        recorded = await self._owed(command_id, fingerprint, deadline)
        if recorded is not None:
            return recorded
        root = scope.root or scope
        owner = f"{_PROCESS}:{next(_SENDS)}"
        previous, root.claim = root.claim, Claim(self.store, owner, self.wait_s)
        try:
            try:
                result = await handler(*args, **kwargs)
            finally:
                root.claim = previous
            encoded = codec.encode(result, command_id, self.store.max_state_bytes)
            kept = await self.store.record_response(command_id, fingerprint, encoded, self.keep_s)
        except BaseException:  # nothing recorded: a resend runs again, and need not wait
            self._release(command_id, owner)
            raise
        return _checked(kept, command_id, fingerprint)

    async def _owed(self, command_id: str, fingerprint: bytes, deadline: float) -> bytes | None:
        """The response recorded for the command, waited for while another process has the
        command in flight (until `deadline`); None when this send is to run it."""
        clock = self.store.clock
        pause, longest = POLL_S
        while True:
            recorded = await self.store.recorded_response(command_id)
            if recorded is None:
                return None
            if recorded.fingerprint != fingerprint:
                raise IdempotencyKeyReuseError(command_id, None)
            if recorded.response is not None:
                return recorded.response
            # Claimed: in flight elsewhere (or its process died, and the claim will lapse).
            left = deadline - clock.monotonic()
            if left <= 0:
                raise CommandInProgressError(command_id)
            await clock.sleep(min(pause, left))
            pause = min(pause * 2, longest)

    def _release(self, command_id: str, owner: str) -> None:
        """Drop the claim a failed send's writes made, without waiting: if this does not
        happen (the loop is closing), the claim lapses."""
        try:
            releasing = asyncio.ensure_future(self.store.release_claim(command_id, owner))
        except RuntimeError:  # no running loop
            return
        releasing.add_done_callback(_outcome_not_needed)


def _checked(kept: RecordedResponse, command_id: str, fingerprint: bytes) -> bytes:
    if kept.fingerprint != fingerprint:
        raise IdempotencyKeyReuseError(command_id, None)
    assert kept.response is not None
    return kept.response


class _Codec:
    """Responses as msgpack, read back as the wrapped function's return type."""

    def __init__(self, response_type: Any) -> None:
        self.response_type = response_type
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(response_type).decode

    def encode(self, result: Any, command_id: str, max_bytes: int) -> bytes:
        """`result` as it will be recorded; `InvalidResponseError` if it would not read back
        equal, or is too big for the store."""
        try:
            encoded = with_stack_fallback(self._encode, result)
        except _UNENCODABLE as exc:
            raise InvalidResponseError(command_id, f"it cannot be encoded: {exc}") from exc
        if len(encoded) > max_bytes:
            raise InvalidResponseError(
                command_id,
                f"it is {len(encoded):,} bytes encoded; the store takes at most {max_bytes:,} "
                "(max_state_bytes)",
            )
        try:
            back = with_stack_fallback(self._decode, encoded)
        except (msgspec.ValidationError, RecursionError) as exc:
            raise InvalidResponseError(
                command_id, f"it does not read back as {_type_name(self.response_type)}: {exc}"
            ) from exc
        if back != result:
            raise InvalidResponseError(
                command_id,
                f"it does not read back equal as {_type_name(self.response_type)} (annotate "
                "the function with the type it returns; NaN is never equal to itself)",
            )
        return encoded

    def decode(self, response: bytes, command_id: str) -> Any:
        try:
            return with_stack_fallback(self._decode, response)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise InvalidResponseError(
                command_id,
                f"the response recorded for it does not read back as "
                f"{_type_name(self.response_type)} (did the return type change?): {exc}",
            ) from exc


def _return_annotation(fn: Callable[..., Any]) -> Any:
    """What `fn` returns, as its annotation says: what a resend is decoded as."""
    target = getattr(fn, "__func__", fn)
    try:
        hints = typing.get_type_hints(target)
    except Exception as exc:  # an annotation that does not resolve
        raise TypeError(
            f"idempotent() decodes resent responses as {name_of(fn)}'s return annotation, "
            f"which does not resolve: {exc}"
        ) from exc
    if "return" not in hints:
        raise TypeError(
            f"idempotent() decodes resent responses as {name_of(fn)}'s return annotation, and "
            "it has none: annotate what it returns (`-> Receipt`, `-> None`)"
        )
    return hints["return"]


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or repr(kind)


def _positive(value: float) -> bool:
    return 0 < value < math.inf


def _finite(value: float) -> bool:
    return 0 <= value < math.inf


def _outcome_not_needed(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def idempotent(
    store: ResponseStore, *, keep_s: float | None = None, wait_s: float = DEFAULT_WAIT_S
) -> Idempotent:
    """Answer a resent command with its first response, recorded in `store`.

    Outermost in a pipeline, so a resend is answered before any timeout, retry, breaker or
    conflict resolution. The wrapped function's first argument (or second, after `self`) is the
    command; a call without one runs as it is. Responses are kept `keep_s` seconds (the
    store's `keep_commands_s` by default). A send of a command another process has in flight
    waits up to `wait_s` for its response, then raises `CommandInProgressError`.
    """
    return Idempotent(store, keep_s=keep_s, wait_s=wait_s)
