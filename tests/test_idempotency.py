"""Idempotency across every entry point and store: a repeat gets its first outcome, a reused id
is refused, a command's every write lands exactly once."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import msgspec
import pytest

from cqrs_resilience import (
    Aggregate,
    Command,
    CommandResponse,
    ConfigurationError,
    ConflictConfig,
    ConflictResolutionPolicy,
    FakeClock,
    FixedRetryPolicy,
    IdempotencyKeyReuseError,
    PipelinedCommandHandler,
    ResilientCommandHandler,
    RetryableCommandHandler,
    command_scope,
    current_command_id,
    pipeline,
    resolve_conflicts,
    retry,
)
from cqrs_resilience.stores import PostgresRepository

NO_WAIT = FixedRetryPolicy(max_retries=3, delay_ms=0, jitter=False)


class Account(Aggregate, kw_only=True):
    balance: int = 0
    notes: list[str] = msgspec.field(default_factory=list)


class Deposit(Command[int]):
    account_id: str
    amount: int


class TimesOutAfterCommit:
    """A store wrapper whose next `failures` persists commit, then raise TimeoutError."""

    def __init__(self, inner: Any, failures: int = 1) -> None:
        self.inner = inner
        self.failures = failures

    async def retrieve(self, ids: list[str], uow: Any = None) -> list[Any]:
        return await self.inner.retrieve(ids)

    async def retrieve_version(self, aggregate_id: str, version: int) -> Any:
        return await self.inner.retrieve_version(aggregate_id, version)

    async def persist(self, aggregate: Any, uow: Any = None, **kwargs: Any) -> Any:
        stored = await self.inner.persist(aggregate, **kwargs)
        if self.failures:
            self.failures -= 1
            raise TimeoutError("committed, then the reply timed out")
        return stored


def depositor(store: Any) -> Callable[[Deposit], Awaitable[int]]:
    """A legacy-style command function: read, add, write (creating the account if new)."""

    async def deposit(command: Deposit) -> int:
        [account] = await store.retrieve([command.account_id]) or [Account(id=command.account_id)]
        balance = account.balance + command.amount
        stored = await store.persist(msgspec.structs.replace(account, balance=balance))
        return int(stored.balance)

    return deposit


# --- a repeat gets its first outcome; a reused id is refused, on every entry point -----------


def entry_points(store: Any) -> dict[str, Callable[[Deposit], Awaitable[Any]]]:
    """The same deposit through retry() alone, resolve_conflicts() alone, a pipeline, a class."""
    deposit = depositor(store)

    async def latest(command: Deposit) -> dict[str, Any] | None:
        found = await store.retrieve([command.account_id])
        return found[0].to_dict() if found else None

    resolving = resolve_conflicts(latest, lambda c: {}, lambda c, s: c)

    class Handler(ResilientCommandHandler[int]):
        retry_policy = NO_WAIT

        async def process(self, command: Deposit) -> CommandResponse[int]:
            return CommandResponse(result=await deposit(command))

        async def fetch_latest_state(self, command: Deposit) -> dict[str, Any] | None:
            return await latest(command)

        def get_incoming_state(self, command: Deposit) -> dict[str, Any]:
            return {}

        def update_command(self, command: Deposit, merged_state: dict[str, Any]) -> Deposit:
            return command

    handler = Handler(clock=FakeClock())

    async def handle(command: Deposit) -> Any:
        return (await handler.handle(command)).result

    return {
        "retry": retry(NO_WAIT, clock=FakeClock())(deposit),
        "resolve_conflicts": resolving(deposit),
        "pipeline": pipeline(retry(NO_WAIT, clock=FakeClock()), resolving)(deposit),
        "handle": handle,
    }


ENTRY_POINTS = ["retry", "resolve_conflicts", "pipeline", "handle"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
async def test_a_different_command_under_a_used_id_is_refused(make_store, entry):
    """Two different commands with one id: the second is refused; nothing of it is written."""
    store = make_store(Account)
    run = entry_points(store)[entry]
    await run(Deposit(command_id="dup", account_id="a", amount=10))
    with pytest.raises(IdempotencyKeyReuseError, match="'dup'"):
        await run(Deposit(command_id="dup", account_id="a", amount=99))
    with pytest.raises(IdempotencyKeyReuseError):  # on any aggregate
        await run(Deposit(command_id="dup", account_id="b", amount=99))
    assert [a.balance for a in await store.retrieve(["a", "b"])] == [10]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
async def test_resending_the_same_command_gets_its_first_outcome(make_store, entry):
    """The same command again (an equal copy, as a queue redelivers it) writes nothing new."""
    store = make_store(Account)
    run = entry_points(store)[entry]
    command = Deposit(account_id="a", amount=10)
    first = await run(command)
    resent = msgspec.json.decode(msgspec.json.encode(command), type=Deposit)
    assert await run(resent) == first
    [account] = await store.retrieve(["a"])
    assert (account.balance, account.version) == (10, 1)


@pytest.mark.parametrize("entry", ["retry", "pipeline", "handle"])
async def test_a_commit_then_timeout_is_not_applied_twice(make_store, entry):
    """The write commits, the reply times out, the retry re-reads and writes: applied once."""
    store = make_store(Account)
    await store.persist(Account(id="a", balance=5))
    run = entry_points(TimesOutAfterCommit(store))[entry]
    assert await run(Deposit(account_id="a", amount=10)) == 15
    [account] = await store.retrieve(["a"])
    assert (account.balance, account.version) == (15, 2)


class CreateThenUpdate(PipelinedCommandHandler[int]):
    """Writes one aggregate twice in one command: creates it, then updates what it stored."""

    async def process(self, command: Deposit) -> CommandResponse[int]:
        created = await self.dispatcher.persist(Account(id=command.account_id))
        updated = await self.dispatcher.persist(
            msgspec.structs.replace(created, balance=command.amount)
        )
        return CommandResponse(result=updated.version)


async def test_every_write_of_one_command_is_applied(make_store):
    """Create, then update, in one command: both writes land (version 2), neither dropped."""
    store = make_store(Account)
    response = await CreateThenUpdate(store).handle(Deposit(account_id="a", amount=7))
    assert response.result == 2
    assert [(a.balance, a.version) for a in await store.retrieve(["a"])] == [(7, 2)]


class TimesOutAfterCommitOf:
    """A store wrapper whose `nth` persist (counting every call) commits, then times out."""

    def __init__(self, inner: Any, nth: int) -> None:
        self.inner = inner
        self.nth = nth
        self.calls = 0

    async def persist(self, aggregate: Any, uow: Any = None) -> Any:
        self.calls += 1
        stored = await self.inner.persist(aggregate)
        if self.calls == self.nth:
            raise TimeoutError("committed, then the reply timed out")
        return stored


@pytest.mark.parametrize("nth", [1, 2])
async def test_every_write_of_one_command_lands_once_across_retries(make_store, nth):
    """The create or the update commits and times out; the retried command replays it: v2."""
    store = make_store(Account)

    class Handler(RetryableCommandHandler[int]):
        retry_policy = NO_WAIT
        process = CreateThenUpdate.process

    flaky = TimesOutAfterCommitOf(store, nth)
    response = await Handler(flaky, clock=FakeClock()).handle(Deposit(account_id="a", amount=7))
    assert response.result == 2
    assert flaky.calls == nth + 2  # up to the timeout, then both writes again (the retry)
    assert [(a.balance, a.version) for a in await store.retrieve(["a"])] == [(7, 2)]


async def test_conflict_rounds_replay_what_an_earlier_round_wrote(make_store):
    """A round that wrote one aggregate, then conflicted on another, does not write it twice."""
    store = make_store(Account)
    await store.persist(Account(id="hot"))
    calls = 0

    async def transfer(command: Deposit) -> None:
        nonlocal calls
        calls += 1
        [log] = await store.retrieve(["log"]) or [Account(id="log")]
        await store.persist(msgspec.structs.replace(log, balance=log.balance + 1))
        version = 0 if calls == 1 else 1  # the first round writes "hot" from a stale read
        await store.persist(Account(id="hot", version=version, balance=command.amount))

    async def latest(command: Deposit) -> dict[str, Any]:
        return (await store.retrieve(["hot"]))[0].to_dict()

    config = ConflictConfig(policy=ConflictResolutionPolicy.LAST_WINS)
    resolving = resolve_conflicts(latest, lambda c: {}, lambda c, s: c, config=config)
    await resolving(transfer)(Deposit(account_id="hot", amount=3))
    assert calls == 2
    assert [(a.id, a.balance) for a in await store.retrieve(["log", "hot"])] == [
        ("log", 1),
        ("hot", 3),
    ]


async def test_concurrent_writes_of_one_aggregate_in_one_command_are_not_dropped(make_store):
    """Two writes of one version inside one command race as without ids: one conflicts."""
    store = make_store(Account)
    created = await store.persist(Account(id="a"))
    with command_scope(Deposit(account_id="a", amount=1)):
        results = await asyncio.gather(
            store.persist(msgspec.structs.replace(created, balance=1)),
            store.persist(msgspec.structs.replace(created, balance=2)),
            return_exceptions=True,
        )
    assert sorted(type(r).__name__ for r in results) == ["Account", "ConcurrencyError"]


# --- scopes -----------------------------------------------------------------------------------


async def test_retry_alone_makes_the_command_current(clock: FakeClock):
    """A function wrapped only in retry() sees its command's id, on every attempt; sync too."""
    seen: list[str | None] = []

    async def legacy(command: Deposit) -> None:
        seen.append(current_command_id.get())
        if len(seen) < 2:
            raise TimeoutError

    def legacy_sync(command: Deposit) -> None:
        seen.append(current_command_id.get())

    command = Deposit(account_id="a", amount=1)
    await retry(NO_WAIT, clock=clock)(legacy)(command)
    retry(NO_WAIT, clock=clock)(legacy_sync)(command)
    assert seen == [command.command_id] * 3
    assert current_command_id.get() is None


async def test_a_decorated_methods_very_first_command_is_current(clock: FakeClock):
    """retry() on a method (the command after `self`) runs the first command of a new handler
    class in its scope too, not only the later ones."""

    class Legacy:  # a class never seen before: its first call is the first sight of its type
        @retry(NO_WAIT, clock=clock)
        async def process(self, command: Deposit) -> str | None:
            return current_command_id.get()

    first, second = Deposit(account_id="a", amount=1), Deposit(account_id="a", amount=2)
    assert await Legacy().process(first) == first.command_id
    assert await Legacy().process(second) == second.command_id


async def test_a_command_handled_inside_another_gets_its_own_scope(make_store):
    """A nested command with its own id records its writes under it, then the outer resumes."""
    store = make_store(Account)
    inner = Deposit(account_id="b", amount=1)
    outer = Deposit(account_id="a", amount=1)
    nested = depositor(store)

    async def handle_outer(command: Deposit) -> None:
        await retry(NO_WAIT)(nested)(inner)
        assert current_command_id.get() == outer.command_id
        await nested(command)

    await retry(NO_WAIT)(handle_outer)(outer)
    assert await store.was_processed(inner.command_id, "b")
    assert await store.was_processed(outer.command_id, "a")
    assert not await store.was_processed(outer.command_id, "b")


def test_command_scope_takes_a_command_an_id_or_none():
    """command_scope accepts a command or an id; None turns recording off; a non-string id is
    refused as Command(command_id=...) refuses it."""
    command = Deposit(account_id="a", amount=1)
    with command_scope(command):
        assert current_command_id.get() == command.command_id
        with command_scope(None):
            assert current_command_id.get() is None
        with command_scope("other"):
            assert current_command_id.get() == "other"
    refused = pytest.raises(ConfigurationError, match="command_id must be a string, not int: 42")
    with refused, command_scope(42):
        pass


# --- the same key from two processes, on PostgreSQL -----------------------------------------


_start: Any = None  # the barrier the racing processes wait at, so they begin together


def _init_racer(start: Any) -> None:
    global _start
    _start = start


def _deposit_in_process(dsn: str, command_json: bytes) -> str:
    async def run() -> str:
        command = msgspec.json.decode(command_json, type=Deposit)
        async with PostgresRepository(dsn, Account, max_size=1) as store:
            await store.retrieve(["a"])  # connected before the race starts
            _start.wait(timeout=30)
            try:
                return f"ok {await retry(NO_WAIT)(depositor(store))(command)}"
            except IdempotencyKeyReuseError:
                return "refused"

    return asyncio.run(run())


def _race(dsn: str, commands: list[Deposit]) -> list[str]:
    """Each command in its own process, all released at once; their outcomes, sorted."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        len(commands),
        mp_context=context,
        initializer=_init_racer,
        initargs=(context.Barrier(len(commands)),),
    ) as pool:
        futures = [pool.submit(_deposit_in_process, dsn, msgspec.json.encode(c)) for c in commands]
        return sorted(f.result(timeout=60) for f in futures)


@pytest.mark.postgres
async def test_one_key_two_commands_racing_from_two_processes(pg_database):
    """Two processes, two different commands, one id: one is applied, the other refused."""
    async with PostgresRepository(pg_database, Account) as store:
        await store.persist(Account(id="a"))
    for round_ in range(3):
        commands = [Deposit(command_id=f"dup-{round_}", account_id="a", amount=n) for n in (1, 2)]
        outcomes = await asyncio.to_thread(_race, pg_database, commands)
        assert outcomes[0].startswith("ok") and outcomes[1] == "refused", outcomes
    async with PostgresRepository(pg_database, Account) as store:
        [account] = await store.retrieve(["a"])
    assert account.version == 4  # one deposit per round


@pytest.mark.postgres
async def test_one_command_racing_from_two_processes_is_applied_once(pg_database):
    """The same command delivered to two processes at once: one write, one outcome for both."""
    async with PostgresRepository(pg_database, Account) as store:
        await store.persist(Account(id="a"))
    for round_ in range(3):
        command = Deposit(command_id=f"once-{round_}", account_id="a", amount=1)
        outcomes = await asyncio.to_thread(_race, pg_database, [command, command])
        assert outcomes == [f"ok {round_ + 1}"] * 2
    async with PostgresRepository(pg_database, Account) as store:
        [account] = await store.retrieve(["a"])
    assert (account.balance, account.version) == (3, 4)
