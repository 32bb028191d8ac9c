"""Commands nested deep (decoded from JSON, as from a queue) or holding a cycle, handled from
deep call stacks: a result or a clear error naming the command, never a raw RecursionError."""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

from cqrs_resilience import (
    Aggregate,
    Command,
    CommandResponse,
    ConflictConfig,
    ConflictResolutionPolicy,
    FakeClock,
    FixedRetryPolicy,
    ResilientCommandHandler,
    TransientError,
    command_scope,
    resolve_conflicts,
    retry,
)
from cqrs_resilience._idempotency import fingerprint
from tests.test_otel import Telemetry

LEVELS = 900
NO_WAIT = FixedRetryPolicy(max_retries=3, delay_ms=0, jitter=False)


class Node(msgspec.Struct):
    child: Node | None = None


class Deposit(Command[int]):
    account_id: str
    amount: int
    payload: Node | None = None


class Carry(Command[int]):
    """A command carrying anything, as `Any` fields do."""

    account_id: str = "a"
    amount: int = 5
    payload: Any = None


class Account(Aggregate, kw_only=True):
    balance: int = 0
    note: Node | None = None


def deep_json(command_id: str, levels: int = LEVELS) -> bytes:
    nested = '{"child": ' * levels + "null" + "}" * levels
    body = f'{{"command_id": "{command_id}", "account_id": "a", "amount": 5, "payload": {nested}}}'
    return body.encode()


def decoded(body: bytes) -> Deposit:
    """The command as a queue consumer gets it: decoded from JSON."""
    return msgspec.json.decode(body, type=Deposit)


def built_deep(levels: int) -> Deposit:
    """A command nested `levels` deep, built in code (no decoder would take it)."""
    node = None
    for _ in range(levels):
        node = Node(child=node)
    return Deposit(account_id="a", amount=5, payload=node)


def call_depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def deeper_sync(frames: int, then: Callable[[], Any]) -> Any:
    return then() if frames <= 0 else deeper_sync(frames - 1, then)


async def deeper(frames: int, then: Callable[[], Awaitable[Any]]) -> Any:
    """`await then()`, from `frames` frames deeper than the caller."""
    return await then() if frames <= 0 else await deeper(frames - 1, then)


def test_a_deep_command_has_one_fingerprint_at_any_call_depth():
    """What a store records for a deep command is the same from any call depth, so a resend
    from a shallow stack is recognized as the first send from a deep one."""
    command = decoded(deep_json("deep-1"))
    shallow = fingerprint(command)
    headroom = sys.getrecursionlimit() - call_depth()
    for frames in (100, 200, headroom - 20):
        assert deeper_sync(frames, lambda: fingerprint(command)) == shallow
    assert fingerprint(decoded(deep_json("deep-1"))) == shallow  # an equal copy
    assert fingerprint(decoded(deep_json("deep-1", LEVELS - 1))) != shallow


class Depositor(ResilientCommandHandler[int]):
    """Reads the account, fails once with a transient error, loses one race to another
    writer (a conflict), then writes the deposit and the command's payload."""

    retry_policy = NO_WAIT

    def __init__(
        self, store: Any, policy: str, *, keeps_payload: bool = True, flaky: bool = True
    ) -> None:
        self.conflict_config = ConflictConfig(policy=ConflictResolutionPolicy(policy))
        super().__init__(clock=FakeClock())
        self.store = store
        self.keeps_payload = keeps_payload
        self.transient_failures = self.races = 1 if flaky else 0

    async def process(self, command: Deposit) -> CommandResponse[int]:
        return CommandResponse(result=await self.deposit(command))

    async def deposit(self, command: Deposit) -> int:
        [account] = await self.store.retrieve([command.account_id])
        if self.transient_failures:
            self.transient_failures -= 1
            raise TransientError("the database blinked")
        if self.races:
            self.races -= 1
            with command_scope(None):  # someone else's write, in between
                await self.store.persist(msgspec.structs.replace(account, balance=100))
        balance = account.balance + command.amount
        note = command.payload if self.keeps_payload else None
        update = msgspec.structs.replace(account, balance=balance, note=note)
        stored = await self.store.persist(update)
        return int(stored.balance)

    async def fetch_latest_state(self, command: Deposit) -> dict[str, Any] | None:
        found = await self.store.retrieve([command.account_id])
        return found[0].to_dict() if found else None

    def get_incoming_state(self, command: Deposit) -> dict[str, Any]:
        return {"note": command.payload} if self.keeps_payload else {}

    def update_command(self, command: Deposit, merged_state: dict[str, Any]) -> Deposit:
        return command


def entry(
    name: str, store: Any, policy: str, *, keeps_payload: bool = True, flaky: bool = True
) -> Callable[[Deposit], Awaitable[int]]:
    """One way to handle a deposit: the handler class (a retry and a conflict), retry() alone
    (a retry) or resolve_conflicts() alone (a conflict); `flaky=False`: neither."""
    handler = Depositor(store, policy, keeps_payload=keeps_payload, flaky=flaky)
    if name == "handle":

        async def handle(command: Deposit) -> int:
            result = (await handler.handle(command)).result
            assert result is not None
            return result

        return handle
    if name == "retry":
        handler.races = 0
        return retry(NO_WAIT, clock=FakeClock())(handler.deposit)
    handler.transient_failures = 0
    config = handler.conflict_config
    resolving = resolve_conflicts(
        handler.fetch_latest_state,
        handler.get_incoming_state,
        handler.update_command,
        config=config,
    )
    return resolving(handler.deposit)


@pytest.fixture
def observed(caplog: pytest.LogCaptureFixture, hook_events: Any) -> Any:
    """Everything that reports on a command switched on: DEBUG logs, an event sink, and
    OpenTelemetry on in-memory providers."""
    caplog.set_level(logging.DEBUG, logger="cqrs_resilience")
    telemetry = Telemetry()
    yield hook_events
    telemetry.undo()


@pytest.mark.parametrize("policy", ["last_wins", "merge"])
@pytest.mark.parametrize("frames", [100, 200])
@pytest.mark.parametrize("name", ["handle", "retry", "resolve_conflicts"])
async def test_a_deep_command_is_handled_from_a_deep_stack(
    make_store, observed, name, frames, policy
):
    """A command 900 levels deep, decoded from JSON, handled 100 and 200 frames deeper through
    retries and a conflict (merged into a state as deep), with logs and telemetry on: applied
    once, and its resend from a shallow stack gets the first outcome."""
    store = make_store(Account)
    await store.persist(Account(id="a", note=decoded(deep_json("setup", LEVELS - 1)).payload))
    body = deep_json(f"deep-{name}-{frames}")
    command, run = decoded(body), entry(name, store, policy)
    result = await deeper(frames, lambda: run(command))
    expected = 5 if name == "retry" else 105
    assert result == expected
    resend = entry(name, store, policy, flaky=False)
    assert await resend(decoded(body)) == expected  # from a shallow stack: the first outcome
    [account] = await store.retrieve(["a"])
    assert account.balance == expected and account.version == (2 if name == "retry" else 3)
    assert msgspec.msgpack.encode(account.note) == msgspec.msgpack.encode(decoded(body).payload)
    if name != "resolve_conflicts":
        assert "handler.retry.scheduled" in observed.names()


@pytest.mark.parametrize("name", ["handle", "retry", "resolve_conflicts"])
async def test_a_command_too_deep_for_any_stack_is_refused_by_name(make_store, name):
    """A command nested deeper than can be encoded even on a fresh stack is a TypeError naming
    its type and saying it is nested too deeply, at its first write; nothing is written."""
    store = make_store(Account)
    await store.persist(Account(id="a"))
    run, command = entry(name, store, "last_wins", keeps_payload=False), built_deep(5_000)
    with pytest.raises(TypeError, match=r"command Deposit is nested too deeply \(at `\$\.payload"):
        await deeper(100, lambda: run(command))
    [account] = await store.retrieve(["a"])
    assert account.version == (2 if name != "retry" else 1)  # only the other writer's write


@dataclasses.dataclass
class Box:
    inside: Any = None


@pytest.mark.parametrize(
    "make_cycle",
    [
        pytest.param(lambda: [[]], id="list"),
        pytest.param(lambda: Box(), id="dataclass"),
    ],
)
async def test_a_command_holding_a_cycle_is_refused_by_name(make_store, make_cycle):
    """A command whose payload contains itself is a TypeError naming the command and where
    the cycle closes, from any depth; nothing is written."""
    store = make_store(Account)
    payload = make_cycle()
    if isinstance(payload, list):
        payload[0].append(payload)
    else:
        payload.inside = payload
    command = Carry(payload=payload)
    for frames in (0, 200):
        with pytest.raises(TypeError, match=r"command Carry contains a cycle .* at `\$\.payload"):
            await deeper(frames, lambda: retry(NO_WAIT)(creator(store))(command))
    assert await store.retrieve(["a"]) == []


class PlainDeposit:
    """A command that is a plain object (no Struct, no dataclass), and contains itself."""

    def __init__(self) -> None:
        self.command_id = "plain-1"
        self.account_id = "a"
        self.amount = 5
        self.me = self


async def test_a_plain_object_command_containing_itself_works(make_store):
    """A plain object is fingerprinted by its repr, which does not follow the cycle: it is
    handled, from any depth, and its retry within the process is a repeat."""
    store = make_store(Account)
    command = PlainDeposit()
    handle = retry(NO_WAIT)(creator(store))
    stored = await deeper(200, lambda: handle(command))
    assert await handle(command) == stored
    assert await store.was_processed("plain-1", "a")


def creator(store: Any) -> Callable[[Any], Awaitable[Account]]:
    """A command function creating the command's account."""

    async def create(command: Any) -> Account:
        created = Account(id=command.account_id, balance=command.amount)
        stored: Account = await store.persist(created)
        return stored

    return create
