"""Aggregates and the repository contract every store keeps, with an in-memory store.

The contract: `persist` writes only if the stored version still equals the aggregate's
`version` (the version it was read at; 0 for a new aggregate) and stores it as version + 1,
atomically; otherwise it raises `ConcurrencyError`. A command id, given or taken from the
current command, is recorded with the write, and a repeat returns the first outcome instead
of writing again. Every version's state is kept, so a three-way merge can ask for its base.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import msgspec

from ._errors import ConcurrencyError
from ._idempotency import current_command_id


def ids_asked(ids: Sequence[str]) -> list[str]:
    """`retrieve`'s ids as a list; a bare string would otherwise be read as one id per letter."""
    if isinstance(ids, str):
        raise TypeError(f"retrieve takes a sequence of ids; for one id write retrieve([{ids!r}])")
    return list(ids)


class Aggregate(msgspec.Struct, kw_only=True):
    """Base for aggregates: an `id` and the `version` it was read at (0 = never stored)."""

    id: str
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The aggregate's state as plain data, the form merges work on."""
        state: dict[str, Any] = msgspec.to_builtins(self)
        return state


A = TypeVar("A", bound=Aggregate)


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


class InMemoryRepository(Repository[A]):
    """A process-local store with the full contract; for tests, examples and prototypes."""

    def __init__(self, aggregate_type: type[A]) -> None:
        self.aggregate_type = aggregate_type
        self._history: dict[str, list[bytes]] = {}
        self._outcomes: dict[tuple[str, str], int] = {}
        self._lock = asyncio.Lock()

    def _decode(self, raw: bytes) -> A:
        return msgspec.msgpack.decode(raw, type=self.aggregate_type)

    async def retrieve(self, ids: Sequence[str], uow: Any = None) -> list[A]:
        return [self._decode(self._history[i][-1]) for i in ids_asked(ids) if i in self._history]

    async def retrieve_version(self, aggregate_id: str, version: int) -> A | None:
        history = self._history.get(aggregate_id, [])
        return self._decode(history[version - 1]) if 0 < version <= len(history) else None

    async def persist(self, aggregate: A, uow: Any = None, *, command_id: str | None = None) -> A:
        command_id = command_id or current_command_id.get()
        async with self._lock:
            history = self._history.setdefault(aggregate.id, [])
            if command_id is not None:
                done = self._outcomes.get((command_id, aggregate.id))
                if done is not None:
                    return self._decode(history[done - 1])
            if len(history) != aggregate.version:
                if not history:
                    del self._history[aggregate.id]
                raise ConcurrencyError(
                    aggregate_id=aggregate.id,
                    expected_version=aggregate.version,
                    actual_version=len(history),
                )
            stored = msgspec.structs.replace(aggregate, version=aggregate.version + 1)
            history.append(msgspec.msgpack.encode(stored))
            if command_id is not None:
                self._outcomes[(command_id, aggregate.id)] = stored.version
            return stored

    async def was_processed(self, command_id: str, aggregate_id: str) -> bool:
        """Whether `command_id` already wrote `aggregate_id`."""
        return (command_id, aggregate_id) in self._outcomes
