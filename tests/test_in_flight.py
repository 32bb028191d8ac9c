"""Sends of one command in flight together in one process: a model-based test of
`idempotent()` and the registry behind it (`_in_flight`)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cqrs_resilience import (
    Aggregate,
    Command,
    CommandInProgressError,
    FakeClock,
    IdempotencyKeyReuseError,
    InMemoryRepository,
    TransientError,
    idempotent,
)
from cqrs_resilience._in_flight import IN_FLIGHT


class Tally(Aggregate, kw_only=True):
    marks: list[str] = msgspec.field(default_factory=list)


class Mark(Command[None]):
    mark: str


COMMANDS = [Mark(command_id=f"command-{n}", mark=f"mark-{n}") for n in range(3)]


class SendsModel(RuleBasedStateMachine):
    """Sends of three commands (and of a different command under one of their ids) started,
    held inside the wrapped function, let go, made to fail, and cancelled at any moment,
    with the event loop stepped one iteration at a time. What must hold:

    - a command's function never runs twice at once, and its mark is stored at most once;
    - every send that returned got the same response as every other send of its command;
    - a send ends as the contract says: the response, the error of the send it waited for,
      `IdempotencyKeyReuseError` (another command under the id), `CommandInProgressError`
      (waited longer than `wait_s`), or cancelled when it was cancelled;
    - once everything is let go and settled, no send is left waiting, nothing is in flight.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock(autojump=False)
        self.store = InMemoryRepository(Tally, clock=self.clock)
        self.running: dict[str, int] = {}  # command id -> runs of its function under way
        self.gates: dict[str, asyncio.Event] = {}  # command id -> the gate its run waits at
        self.failing: set[str] = set()
        self.sends: list[tuple[asyncio.Task[Any], str, bool]] = []  # (task, id, the same?)
        self.cancelled: set[int] = set()
        self.responses: dict[str, Any] = {}
        self.winners: dict[str, bool] = {}  # command id -> the command whose response counts
        store = self.store

        @idempotent(store, wait_s=5.0)
        async def mark(command: Mark) -> list[str]:
            command_id = command.command_id
            self.running[command_id] = self.running.get(command_id, 0) + 1
            assert self.running[command_id] == 1, "a command's function ran twice at once"
            try:
                found = await store.retrieve(["tally"])
                tally = found[0] if found else Tally(id="tally")
                stored = await store.persist(
                    msgspec.structs.replace(tally, marks=[*tally.marks, command.mark])
                )
                gate = self.gates.setdefault(command_id, asyncio.Event())
                await gate.wait()
                if command_id in self.failing:
                    raise TransientError(f"{command_id} failed")
                return list(stored.marks)
            finally:
                self.running[command_id] -= 1

        self.mark = mark

    @rule(which=st.integers(0, 2), same=st.booleans())
    def send(self, which: int, same: bool) -> None:
        """Send a command again (`same`), or a different command under its id."""
        command = COMMANDS[which]
        if not same:
            command = Mark(command_id=command.command_id, mark=f"other-{which}")
        task = self.loop.create_task(self.mark(command))
        self.sends.append((task, command.command_id, same))

    @rule(which=st.integers(0, 2), fail=st.booleans())
    def let_go(self, which: int, fail: bool) -> None:
        """The run of a command in its function goes on: to a response, or to an error."""
        command_id = COMMANDS[which].command_id
        if fail:
            self.failing.add(command_id)
        else:
            self.failing.discard(command_id)
        self.gates.setdefault(command_id, asyncio.Event()).set()
        self.gates[command_id] = asyncio.Event()  # the next run waits again

    @precondition(lambda self: any(not task.done() for task, _, _ in self.sends))
    @rule(pick=st.integers(0, 99))
    def cancel(self, pick: int) -> None:
        live = [n for n, (task, _, _) in enumerate(self.sends) if not task.done()]
        n = live[pick % len(live)]
        self.sends[n][0].cancel()
        self.cancelled.add(n)

    @rule()
    def step(self) -> None:
        """One iteration of the event loop."""
        self.loop.call_soon(self.loop.stop)
        self.loop.run_forever()

    @rule(seconds=st.sampled_from([1.0, 6.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def every_send_ended_as_the_contract_says(self) -> None:
        for n, (task, command_id, same) in enumerate(self.sends):
            if not task.done():
                continue
            if task.cancelled():
                assert n in self.cancelled, "a send was cancelled that nobody cancelled"
                continue
            error = task.exception()
            if error is None:
                winner = self.winners.setdefault(command_id, same)
                assert same == winner, "two commands under one id both got responses"
                response = task.result()
                first = self.responses.setdefault(command_id, response)
                assert response == first, "two sends of one command got different responses"
            else:
                assert isinstance(
                    error, TransientError | IdempotencyKeyReuseError | CommandInProgressError
                ), repr(error)

    @invariant()
    def every_mark_is_stored_at_most_once(self) -> None:
        version = self.store._latest.get("tally")  # read without running the loop
        if version is not None:
            marks = msgspec.msgpack.decode(self.store._states[("tally", version)], type=Tally)
            assert len(marks.marks) == len(set(marks.marks)), marks.marks

    def teardown(self) -> None:
        try:
            for gate in list(self.gates.values()):
                gate.set()
            self.failing.clear()
            for _ in range(3):  # let every run end; sends waiting for one then end too
                for gate in list(self.gates.values()):
                    gate.set()
                self.clock.advance(10)
                for _ in range(50):
                    self.step()
            stuck = [command_id for task, command_id, _ in self.sends if not task.done()]
            assert stuck == [], f"sends of {stuck} never ended"
            assert len(IN_FLIGHT) == 0, "a command was left in flight"
            self.every_send_ended_as_the_contract_says()
        finally:
            for task, _, _ in self.sends:
                task.cancel()

            async def drain() -> None:
                await asyncio.gather(*(t for t, _, _ in self.sends), return_exceptions=True)

            self.loop.run_until_complete(drain())
            self.loop.close()


TestSendsModel = SendsModel.TestCase
TestSendsModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
