"""The repository contract every store keeps, the write path they share, and an in-memory store.

The contract: `persist` writes only if the stored version still equals the aggregate's
`version` (the version it was read at; 0 for a new aggregate) and stores it as version + 1,
atomically; otherwise it raises `ConcurrencyError`. It refuses a state it could not read back
(`InvalidStateError`), before touching anything. The command being processed (or an explicit
`command_id`) is recorded with the write: a repeat gets the first outcome instead of writing
again, a different command under a used id gets `IdempotencyKeyReuseError`. Every version's
state is kept, so a three-way merge can ask for its base.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, NamedTuple, Protocol

from ._aggregate import A, Aggregate
from ._codec import DEFAULT_MAX_STATE_BYTES, AggregateCodec
from ._errors import ConcurrencyError
from ._idempotency import WriteKey, is_repeat, write_failed, write_key

__all__ = ["A", "Aggregate", "InMemoryRepository", "Outcome", "Repository", "ids_asked"]


def ids_asked(ids: Sequence[str]) -> list[str]:
    """`retrieve`'s ids as a list; a bare string would otherwise be read as one id per letter."""
    if isinstance(ids, str):
        raise TypeError(f"retrieve takes a sequence of ids; for one id write retrieve([{ids!r}])")
    return list(ids)


class Repository(Protocol[A]):
    """What the behaviours, examples and demo need of a store."""

    async def retrieve(self, ids: Sequence[str], uow: Any = None) -> list[A]:
        """The latest state of each id that exists, in the order asked."""
        ...

    async def persist(self, aggregate: A, uow: Any = None, *, command_id: str | None = None) -> A:
        """Write `aggregate` as version + 1 if nobody wrote since it was read; return it stored."""
        ...

    async def retrieve_version(self, aggregate_id: str, version: int) -> A | None:
        """The state `aggregate_id` had at `version`, for three-way merges."""
        ...


class Outcome(NamedTuple):
    """What one store write did: stored it, found it a repeat, or lost the version race."""

    kind: Literal["stored", "repeat", "conflict"]
    version: int  # stored: the new version; repeat: the first outcome's; conflict: the latest
    state: bytes | None = None  # repeat: the first outcome's encoded state


WriteFn = Callable[[str, bytes, "WriteKey | None"], Awaitable[Outcome]]


async def persist_checked(
    codec: AggregateCodec[A], aggregate: A, command_id: str | None, write: WriteFn
) -> A:
    """The write path every store shares: check the state, key the write, run the store's
    `write(key, encoded, write_key)`, and turn its outcome into a result or an error."""
    stored, encoded = codec.next_version(aggregate)
    key = codec.key(aggregate.id)
    recorded = write_key(command_id, key, encoded)
    try:
        outcome = await write(key, encoded, recorded)
    except BaseException:
        write_failed(recorded, key)
        raise
    if outcome.kind == "stored":
        return stored
    if outcome.kind == "repeat":
        return codec.decode(outcome.state, aggregate.id, outcome.version)
    write_failed(recorded, key)
    raise ConcurrencyError(
        aggregate_id=aggregate.id,
        expected_version=aggregate.version,
        actual_version=outcome.version,
    )


class InMemoryRepository(Repository[A]):
    """A process-local store with the full contract; for tests, examples and prototypes.

    States are kept encoded, as the durable stores keep them, so what reads back is exactly
    what a durable store would give.
    """

    def __init__(
        self, aggregate_type: type[A], *, max_state_bytes: int = DEFAULT_MAX_STATE_BYTES
    ) -> None:
        self._codec = AggregateCodec(aggregate_type, max_state_bytes=max_state_bytes)
        self.aggregate_type = aggregate_type
        self._history: dict[str, list[bytes]] = {}
        self._command_keys: dict[str, bytes] = {}
        self._writes: dict[tuple[str, str, int], tuple[bytes, int]] = {}
        self._processed: set[tuple[str, str]] = set()
        self._lock = asyncio.Lock()

    async def retrieve(self, ids: Sequence[str], uow: Any = None) -> list[A]:
        found = []
        for aggregate_id in ids_asked(ids):
            if self._codec.storable_id(aggregate_id) and aggregate_id in self._history:
                history = self._history[aggregate_id]
                found.append(self._codec.decode(history[-1], aggregate_id, len(history)))
        return found

    async def retrieve_version(self, aggregate_id: str, version: int) -> A | None:
        if not self._codec.storable_id(aggregate_id):
            return None
        history = self._history.get(aggregate_id, [])
        if isinstance(version, bool) or not isinstance(version, int):
            raise TypeError(f"version must be an int, got {version!r}")
        if not 0 < version <= len(history):
            return None
        return self._codec.decode(history[version - 1], aggregate_id, version)

    async def persist(self, aggregate: A, uow: Any = None, *, command_id: str | None = None) -> A:
        async def write(key: str, encoded: bytes, recorded: WriteKey | None) -> Outcome:
            async with self._lock:
                return self._write(aggregate.id, aggregate.version, encoded, recorded)

        return await persist_checked(self._codec, aggregate, command_id, write)

    def _write(
        self, aggregate_id: str, expected: int, encoded: bytes, recorded: WriteKey | None
    ) -> Outcome:
        history = self._history.get(aggregate_id, [])
        if recorded is not None:
            first = self._writes.get((recorded.command_id, aggregate_id, recorded.seq))
            command_fingerprint = self._command_keys.get(recorded.command_id)
            if is_repeat(recorded, aggregate_id, command_fingerprint, first[0] if first else None):
                assert first is not None
                return Outcome("repeat", first[1], history[first[1] - 1])
        if len(history) != expected:
            return Outcome("conflict", len(history))
        history.append(encoded)
        self._history[aggregate_id] = history
        if recorded is not None:
            self._writes[(recorded.command_id, aggregate_id, recorded.seq)] = (
                recorded.fingerprint,
                len(history),
            )
            self._processed.add((recorded.command_id, aggregate_id))
            if recorded.whole_command:
                self._command_keys.setdefault(recorded.command_id, recorded.fingerprint)
        return Outcome("stored", len(history))

    async def was_processed(self, command_id: str, aggregate_id: str) -> bool:
        """Whether `command_id` already wrote `aggregate_id`."""
        return (command_id, aggregate_id) in self._processed
