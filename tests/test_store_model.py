"""A model of each durable store under concurrency: whatever happens, no write is lost or doubled.

Hypothesis (`hypothesis.stateful`) drives a SQLite file and a PostgreSQL schema through random
sequences of what an application and its neighbours do, and checks every answer against a
model of what the store promised. Two ledgers start empty; every command appends one new token
to the ledger it read (`tests/ledgers.py`), so a ledger shows exactly which writes landed.

What happens (the rules):
- append: read a ledger, append a token, persist under a new command id (in the command's
  `command_scope`, or through a `resolve_conflicts()` handler), or persist at a version older
  than the latest (a conflict: nothing written);
- resend an earlier command, same id: it gets its first answer and is never applied twice;
- reuse an id: a different command under an id already used is an `IdempotencyKeyReuseError`;
- read a ledger, through the application's repository or another process's;
- resolve a conflict: another process writes after the command was read, so its first write
  conflicts and a resolution follows; when drawn, the other process wins the race once more
  (between the resolution's read and its write), and takes the database's write lock for a
  while as a conflict is detected;
- interrupt a conflict resolution: the same, cancelled or timed out (`timeout()` on a fake
  clock) a drawn number of event-loop steps after it started or after its first or second
  conflict, while, when drawn, another process holds the write lock from that point until
  the interruption;
- cancel an append a drawn number of event-loop steps after it started;
- another process takes the write lock for 50 or 250 ms, or lets go of it;
- append through the application's repository from a second event loop in another thread,
  or from a fresh event loop closed afterwards (and, in the "two loops at once" tests, from
  the application's loop and a second loop at the same time);
- close a repository and open a new one on the same database, first read from the
  application's loop or from a fresh loop closed afterwards.

What must hold (the invariants):
- every acknowledged write is there, exactly once, in every read that follows it, through
  any repository, after closing and reopening too; a write whose outcome the caller never
  learned (cancelled, timed out, a transient error) is there at most once; a refused write
  (a conflict, a reused id) is not there;
- a ledger's version is one more than its number of tokens, and every version is kept and is
  the one before plus one token (contiguous: nothing was overwritten);
- no call takes longer than `BOUND_S` (no wait hangs), and only the errors a caller is told
  to expect come out;
- at the end, once the other process let go of the lock, a new write through the very
  repository the application used all along is acknowledged and seen by a new repository,
  and so is a write through the other process's: no repository is left unusable.

Interruptions land on the same await every time an example runs (see `Interruption`), and a
failing step ends the example's work (see `step`): Hypothesis can then replay and shrink a
failure. A failure that depends on thread timing all the same (two loops racing) is reported
as flaky, with the example that showed it.

Budget: `MODEL_EXAMPLES` (25) examples of up to `MODEL_STEPS` (25) steps per store, and half
as many examples, not shrunk, for the two-loops tests: about 40 s for all four on a working
store. In CI (`CI=true`) the same examples every run, and no example database. For a longer
run, set `CQRS_RESILIENCE_MODEL_EXAMPLES=500` (and `CQRS_RESILIENCE_MODEL_STEPS=40`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cqrs_resilience import (
    CONFLICT_DETECTED,
    ConcurrencyError,
    FakeClock,
    HookRegistry,
    IdempotencyKeyReuseError,
    TransientError,
    command_scope,
)
from cqrs_resilience.stores import PostgresRepository, SQLiteRepository
from tests.conftest_stores import in_ci
from tests.ledgers import Append, Ledger, LedgerModel, ledger_handler, outcome_of
from tests.loops_and_locks import (
    Interruption,
    LoopThread,
    WriteLockHolder,
    run_on_fresh_loop,
    run_together,
)

MODEL_EXAMPLES = int(os.environ.get("CQRS_RESILIENCE_MODEL_EXAMPLES", "25"))
MODEL_STEPS = int(os.environ.get("CQRS_RESILIENCE_MODEL_STEPS", "25"))
BOUND_S = 3.0
"""The longest any one call may take; the slowest legitimate wait here is under 1 s."""
BUSY_TIMEOUT_S = 0.2  # SQLite: how long a write waits for another writer's lock
HOLD_MAX_S = 0.5  # the longest another process holds the write lock
PACE_S = 0.01  # one event-loop step while an interruption is due: longer than a SQLite commit
ROUND_TIMEOUT_S = 60.0  # on a fake clock: it fires only when a rule moves the clock
LEDGERS = ("L0", "L1")


@dataclass
class Sent:
    """A command sent, how (persisted in its scope, or through the handler), and its answers."""

    command: Append
    through: str  # "persist" or "handler"
    first: Any = None  # its first acknowledged answer
    last_error: BaseException | None = None

    def __repr__(self) -> str:
        return f"Sent({self.command.token!r}, {self.through!r})"


@dataclass(frozen=True)
class LockElsewhere:
    """Another process takes the write lock at a point of a command ("start", "conflict 1",
    "conflict 2": as the n-th conflict is detected) and holds it `for_s` seconds or, when
    None, until the command is interrupted (or has ended)."""

    at: str
    for_s: float | None


@dataclass(frozen=True)
class Interrupt:
    """Cancel the command, or let its timeout fire, `steps` loop steps after a point."""

    how: str  # "cancel" or "timeout"
    after: str  # "start", "conflict 1" or "conflict 2"
    steps: int


LEDGER_IDS = st.sampled_from(LEDGERS)
LOCKS_A_WHILE = st.none() | st.builds(
    LockElsewhere, st.sampled_from(["conflict 1", "conflict 2"]), st.sampled_from([0.05, 0.25])
)
INTERRUPTS = st.builds(
    Interrupt,
    st.sampled_from(["cancel", "timeout"]),
    st.sampled_from(["conflict 1", "conflict 2", "start"]),
    st.integers(0, 4),
)
WRITES_PER_LOOP = st.lists(LEDGER_IDS, min_size=1, max_size=3)  # the ledgers a loop appends to


@dataclass(frozen=True)
class Places:
    """Where each example's store lives (a new SQLite file, or PostgreSQL schema, per example),
    and how to make sure nothing of it is left connected when the example ends."""

    kind: str
    new_place: Callable[[], str]
    forget: Callable[[str], None] = lambda target: None

    def open(self, target: str) -> Any:
        if self.kind == "sqlite":
            return SQLiteRepository(target, Ledger, busy_timeout=BUSY_TIMEOUT_S, keep_versions=None)
        return PostgresRepository(
            target, Ledger, min_size=1, max_size=4, keep_versions=None, lock_timeout=2.0
        )


def step(method: Callable[..., Any]) -> Callable[..., Any]:
    """A rule. Its failure is kept and raised by teardown, and the steps after it only draw
    their arguments: an example then draws the same data whichever step a timing-dependent
    failure strikes in, so Hypothesis can replay it (and, if it does not fail again, says so
    plainly instead of reporting inconsistent data generation)."""

    @functools.wraps(method)
    def run(self: StoreModel, *args: Any, **kwargs: Any) -> Any:
        if self.failure is not None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self.failure = exc
            return None

    return run


class StoreModel(RuleBasedStateMachine):
    """One example: the application's repository, another process's, and a model of both."""

    sent = Bundle("sent")
    loops_at_once = False  # see StoreModelAcrossLoops

    def __init__(self, places: Places) -> None:
        super().__init__()
        self.places = places
        self.target = places.new_place()
        self.failure: Exception | None = None  # raised by teardown
        self.tokens = itertools.count()
        self.ledgers = {ledger_id: LedgerModel() for ledger_id in LEDGERS}
        self.app = LoopThread("the application's loop")
        self.second_loop: LoopThread | None = None
        self.holder = WriteLockHolder(places.kind, self.target, BOUND_S)
        self.opened: list[Any] = []
        try:
            self.repository = self._open()  # the application's, used all along
            self.other = self._open()  # another process's
            for ledger_id in LEDGERS:
                self._run(self.repository.persist(Ledger(id=ledger_id)), "creating a ledger")
        except BaseException:
            self._clean_up()
            raise

    # --- rules ------------------------------------------------------------------------------

    @rule(target=sent, ledger=LEDGER_IDS, how=st.sampled_from(["persist", "handler", "stale"]))
    @step
    def append(self, ledger: str, how: str) -> Sent:
        """Append a token: persisted in the command's scope, through the handler, or persisted
        at a version older than the latest (a conflict, nothing written)."""
        if how != "stale":
            return self._run(self._append(self.repository, ledger, how), "an append")

        async def stale() -> Sent:
            [read] = await self.repository.retrieve([ledger])
            old = msgspec.structs.replace(read, version=read.version - 1)
            sent = self._new(old, "persist")
            error = await self._send(sent, self.repository)
            assert isinstance(error, ConcurrencyError | TransientError), (
                f"a write of {ledger} at version {old.version} (the latest is {read.version})"
                f" answered {error!r}, not a conflict"
            )
            return sent

        return self._run(stale(), "a stale append")

    @rule(sent=sent)
    @step
    def resend(self, sent: Sent) -> None:
        self._run(self._send(sent, self.repository), "a resend")

    @rule(sent=sent, ledger=LEDGER_IDS)
    @step
    def reuse_id(self, sent: Sent, ledger: str) -> None:
        async def reuse() -> None:
            [read] = await self.repository.retrieve([ledger])
            reused = self._new(read, "persist", command_id=sent.command.command_id)
            error = await self._send(reused, self.repository)
            if self.ledgers[sent.command.ledger_id].status[sent.command.token] == "acked":
                assert isinstance(error, IdempotencyKeyReuseError | TransientError), (
                    f"a different command under the id of {sent} answered {error!r}"
                )

        self._run(reuse(), "a command reusing an id")

    @rule(ledger=LEDGER_IDS, through=st.sampled_from(["application", "other"]))
    @step
    def retrieve(self, ledger: str, through: str) -> None:
        repository = self.repository if through == "application" else self.other
        [read] = self._run(repository.retrieve([ledger]), "a read")
        self.ledgers[ledger].check(read, f"read through the {through} repository")

    @rule(target=sent, ledger=LEDGER_IDS, interloper=st.booleans(), lock=LOCKS_A_WHILE)
    @step
    def resolve_conflict(self, ledger: str, interloper: bool, lock: LockElsewhere | None) -> Sent:
        """A command whose first write conflicts (another process wrote after its read) is
        resolved; with `interloper`, the other process wins the race once more, between the
        resolution's read and its write."""
        return self._run(self._resolve(ledger, interloper, lock, None), "a conflict resolution")

    @rule(
        target=sent,
        ledger=LEDGER_IDS,
        interloper=st.booleans(),
        interrupt=INTERRUPTS,
        locked_till_then=st.booleans(),
    )
    @step
    def interrupt_conflict_resolution(
        self, ledger: str, interloper: bool, interrupt: Interrupt, locked_till_then: bool
    ) -> Sent:
        """The same, cancelled or timed out at a drawn point; with `locked_till_then`, another
        process holds the write lock from that point until the interruption."""
        lock = LockElsewhere(interrupt.after, None) if locked_till_then else None
        resolving = self._resolve(ledger, interloper, lock, interrupt)
        return self._run(resolving, "an interrupted conflict resolution")

    @rule(target=sent, ledger=LEDGER_IDS, steps=st.integers(0, 12))
    @step
    def cancel_append(self, ledger: str, steps: int) -> Sent:
        async def cancelled() -> Sent:
            [read] = await self.repository.retrieve([ledger])
            sent = self._new(read, "persist")
            task = asyncio.ensure_future(self._send(sent, self.repository))
            interruption = Interruption(task.cancel, PACE_S)
            interruption.after(steps)
            await asyncio.wait([task])
            interruption.stop()
            return sent

        return self._run(cancelled(), "a cancelled append")

    @rule(for_s=st.sampled_from([0.0, 0.05, 0.25]))
    @step
    def another_process_locks(self, for_s: float) -> None:
        """Another process takes the write lock for `for_s` seconds (0: lets go of it now)."""
        if for_s:
            self.holder.take(for_s)
        else:
            self.holder.release()

    @rule(target=sent, ledger=LEDGER_IDS, loop=st.sampled_from(["second", "fresh"]))
    @step
    def append_from_another_loop(self, ledger: str, loop: str) -> Sent:
        """Append through the application's repository from a second loop in another thread,
        or from a fresh loop closed afterwards."""
        append = self._append(self.repository, ledger)
        if loop == "fresh":
            return run_on_fresh_loop(append, "an append on a fresh loop", BOUND_S)
        return self._second_loop().run(append, "an append on a second loop", BOUND_S)

    @precondition(lambda self: self.loops_at_once)
    @rule(first=WRITES_PER_LOOP, second=WRITES_PER_LOOP)
    @step
    def append_from_two_loops_at_once(self, first: list[str], second: list[str]) -> None:
        """The application's loop and a second one append through one repository at once."""
        loops = [(self.app, first), (self._second_loop(), second)]
        appends = [
            (loop, self._append(self.repository, ledger))
            for loop, ledgers in loops
            for ledger in ledgers
        ]
        run_together(appends, "appends from two loops at once", BOUND_S)

    @rule(
        which=st.sampled_from(["application", "other"]),
        first_read=st.sampled_from(["application", "fresh"]),
    )
    @step
    def reopen(self, which: str, first_read: str) -> None:
        """Close a repository and open a new one on the same database, first read from the
        application's loop or from a fresh loop closed afterwards."""
        old = self.repository if which == "application" else self.other
        self._run(old.close(), "closing a repository")
        new = self._open()
        if which == "application":
            self.repository = new
        else:
            self.other = new
        reading = new.retrieve(list(LEDGERS))
        if first_read == "fresh":
            reads = run_on_fresh_loop(reading, "a read on a fresh loop", BOUND_S)
        else:
            reads = self._run(reading, "a read")
        for read in reads:
            self.ledgers[read.id].check(read, f"read after reopening the {which} repository")

    # --- after each example -----------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.failure is None:
                self._check_the_end()
        finally:
            self._clean_up()
        if self.failure is not None:
            raise self.failure

    def _check_the_end(self) -> None:
        """The other process lets go of the lock; both repositories still write, for good."""
        self.holder.release()

        async def last_write(repository: Any, ledger: str) -> str:
            for _ in range(3):  # an append cancelled earlier may land after this one's read
                sent = await self._append(repository, ledger)
                status = self.ledgers[ledger].status[sent.command.token]
                if status != "refused":
                    break
            return status if status == "acked" else f"{status}: {sent.last_error!r}"

        for name, repository in (("application", self.repository), ("other", self.other)):
            for ledger in LEDGERS:
                status = self._run(last_write(repository, ledger), "a last write")
                assert status == "acked", (
                    f"after the other process let go of the lock, a write through the {name}"
                    f" repository on {ledger} was not acknowledged ({status})"
                )
            fresh = self._open()
            for read in self._run(fresh.retrieve(list(LEDGERS)), "a read"):
                where = f"read through a new repository after the {name} repository's last writes"
                self.ledgers[read.id].check(read, where)
        for repository in self.opened:
            self._run(repository.close(), "closing a repository")

        async def every_version() -> dict[str, list[Ledger | None]]:
            async with self.places.open(self.target) as reopened:
                return {
                    latest.id: [
                        await reopened.retrieve_version(latest.id, version)
                        for version in range(1, latest.version + 1)
                    ]
                    for latest in await reopened.retrieve(list(LEDGERS))
                }

        for ledger_id, versions in self._run(every_version(), "reading every version").items():
            LedgerModel.check_history(ledger_id, versions)
            latest = versions[-1]
            assert latest is not None
            self.ledgers[ledger_id].check(latest, "read after closing and reopening everything")

    def _clean_up(self) -> None:
        """Nothing is left running: lock holder, repositories, loops (each bounded), and no
        connection to the example's database."""
        self.holder.close()
        for repository in self.opened:
            with contextlib.suppress(Exception):  # maybe failing already
                self.app.run(repository.close(), "closing a repository", 2.0)
        for loop in (self.second_loop, self.app):
            if loop is not None:
                with contextlib.suppress(Exception):
                    loop.close(2.0)
        self.places.forget(self.target)

    # --- how rules talk to the stores -----------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, Any], what: str) -> Any:
        """`coro` on the application's loop, bounded."""
        return self.app.run(coro, what, BOUND_S)

    def _second_loop(self) -> LoopThread:
        if self.second_loop is None:
            self.second_loop = LoopThread("a second loop in another thread")
        return self.second_loop

    def _open(self) -> Any:
        repository = self.places.open(self.target)
        self.opened.append(repository)
        return repository

    def _new(self, read: Ledger, through: str, command_id: str | None = None) -> Sent:
        """A new command appending a new token to `read`."""
        token = f"t{next(self.tokens)}"
        ids = {} if command_id is None else {"command_id": command_id}
        command = Append(
            ledger_id=read.id,
            token=token,
            expected_version=read.version,
            tokens=[*read.tokens, token],
            **ids,
        )
        self.ledgers[read.id].sent(token)
        return Sent(command, through)

    async def _append(self, repository: Any, ledger: str, through: str = "persist") -> Sent:
        [read] = await repository.retrieve([ledger])
        sent = self._new(read, through)
        await self._send(sent, repository)
        return sent

    async def _send(self, sent: Sent, repository: Any) -> BaseException | None:
        """One attempt of `sent`'s command, its answer noted in the model. Returns the error
        it met (raised again if no caller should ever see it, or a cancellation)."""
        command = sent.command
        result: Any = None
        error: BaseException | None = None
        try:
            if sent.through == "handler":
                result = await ledger_handler(repository)(command)
            else:
                with command_scope(command):
                    result = await repository.persist(command.state())
        except BaseException as exc:
            error = exc
        sent.last_error = error
        outcome = outcome_of(error)
        self.ledgers[command.ledger_id].settle(command.token, outcome)
        if outcome == "acked":
            if sent.first is None:
                sent.first = result
            assert result == sent.first, (
                f"a resend of {sent} answered {result!r}, not its first answer {sent.first!r}"
            )
        if isinstance(error, asyncio.CancelledError):
            raise error
        return error

    async def _from_elsewhere(self, ledger: str) -> None:
        """Another process appends to `ledger` (in a context of its own: no command of ours)."""
        appending = self._append(self.other, ledger)
        await asyncio.create_task(appending, context=contextvars.Context())

    async def _resolve(
        self, ledger: str, interloper: bool, lock: LockElsewhere | None, interrupt: Interrupt | None
    ) -> Sent:
        """A command whose first write conflicts, through the handler, with what `lock` and
        `interrupt` say happening at their points."""
        [read] = await self.repository.retrieve([ledger])
        sent = self._new(read, "handler")
        await self._from_elsewhere(ledger)  # after the command's read: its first write conflicts
        clock = FakeClock(autojump=False)
        task: asyncio.Future[None] | None = None

        def interrupt_now() -> None:
            assert task is not None and interrupt is not None
            if interrupt.how == "cancel":
                task.cancel()
            else:
                clock.advance(ROUND_TIMEOUT_S)  # the command's timeout fires

        interruption = Interruption(interrupt_now, PACE_S)
        conflicts = itertools.count(1)

        def reached(point: str) -> None:
            if lock is not None and lock.at == point:
                self.holder.take(HOLD_MAX_S if lock.for_s is None else lock.for_s)
            if interrupt is not None and interrupt.after == point:
                interruption.after(interrupt.steps)

        async def before_write(call: int) -> None:
            if interloper and call == 2:  # the first resolution: the other process wins again
                await self._from_elsewhere(ledger)

        hooks = HookRegistry()
        hooks.subscribe(CONFLICT_DETECTED, lambda context: reached(f"conflict {next(conflicts)}"))
        handler = ledger_handler(
            self.repository,
            hooks=hooks,
            timeout_s=ROUND_TIMEOUT_S,
            clock=clock,
            before_write=before_write,
        )

        async def handle() -> None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = await handler(sent.command)
            except BaseException as exc:
                error = exc
            self.ledgers[ledger].settle(sent.command.token, outcome_of(error))
            sent.first = result

        task = asyncio.ensure_future(handle())
        reached("start")
        await asyncio.wait([task])
        interruption.stop()
        if lock is not None and lock.for_s is None:
            self.holder.release()
        if task.cancelled():  # before it even started
            self.ledgers[ledger].settle(sent.command.token, "unknown")
        else:
            task.result()
        return sent


class StoreModelAcrossLoops(StoreModel):
    """The same model, where the application's loop and a second one also append at once."""

    loops_at_once = True


def model_settings(examples: int, *, shrink: bool = True) -> settings:
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(
        max_examples=examples,
        stateful_step_count=MODEL_STEPS,
        deadline=None,
        # In CI the same examples every run, and no example database to replay from.
        derandomize=in_ci(),
        database=None if in_ci() else settings().database,
        # The first failure, shrunk alone: once a repository is broken, every later step
        # fails in its own way, and shrinking each of those would only tell the story again.
        report_multiple_bugs=False,
        phases=phases,
        suppress_health_check=list(HealthCheck),
    )


# Two loops racing fail, when they do, by thread timing: replaying such an example to shrink
# it mostly passes, and each replay of a hang costs BOUND_S, so these report it unshrunk.
ACROSS_LOOPS = model_settings(max(MODEL_EXAMPLES // 2, 1), shrink=False)


def sqlite_places(tmp_path: Path) -> Places:
    numbers = itertools.count()
    return Places("sqlite", lambda: str(tmp_path / f"model-{next(numbers)}.sqlite3"))


def postgres_places(database: str) -> Places:
    """A new schema of `database` per example, on the repositories' search path; its
    connections carry its name, so none outlives the example, whatever state a failing one
    left its repositories in."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    numbers = itertools.count()

    def new_schema() -> str:
        schema = f"model_{next(numbers)}"
        with psycopg.connect(database, autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")
        return make_conninfo(database, options=f"-c search_path={schema}", application_name=schema)

    def forget(target: str) -> None:
        schema = conninfo_to_dict(target)["application_name"]
        with psycopg.connect(database, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s AND pid <> pg_backend_pid()",
                (schema,),
            )
            admin.execute(f"DROP SCHEMA {schema} CASCADE")

    return Places("postgres", new_schema, forget)


def test_sqlite_store_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    """SQLite under cancellations, timeouts, lock holders, reopening and other loops: every
    acknowledged write is kept once, nothing refused is written, no call hangs, no repository
    is left unusable."""
    places = sqlite_places(tmp_path)
    run_state_machine_as_test(
        functools.partial(StoreModel, places), settings=model_settings(MODEL_EXAMPLES)
    )


@pytest.mark.postgres
def test_postgres_store_keeps_every_acknowledged_write(pg_database: str) -> None:
    """PostgreSQL under the same: every acknowledged write is kept once, nothing refused is
    written, no call hangs, no repository is left unusable."""
    places = postgres_places(pg_database)
    run_state_machine_as_test(
        functools.partial(StoreModel, places), settings=model_settings(MODEL_EXAMPLES)
    )


def test_sqlite_store_shared_by_two_loops_at_once(tmp_path: Path) -> None:
    """One SQLite repository written from two event loops at once, among all the rest: no
    write waits forever and the same invariants hold."""
    places = sqlite_places(tmp_path)
    machine = functools.partial(StoreModelAcrossLoops, places)
    run_state_machine_as_test(machine, settings=ACROSS_LOOPS)


@pytest.mark.postgres
def test_postgres_store_shared_by_two_loops_at_once(pg_database: str) -> None:
    """One PostgreSQL repository written from two event loops at once, among all the rest: no
    write waits forever and the same invariants hold."""
    places = postgres_places(pg_database)
    machine = functools.partial(StoreModelAcrossLoops, places)
    run_state_machine_as_test(machine, settings=ACROSS_LOOPS)


# A one-step property needs no state machine (in one, it would be found before anything else).
@pytest.mark.parametrize("bad_id", [["a", "list"], {"a": "dict"}, b"bytes", 1.5], ids=repr)
async def test_a_write_under_an_id_no_column_holds_fails_alone(durable_store, bad_id):
    """A write whose command id the database cannot store is refused or stored, and writes
    started beside it (which SQLite commits together with it) are stored either way."""
    repository = durable_store.open(Ledger)
    await repository.open()
    before, odd, after = await asyncio.gather(
        repository.persist(Ledger(id="before")),
        repository.persist(Ledger(id="odd"), command_id=bad_id),
        repository.persist(Ledger(id="after")),
        return_exceptions=True,
    )
    assert isinstance(before, Ledger) and isinstance(after, Ledger), (before, after)
    stored = {ledger.id for ledger in await repository.retrieve(["before", "odd", "after"])}
    assert stored == {"before", "after"} | ({"odd"} if isinstance(odd, Ledger) else set())
