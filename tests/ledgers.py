"""Ledgers for the store model tests: the aggregate, its command, its handler, and a model of
what a store promised about each write.

A ledger holds a list of tokens; every command appends one new token to the whole ledger it
read, so what a ledger holds tells exactly which writes landed, and its version must be one
more than its number of tokens.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from cqrs_resilience import (
    Aggregate,
    Clock,
    Command,
    ConcurrencyError,
    ConflictConfig,
    ConflictResolutionPolicy,
    HookRegistry,
    IdempotencyKeyReuseError,
    Repository,
    TransientError,
    pipeline,
    resolve_conflicts,
    timeout,
)

MERGE_TOKENS = ConflictConfig(policy=ConflictResolutionPolicy.MERGE, append_lists=True)


class Ledger(Aggregate, kw_only=True):
    tokens: list[str] = msgspec.field(default_factory=list)


class Append(Command[int]):
    """Append `token`: the whole ledger as its sender wants it, and the version it read."""

    ledger_id: str
    token: str
    expected_version: int
    tokens: list[str]

    def state(self) -> Ledger:
        """The ledger this command writes, at the version it read."""
        return Ledger(id=self.ledger_id, version=self.expected_version, tokens=self.tokens)


def ledger_handler(
    repository: Repository[Ledger],
    *,
    hooks: HookRegistry | None = None,
    timeout_s: float | None = None,
    clock: Clock | None = None,
    before_write: Callable[[int], Awaitable[None]] | None = None,
) -> Callable[[Append], Awaitable[int]]:
    """A command handler that writes the command's ledger and, on a conflict, merges its
    tokens into the latest state (`resolve_conflicts`, MERGE) and writes again; with
    `timeout_s`, inside a `timeout()` on `clock`. `before_write(n)` runs before its n-th
    write (1: the first attempt, 2: the first resolution, ...). Returns the stored version."""
    calls = itertools.count(1)

    async def process(command: Append) -> int:
        if before_write is not None:
            await before_write(next(calls))
        return (await repository.persist(command.state())).version

    async def latest(command: Append) -> dict[str, Any]:
        [read] = await repository.retrieve([command.ledger_id])
        return read.to_dict()

    def incoming(command: Append) -> dict[str, Any]:
        return {"tokens": command.tokens}

    def rebuilt(command: Append, merged: dict[str, Any]) -> Append:
        return msgspec.structs.replace(
            command, expected_version=merged["version"], tokens=merged["tokens"]
        )

    resolve = resolve_conflicts(latest, incoming, rebuilt, config=MERGE_TOKENS, hooks=hooks)
    if timeout_s is None:
        return resolve(process)
    return pipeline(timeout(timeout_s, clock=clock), resolve)(process)


def outcome_of(error: BaseException | None) -> str:
    """What a write's answer tells about it: "acked", "refused" (a conflict, a reused id:
    nothing written) or "unknown" (cancelled, timed out, a transient error). An error no
    caller should ever see is raised again."""
    if error is None:
        return "acked"
    if isinstance(error, ConcurrencyError | IdempotencyKeyReuseError):
        return "refused"
    if isinstance(error, TransientError | TimeoutError | asyncio.CancelledError):
        return "unknown"
    raise error


_RANK = {"in flight": 0, "refused": 1, "unknown": 2, "acked": 3}


@dataclass
class LedgerModel:
    """What the store told us about one ledger's writes: token -> its outcome."""

    status: dict[str, str] = field(default_factory=dict)

    def sent(self, token: str) -> None:
        self.status.setdefault(token, "in flight")

    def settle(self, token: str, outcome: str) -> None:
        """A later answer never takes back an earlier one: a write once acknowledged, or
        whose outcome was lost, may be there whatever a resend answers."""
        if _RANK[outcome] > _RANK[self.status.get(token, "in flight")]:
            self.status[token] = outcome

    def check(self, ledger: Ledger, where: str) -> None:
        """`ledger`, as read `where`, holds every acknowledged token once, no token of a
        refused write, and is at the version its tokens say."""
        held = Counter(ledger.tokens)
        doubled = sorted(t for t, n in held.items() if n > 1)
        assert not doubled, f"{where}: {ledger.id} holds {doubled} more than once"
        acked = {t for t, s in self.status.items() if s == "acked"}
        missing = sorted(acked - held.keys())
        assert not missing, (
            f"{where}: acknowledged writes {missing} are missing from {ledger.id}"
            f" (version {ledger.version}: {ledger.tokens})"
        )
        refused = sorted(t for t in held if self.status.get(t, "refused") == "refused")
        assert not refused, f"{where}: {ledger.id} holds writes that were refused: {refused}"
        assert ledger.version == 1 + len(ledger.tokens), (
            f"{where}: {ledger.id} is at version {ledger.version} with {len(ledger.tokens)} tokens"
        )

    @staticmethod
    def check_history(ledger_id: str, versions: list[Ledger | None]) -> None:
        """Every version is kept, and each is the one before plus one token."""
        before: list[str] = []
        for number, version in enumerate(versions, start=1):
            assert version is not None, f"{ledger_id} lost version {number}"
            assert version.version == number, f"{ledger_id} version {number} says {version}"
            grew = len(version.tokens) == len(before) + (number > 1)
            assert grew and version.tokens[: len(before)] == before, (
                f"{ledger_id} version {number} is not version {number - 1} plus one token"
                f" ({before} then {version.tokens})"
            )
            before = version.tokens
