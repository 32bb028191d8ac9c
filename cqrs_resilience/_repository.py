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

import threading
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, NamedTuple, Protocol

from ._aggregate import A, Aggregate
from ._clock import SYSTEM_CLOCK, Clock
from ._codec import DEFAULT_MAX_STATE_BYTES, AggregateCodec
from ._errors import ConcurrencyError, VersionPrunedError
from ._idempotency import WriteKey, claim_of, is_repeat, write_failed, write_key
from ._messages import check_command_id, require_command_id
from ._response_store import RecordedResponse, kept_until, replaceable
from ._retention import DEFAULT_KEEP_COMMANDS_S, DEFAULT_KEEP_VERSIONS, Retention
from ._turns import PROCESS_TURNS

__all__ = [
    "A",
    "Aggregate",
    "InMemoryRepository",
    "Outcome",
    "Repository",
    "ids_asked",
    "lookup_possible",
]


def ids_asked(ids: Sequence[str]) -> list[str]:
    """`retrieve`'s ids as a list; a bare string would otherwise be read as one id per letter."""
    if isinstance(ids, str):
        raise TypeError(f"retrieve takes a sequence of ids; for one id write retrieve([{ids!r}])")
    return list(ids)


class Repository(Protocol[A]):
    """What the behaviors, examples and demo need of a store."""

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
    codec: AggregateCodec[A],
    aggregate: A,
    command_id: str | None,
    write: WriteFn,
    *,
    turns: Any = None,
    yields: bool = False,
) -> A:
    """The write path every store shares: check the state, key the write, run the store's
    `write(key, encoded, write_key)`, and turn its outcome into a result or an error.

    A `ConcurrencyError` carries `turns` (the store), which resolution rounds take turns
    through. `yields` (a resolution round of this process holds the aggregate) makes it the
    outcome at once: the round will write a newer version, so encoding and checking a state
    bound to lose would be wasted; the round that follows checks the state it writes.
    A `command_id` that breaks the command-id rule is a `ConfigurationError` before all that."""
    if command_id is not None:
        require_command_id(command_id)
    if yields:
        raise _conflict(aggregate, aggregate.version, turns)
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
    raise _conflict(aggregate, outcome.version, turns)


def lookup_possible(codec: AggregateCodec[Any], command_id: object, aggregate_id: object) -> bool:
    """Whether `was_processed(command_id, aggregate_id)` must ask the store: an id no write
    could be recorded under never was (False, as `retrieve` finds no such aggregate id), and
    never reaches a driver, which may fail on it. A command id that is no string at all is
    the `ConfigurationError` every door gives (an aggregate id, `retrieve`'s `TypeError`)."""
    if not isinstance(command_id, str):
        require_command_id(command_id)
    return codec.storable_id(aggregate_id) and check_command_id(command_id) is None


def _conflict(aggregate: Aggregate, actual: int, turns: Any) -> ConcurrencyError:
    error = ConcurrencyError(
        aggregate_id=aggregate.id, expected_version=aggregate.version, actual_version=actual
    )
    error.turns = turns  # its message says when another writer's resolution held it
    return error


class InMemoryRepository(Repository[A]):
    """A process-local store with the full contract; for tests, examples and prototypes.

    Any number of event loops and threads may use it. States are kept encoded, as the durable
    stores keep them, so what reads back is exactly what a durable store would give;
    `keep_versions`, `keep_commands_s` and `clock` (whose `time()` stamps idempotency records)
    work as on the durable stores.
    """

    def __init__(
        self,
        aggregate_type: type[A],
        *,
        max_state_bytes: int = DEFAULT_MAX_STATE_BYTES,
        keep_versions: int | None = DEFAULT_KEEP_VERSIONS,
        keep_commands_s: float | None = DEFAULT_KEEP_COMMANDS_S,
        clock: Clock | None = None,
    ) -> None:
        self._codec = AggregateCodec(aggregate_type, max_state_bytes=max_state_bytes)
        self.aggregate_type = aggregate_type
        self.retention = Retention(keep_versions, keep_commands_s)
        self.clock = clock or SYSTEM_CLOCK
        self._latest: dict[str, int] = {}
        self._states: dict[tuple[str, int], bytes] = {}
        self._command_keys: dict[str, tuple[bytes, float]] = {}
        self._writes: dict[tuple[str, str, int], tuple[bytes, int, float]] = {}
        self._responses: dict[str, RecordedResponse] = {}
        self._lock = threading.Lock()  # writes and reads from any loop or thread
        self.max_state_bytes = max_state_bytes

    async def retrieve(self, ids: Sequence[str], uow: Any = None) -> list[A]:
        rows = []
        wanted = [i for i in ids_asked(ids) if self._codec.storable_id(i)]
        with self._lock:
            for aggregate_id in wanted:
                if aggregate_id in self._latest:
                    latest = self._latest[aggregate_id]
                    rows.append((aggregate_id, latest, self._states[(aggregate_id, latest)]))
        return [self._codec.decode(state, i, version) for i, version, state in rows]

    async def retrieve_version(self, aggregate_id: str, version: int) -> A | None:
        if not self._codec.storable_version(version) or not self._codec.storable_id(aggregate_id):
            return None
        with self._lock:
            state = self._states.get((aggregate_id, version))
            latest = self._latest.get(aggregate_id, 0)
        if state is not None:
            return self._codec.decode(state, aggregate_id, version)
        if 0 < version <= latest:
            raise VersionPrunedError(aggregate_id, version, self.retention.oldest_kept(latest))
        return None

    async def persist(self, aggregate: A, uow: Any = None, *, command_id: str | None = None) -> A:
        async def write(key: str, encoded: bytes, recorded: WriteKey | None) -> Outcome:
            with self._lock:
                return self._write(aggregate.id, aggregate.version, encoded, recorded)

        return await persist_checked(self._codec, aggregate, command_id, write, turns=self)

    def turn(self, aggregate_id: Any) -> AbstractAsyncContextManager[Any]:
        """Hold `aggregate_id` while a conflict on it is resolved: resolution attempts run one
        at a time (within this process, all there is)."""
        return PROCESS_TURNS.turn((id(self), aggregate_id))

    def _write(
        self, aggregate_id: str, expected: int, encoded: bytes, recorded: WriteKey | None
    ) -> Outcome:
        latest = self._latest.get(aggregate_id, 0)
        now = self.clock.time()
        if recorded is not None:
            first = self._writes.get((recorded.command_id, aggregate_id, recorded.seq))
            known = self._command_keys.get(recorded.command_id)
            if is_repeat(recorded, aggregate_id, known and known[0], first[0] if first else None):
                assert first is not None
                version = first[1] if (aggregate_id, first[1]) in self._states else latest
                self._claim(recorded, now)
                return Outcome("repeat", version, self._states[(aggregate_id, version)])
        if latest != expected:
            return Outcome("conflict", latest)
        version = self._latest[aggregate_id] = expected + 1
        self._states[(aggregate_id, version)] = encoded
        self._states.pop((aggregate_id, self.retention.oldest_kept(version) - 1), None)
        if recorded is not None:
            self._writes[(recorded.command_id, aggregate_id, recorded.seq)] = (
                recorded.fingerprint,
                version,
                now,
            )
            if recorded.whole_command:
                self._command_keys.setdefault(recorded.command_id, (recorded.fingerprint, now))
            self._claim(recorded, now)
        self._prune_records(now)
        return Outcome("stored", version)

    def _claim(self, recorded: WriteKey, now: float) -> None:
        """A write of a command `idempotent()` runs claims its response (see `Claim`)."""
        claim = claim_of(recorded, self)
        if claim is not None and replaceable(self._responses.get(recorded.command_id), now):
            row = RecordedResponse(recorded.fingerprint, None, claim.owner, now + claim.lease_s)
            self._responses[recorded.command_id] = row

    async def recorded_response(self, command_id: str) -> RecordedResponse | None:
        """The response recorded for `command_id`, or its live claim, or None."""
        require_command_id(command_id)
        now = self.clock.time()
        with self._lock:
            row = self._responses.get(command_id)
        if row is None or (row.expires_at is not None and row.expires_at <= now):
            return None
        return row

    async def record_response(
        self, command_id: str, fingerprint: bytes, response: bytes, keep_s: float | None
    ) -> RecordedResponse:
        """Record `response` unless one is recorded; the one recorded (this, or the first)."""
        require_command_id(command_id)
        now = self.clock.time()
        until = kept_until(now, keep_s, self.retention.keep_commands_s)
        with self._lock:
            row = self._responses.get(command_id)
            if replaceable(row, now):
                row = self._responses[command_id] = RecordedResponse(
                    fingerprint, response, None, until
                )
        assert row is not None
        return row

    async def release_claim(self, command_id: str, owner: str) -> None:
        """Drop `owner`'s claim on the response of `command_id`, if it still holds it."""
        with self._lock:
            row = self._responses.get(command_id)
            if row is not None and row.response is None and row.owner == owner:
                del self._responses[command_id]

    def _prune_records(self, now: float) -> None:
        cutoff = self.retention.records_cutoff(now)
        if cutoff is None:
            return
        for write, (_, _, at) in list(self._writes.items()):
            if at < cutoff:
                del self._writes[write]
        for command_id, (_, at) in list(self._command_keys.items()):
            if at < cutoff:
                del self._command_keys[command_id]
        for command_id, row in list(self._responses.items()):
            if row.expires_at is not None and row.expires_at <= now:
                del self._responses[command_id]

    async def was_processed(self, command_id: str, aggregate_id: str) -> bool:
        """Whether `command_id` already wrote `aggregate_id` (and its record is still kept)."""
        if not lookup_possible(self._codec, command_id, aggregate_id):
            return False
        with self._lock:
            return any(c == command_id and a == aggregate_id for c, a, _ in self._writes)
