"""The command being processed, so a store can tell a repeat from a new write.

A retried command that already committed (a timeout after commit) must not apply twice; a
different command reusing an id must not get another command's outcome instead of its write;
and a command that writes one aggregate twice (create, then update) must have both applied.
Every entry point (`handle()`, `retry()`, `resolve_conflicts()`, `command_scope()`) runs the
command inside a *scope*, which stores read when they write:

- `command_id`, the idempotency key recorded beside each write;
- a fingerprint of the original command (a digest of its encoding), so a store tells a resend
  of the same command (first outcome back) from a different one (`IdempotencyKeyReuseError`);
- a count of writes per aggregate in the current attempt: the n-th write of an aggregate
  replays the n-th write of an earlier attempt and is applied when there was none.

A scope is opened once per command and reused by the behaviors inside it (a `retry()` inside
`handle()` costs a lookup, not a new scope). A re-attempt (a retry, a conflict round) runs in a
child scope that starts from the counts the retried call started with; when it ends, the
counts go back to the parent (the higher of the two per aggregate). Writes of one aggregate
from concurrent tasks of one command are numbered in the order they reach the store.

A command id is checked (`check_command_id`) where it comes in: by `Command` on construction
and decoding, by `command_scope()`, by `persist(..., command_id=...)`. One that came in past
them (a plain class, an id assigned later) is checked at the command's first recorded write
(`Scope.fingerprint`), so the behaviors' per-call path pays nothing for it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any, NamedTuple

import msgspec

from ._errors import IdempotencyKeyReuseError
from ._messages import require_command_id
from ._stack import with_stack_fallback
from ._walk import too_deep


class Scope(msgspec.Struct, gc=False):
    """One command's idempotency context: its id, its original, and its writes this attempt."""

    command_id: str
    command: Any = None  # the original command; None when only an id was given
    root: Scope | None = None  # the scope a re-attempt's child was opened under
    counts: dict[str, int] | None = None  # writes per store key this attempt
    log: list[tuple[str, int]] | None = None  # (key, previous count), to rebuild snapshots
    changes: int = 0  # len(log): a snapshot of the counts costs one attribute read
    digest: bytes | None = None
    telemetry: Any = None  # the instrumentation's record of this command (`_telemetry`)
    turn_rank: int | None = None  # its place in turn queues: when it first asked for a turn
    claim: Claim | None = None  # `idempotent()` runs it: its writes claim its response

    def fingerprint(self) -> bytes:
        """A digest of the original command's encoding (b"" when only an id was given).

        The first call, made when a store first records a write for the command, checks its
        id too: a command built past its checks (a plain class, an id assigned later) is
        refused there with the `ConfigurationError` of `Command(command_id=...)`, before
        anything is written, and costs the behaviors' per-call path nothing."""
        root = self.root or self
        if root.digest is None:
            require_command_id(root.command_id)
            root.digest = b"" if root.command is None else fingerprint(root.command)
        return root.digest

    def count(self, key: str, value: int) -> None:
        """Record that `key` has `value` writes this attempt."""
        if self.counts is None:
            self.counts = {}
        if self.log is None:
            self.log = []
        self.log.append((key, self.counts.get(key, 0)))
        self.counts[key] = value
        self.changes += 1

    def counts_at(self, changes: int) -> dict[str, int]:
        """The counts as they were after `changes` changes."""
        counts = dict(self.counts or {})
        for key, previous in reversed((self.log or [])[changes:]):
            counts[key] = previous
        return counts


class Claim(NamedTuple):
    """What a command `idempotent()` runs asks of the writes it makes to `store` (the one
    that records its response): to claim the response for `owner` for `lease_s` seconds, so
    a resend elsewhere waits for it instead of running the command too."""

    store: Any
    owner: str
    lease_s: float


def claim_of(write: WriteKey | None, store: object) -> Claim | None:
    """The claim a write to `store` makes, if its command is one `idempotent()` runs."""
    if write is None or write.scope is None:
        return None
    claim = (write.scope.root or write.scope).claim
    return claim if claim is not None and claim.store is store else None


CURRENT: ContextVar[Scope | None] = ContextVar("cqrs_resilience.command_scope", default=None)

_fingerprint_encoder = msgspec.msgpack.Encoder(order="deterministic")
_fallback_encoder = msgspec.json.Encoder(order="deterministic", enc_hook=repr)


def fingerprint(command: Any) -> bytes:
    """A digest of `command`'s encoding: equal for a resend of the same command.

    msgpack keeps what JSON blurs (NaN, bytes); values it cannot encode (big integers, other
    types) fall back to JSON with `repr`, which errs towards "different": a refused resend,
    never a lost write. The encoding moves to a fresh stack when the caller's is too deep,
    so a command has one digest at any call depth; one that cannot be encoded even there (a
    cycle, nesting near the recursion limit) is a `TypeError` naming it.
    """
    try:
        encoded = with_stack_fallback(_encoding, command)
    except RecursionError:
        raise too_deep(
            f"command {type(command).__name__}",
            command,
            "it cannot be encoded to tell a resend of it from another command under its id",
        ) from None
    return hashlib.blake2b(encoded, digest_size=16).digest()


def _encoding(command: Any) -> bytes:
    # RecursionError is left to `with_stack_fallback`: caught here, a deep command's digest
    # would depend on the caller's depth (a repr from a deep stack, msgpack from a shallow one).
    try:
        return _fingerprint_encoder.encode(command)
    except (TypeError, ValueError, OverflowError):
        pass
    try:
        return _fallback_encoder.encode(command)
    except (TypeError, ValueError, OverflowError):
        return repr(command).encode("utf-8", "backslashreplace")


COMMAND_TYPES: dict[type, bool] = {}
"""Whether instances of a type are commands (carry a `command_id` that is not None): decided
once per type, since an isinstance check against a class with a metaclass costs over 100 ns.
The hot paths read it inline: `COMMAND_TYPES.get(type(x))` is True, False, or None (not seen
yet). An id that is no string still makes a command, one whose first write is refused
(`Scope.fingerprint`), rather than a call that silently records nothing."""


def is_command(value: Any) -> bool:
    """Whether `value` is a command, learning its type on the first sight."""
    kind = type(value)
    known = COMMAND_TYPES.get(kind)
    if known is None:
        if len(COMMAND_TYPES) > 10_000:  # types made on the fly must not grow this forever
            COMMAND_TYPES.clear()
        known = COMMAND_TYPES[kind] = getattr(value, "command_id", None) is not None
    return known


def enter(args: tuple[Any, ...]) -> tuple[Scope | None, Token[Scope | None] | None]:
    """The scope a call with these arguments runs in, and the token to close it if this
    opened it. The call's command is its first argument, or its second after a `self`.

    A command already being processed (same `command_id`: a rebuilt or retried one) keeps its
    scope; any other command opens its own; a call without one runs in the current scope. On
    every behavior's hot path, so it makes no other call in the usual cases.
    """
    scope = CURRENT.get()
    command = args[0] if args else None
    if scope is not None and command is scope.command:
        return scope, None
    known = COMMAND_TYPES.get(type(command))
    if known is None:  # a type's first sight: a `self` must hand over to the next argument
        known = is_command(command)
    if known is False and len(args) > 1:
        command = args[1]
        known = COMMAND_TYPES.get(type(command))
        if known is None:
            known = is_command(command)
    if not known:
        return scope, None
    command_id: str = command.command_id  # type: ignore[union-attr]
    if scope is not None and scope.command_id == command_id:
        return scope, None
    opened = Scope(command_id, command)
    return opened, CURRENT.set(opened)


def attempt_needs_own_counts(scope: Scope | None, changes: int) -> bool:
    """Whether a re-attempt must run on a snapshot of the counts: only when some write was
    counted since the retried call started (usually none: it failed before writing)."""
    return scope is not None and scope.changes != changes


@contextmanager
def attempt(scope: Scope | None, changes: int) -> Iterator[None]:
    """Run a re-attempt on the write counts the retried call started with (`changes`)."""
    if scope is None:
        yield
        return
    child = Scope(scope.command_id, scope.command, scope.root or scope, scope.counts_at(changes))
    token = CURRENT.set(child)
    try:
        yield
    finally:
        CURRENT.reset(token)
        for key, value in (child.counts or {}).items():
            if value > (scope.counts or {}).get(key, 0):
                scope.count(key, value)


@contextmanager
def command_scope(command: Any) -> Iterator[None]:
    """Make stores record writes inside the block under this command (or command id).

    Give the command itself to let stores refuse a different command reusing its id; a bare
    id string declares that the id alone identifies the command. `None` turns recording off.
    An id that breaks the command-id rule (`check_command_id`) is a `ConfigurationError`.
    Behaviors open scopes themselves; this is for code that writes without them.
    """
    if command is None:
        token = CURRENT.set(None)
    else:
        # A command, or else the id itself; a bad id is the error `Command(command_id=...)` gives.
        command_id = require_command_id(getattr(command, "command_id", command))
        token = CURRENT.set(Scope(command_id, None if command_id is command else command))
    try:
        yield
    finally:
        CURRENT.reset(token)


class _CurrentCommandId:
    """Read-only: `current_command_id.get()` is the id of the command being processed."""

    def get(self, default: str | None = None) -> str | None:
        scope = CURRENT.get()
        return default if scope is None else scope.command_id

    def __repr__(self) -> str:
        return f"<current_command_id {self.get()!r}>"


current_command_id = _CurrentCommandId()


# --- what stores use -------------------------------------------------------------------------


class WriteKey(NamedTuple):
    """What a store records beside one write, and checks a repeat against."""

    command_id: str
    seq: int  # the n-th write of this aggregate by this command (per attempt)
    fingerprint: bytes
    whole_command: bool  # the fingerprint is the command's: another under this id is refused
    scope: Scope | None


def write_key(command_id: str | None, key: str, encoded: bytes) -> WriteKey | None:
    """The key to record a write of `key` under (and reserve its number), or None.

    Inside a command's scope: its id, the write's number, the command's fingerprint. With an
    explicit `command_id` that is not the scope's, the write itself is the request: a repeat
    with the same state gets the first outcome, one with another state is refused.
    """
    scope = CURRENT.get()
    if scope is not None and command_id in (None, scope.command_id):
        digest = scope.fingerprint()  # first, as it may refuse the command: nothing reserved
        seq = (scope.counts or {}).get(key, 0) + 1
        scope.count(key, seq)
        return WriteKey(scope.command_id, seq, digest, True, scope)
    if command_id is None:
        return None
    digest = hashlib.blake2b(encoded, digest_size=16).digest()
    return WriteKey(command_id, 1, digest, False, None)


def write_failed(write: WriteKey | None, key: str) -> None:
    """Give back the number a failed write reserved, unless a later write took one since."""
    if write is not None and write.scope is not None:
        counts = write.scope.counts or {}
        if counts.get(key) == write.seq:
            write.scope.count(key, write.seq - 1)


def is_repeat(
    write: WriteKey,
    aggregate_id: str,
    command_fingerprint: bytes | None,
    write_fingerprint: bytes | None,
) -> bool:
    """Whether a write is a repeat (True: answer with the recorded outcome) or new (False).

    `command_fingerprint` is what the store recorded for the command id, if anything;
    `write_fingerprint` what it recorded for this very write (id, aggregate, number). A
    different fingerprint means a different command: `IdempotencyKeyReuseError`.
    """
    if write.whole_command and command_fingerprint not in (None, write.fingerprint):
        raise IdempotencyKeyReuseError(write.command_id, aggregate_id)
    if write_fingerprint is None:
        return False
    if write_fingerprint != write.fingerprint:
        raise IdempotencyKeyReuseError(write.command_id, aggregate_id)
    return True
