"""What every store keeps for `idempotent()`: the first response of a command, or a claim on
it while the command runs; a model-based test against each store."""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cqrs_resilience import (
    Aggregate,
    Command,
    FakeClock,
    IdempotencyKeyReuseError,
    InMemoryRepository,
    command_scope,
)
from cqrs_resilience._idempotency import CURRENT, Claim
from cqrs_resilience._response_store import RecordedResponse, ResponseStore
from cqrs_resilience.stores import PostgresRepository, SQLiteRepository

KEEP_S = 10.0
LEASE_S = 3.0


_EXAMPLES = itertools.count()


class Note(Aggregate):
    text: str = ""


class Write(Command[None]):
    note: str


class ResponseRows(RuleBasedStateMachine):
    """Commands' writes claim their responses, responses get recorded (the first stays),
    claims get released, and time passes, against one store; what the store answers is what
    the model says: a live response stays until it expires, a claim gives way to a response
    or lapses, a released claim is gone, another owner's claim is not released."""

    kind = "memory"
    target: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock(start=1000.0)
        self.folder = tempfile.TemporaryDirectory()
        self.run_id = next(_EXAMPLES)
        self.store: Any = self._open()
        self.model: dict[str, RecordedResponse] = {}
        self.writes = 0
        # Command ids are the database's, not a namespace's: each example has its own. Not
        # id(self): a finished example's object id is reused, and with it its rows.
        self.ids = [f"example-{self.run_id}-{n}" for n in range(2)]

    def _open(self) -> Any:
        if self.kind == "memory":
            return InMemoryRepository(Note, clock=self.clock)
        if self.kind == "sqlite":
            return SQLiteRepository(Path(self.folder.name) / "db", Note, clock=self.clock)
        namespace = f"n{self.run_id}"
        return PostgresRepository(self.target, Note, namespace=namespace, clock=self.clock)

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, 20))

    def _live(self, command_id: str) -> RecordedResponse | None:
        row = self.model.get(command_id)
        now = self.clock.time()
        if row is None or (row.expires_at is not None and row.expires_at <= now):
            return None
        return row

    @rule(which=st.sampled_from([0, 1]), owner=st.sampled_from(["a", "b"]), same=st.booleans())
    def write_claims(self, which: int, owner: str, same: bool) -> None:
        """A write of a command `idempotent()` runs claims its response (unless a live one
        is recorded), for LEASE_S."""
        self.writes += 1
        command_id = self.ids[which]
        command = Write(command_id=command_id, note=f"{command_id}-{'same' if same else 'x'}")

        async def write() -> None:
            with command_scope(command):
                scope = CURRENT.get()
                assert scope is not None
                scope.claim = Claim(self.store, owner, LEASE_S)
                await self.store.persist(Note(id=f"note-{self.writes}"))

        try:
            self.run(write())
        except IdempotencyKeyReuseError:  # another command under the id: nothing claimed
            return
        fingerprint = self._fingerprint(command)
        live = self._live(command_id)
        if live is None or live.response is None:
            self.model[command_id] = RecordedResponse(
                fingerprint, None, owner, self.clock.time() + LEASE_S
            )

    def _fingerprint(self, command: Write) -> bytes:
        with command_scope(command):
            scope = CURRENT.get()
            assert scope is not None
            return scope.fingerprint()

    @rule(which=st.sampled_from([0, 1]), response=st.binary(min_size=1, max_size=8))
    def record(self, which: int, response: bytes) -> None:
        """The first response stays: a later one gets the first back."""
        command_id = self.ids[which]
        fingerprint = b"f-" + command_id.encode()
        kept = self.run(self.store.record_response(command_id, fingerprint, response, KEEP_S))
        live = self._live(command_id)
        if live is None or live.response is None:
            self.model[command_id] = RecordedResponse(
                fingerprint, response, None, self.clock.time() + KEEP_S
            )
        expected = self.model[command_id]
        assert (kept.fingerprint, kept.response) == (expected.fingerprint, expected.response)

    @rule(which=st.sampled_from([0, 1]), owner=st.sampled_from(["a", "b"]))
    def release(self, which: int, owner: str) -> None:
        """Only the owner's live claim goes; a response never does."""
        command_id = self.ids[which]
        self.run(self.store.release_claim(command_id, owner))
        row = self.model.get(command_id)
        if row is not None and row.response is None and row.owner == owner:
            del self.model[command_id]

    @rule(seconds=st.sampled_from([1.0, 2.5, 4.0, 11.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def the_store_answers_what_the_model_says(self) -> None:
        for command_id in self.ids:
            found = self.run(self.store.recorded_response(command_id))
            expected = self._live(command_id)
            if expected is None:
                assert found is None, (command_id, found)
            else:
                assert found is not None, command_id
                assert (found.fingerprint, found.response, found.owner) == (
                    expected.fingerprint,
                    expected.response,
                    expected.owner,
                )
                assert isinstance(self.store, ResponseStore)

    def teardown(self) -> None:
        try:
            close = getattr(self.store, "close", None)
            if close is not None:
                self.run(close())
        finally:
            self.loop.close()
            self.folder.cleanup()


SETTINGS = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


class InMemoryRows(ResponseRows):
    kind = "memory"


class SQLiteRows(ResponseRows):
    kind = "sqlite"


TestInMemoryRows = InMemoryRows.TestCase
TestInMemoryRows.settings = SETTINGS
TestSQLiteRows = SQLiteRows.TestCase
TestSQLiteRows.settings = SETTINGS


@pytest.mark.postgres
def test_postgres_rows(pg_database: str) -> None:
    """The same model against PostgreSQL."""
    from hypothesis.stateful import run_state_machine_as_test

    class PostgresRows(ResponseRows):
        kind = "postgres"
        target = pg_database

    run_state_machine_as_test(PostgresRows, settings=SETTINGS)
