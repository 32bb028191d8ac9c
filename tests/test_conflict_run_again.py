"""RUN_AGAIN: delta commands run again, unchanged, on a conflict; no hooks needed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cqrs_resilience import (
    Command,
    CommandResponse,
    ConcurrencyError,
    ConfigurationError,
    ConflictCommandHandler,
    ConflictConfig,
    ConflictResilient,
    ConflictResolutionPolicy,
    HookRegistry,
    InMemoryRepository,
    Repository,
    ResilientCommandHandler,
    resolve_conflicts,
)
from cqrs_resilience._demo import DemoOrder
from cqrs_resilience.stores import SQLiteRepository

RUN_AGAIN = ConflictConfig(policy=ConflictResolutionPolicy.RUN_AGAIN, max_attempts=10)


class AddItem(Command[str], ConflictResilient):
    order_id: str
    item: str


def never(*args: Any) -> Any:
    raise AssertionError("RUN_AGAIN called a hook")


class AddItemHandler(ResilientCommandHandler[str]):
    """The delta shape the docs teach: read, append, persist; no state methods."""

    conflict_config = RUN_AGAIN
    max_attempts_cap = 50

    def __init__(self, repository: Repository[DemoOrder], **kwargs: Any) -> None:
        super().__init__(repository, **kwargs)
        self.seen: list[AddItem] = []

    async def process(self, command: AddItem) -> CommandResponse[str]:
        self.seen.append(command)
        [order] = await self.repository.retrieve([command.order_id])
        items = [*order.items, {"id": command.item}]
        stored = await self.repository.persist(msgspec.structs.replace(order, items=items))
        return CommandResponse(result=f"v{stored.version}")


def items_of(order: DemoOrder) -> list[str]:
    return [item["id"] for item in order.items]


async def append_concurrently(repository: Repository[DemoOrder], writers: int) -> DemoOrder:
    await repository.persist(DemoOrder(id="o"))
    handler = AddItemHandler(repository)
    commands = [AddItem(order_id="o", item=f"i{n}", conflict_config=None) for n in range(writers)]
    await asyncio.gather(*(handler.handle(command) for command in commands))
    # Every run of a command was that very command: nothing rebuilt.
    assert {id(seen) for seen in handler.seen} <= {id(command) for command in commands}
    [order] = await repository.retrieve(["o"])
    return order


async def test_run_again_appends_every_concurrent_item_once_in_memory() -> None:
    """Concurrent delta commands on one in-memory aggregate: every item lands exactly once."""
    order = await append_concurrently(InMemoryRepository(DemoOrder), 12)
    assert sorted(items_of(order)) == sorted(f"i{n}" for n in range(12))
    assert order.version == 13


async def test_run_again_appends_every_concurrent_item_once_in_sqlite(tmp_path: Path) -> None:
    """Concurrent delta commands on one SQLite row (a real file): every item exactly once."""
    async with SQLiteRepository(tmp_path / "orders.sqlite3", DemoOrder) as store:
        order = await append_concurrently(store, 8)
    assert sorted(items_of(order)) == sorted(f"i{n}" for n in range(8))
    assert order.version == 9


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writers=st.integers(min_value=1, max_value=16))
def test_any_number_of_delta_writers_lands_each_item_exactly_once(writers: int) -> None:
    """However many delta commands race on one aggregate, each item is written once."""
    order = asyncio.run(append_concurrently(InMemoryRepository(DemoOrder), writers))
    assert sorted(items_of(order)) == sorted(f"i{n}" for n in range(writers))


class Conflicting:
    """A handler that conflicts a set number of times and records each command it got."""

    def __init__(self, conflicts: int) -> None:
        self.conflicts = conflicts
        self.seen: list[Any] = []

    async def __call__(self, command: Any) -> str:
        self.seen.append(command)
        if len(self.seen) <= self.conflicts:
            raise ConcurrencyError(aggregate_id="o", expected_version=1, actual_version=2)
        return "done"


async def test_run_again_calls_no_hook_and_runs_the_same_command() -> None:
    """RUN_AGAIN runs the handler again with the same command; hooks given are never called."""
    handler = Conflicting(conflicts=2)
    behavior = resolve_conflicts(never, never, never, config=RUN_AGAIN, fetch_base_state=never)
    command = AddItem(order_id="o", item="x", conflict_config=None)
    assert await behavior(handler)(command) == "done"
    assert handler.seen == [command] * 3
    assert all(seen is command for seen in handler.seen)


async def test_run_again_gives_up_after_max_attempts_with_a_note() -> None:
    """Past max_attempts more calls, the last ConcurrencyError propagates with a note."""
    handler = Conflicting(conflicts=100)
    config = ConflictConfig(policy="run_again", max_attempts=2)
    with pytest.raises(ConcurrencyError) as caught:
        await resolve_conflicts(config=config)(handler)(
            AddItem(order_id="o", item="x", conflict_config=None)
        )
    assert len(handler.seen) == 3
    assert any("after 2 resolution attempts" in note for note in caught.value.__notes__)


async def test_run_again_reports_its_events_under_its_name() -> None:
    """Subscribers see detected/resolved events with the policy "run_again"."""
    hooks = HookRegistry()
    seen: list[tuple[str, str]] = []

    @hooks.hook("handler.conflict.detected")
    @hooks.hook("handler.conflict.resolved")
    def record(context: dict[str, Any]) -> None:
        seen.append((context["event"], context["policy"]))

    behavior = resolve_conflicts(config=RUN_AGAIN, hooks=hooks)
    await behavior(Conflicting(conflicts=1))(AddItem(order_id="o", item="x", conflict_config=None))
    assert seen == [
        ("handler.conflict.detected", "run_again"),
        ("handler.conflict.resolved", "run_again"),
    ]


@pytest.mark.parametrize("asked", ["merge", "last_wins"])
async def test_a_command_asking_to_merge_where_no_hooks_exist_gets_the_conflict(
    asked: str,
) -> None:
    """A command's own MERGE/LAST_WINS on a handler without hooks: the conflict propagates,
    with a note, and the handler is not run again."""
    handler = Conflicting(conflicts=1)
    command = AddItem(order_id="o", item="x", conflict_config=ConflictConfig(policy=asked))
    with pytest.raises(ConcurrencyError) as caught:
        await resolve_conflicts(config=RUN_AGAIN)(handler)(command)
    assert handler.seen == [command]
    [note] = caught.value.__notes__
    assert f"asked for {asked}" in note
    assert "only by running the command again" in note


async def test_an_untrusted_merge_on_a_run_again_handler_writes_nothing() -> None:
    """A delta command asking for MERGE on a RUN_AGAIN-only handler class: nothing written."""
    repository = InMemoryRepository(DemoOrder)
    await repository.persist(DemoOrder(id="o"))
    racer = await repository.persist(DemoOrder(id="o", version=1, items=[{"id": "theirs"}]))
    stale = DemoOrder(id="o", version=1)

    class StaleHandler(AddItemHandler):
        async def process(self, command: AddItem) -> CommandResponse[str]:
            self.seen.append(command)
            await self.repository.persist(msgspec.structs.replace(stale, items=[{"id": "x"}]))
            return CommandResponse(result="never")

    handler = StaleHandler(repository)
    command = AddItem(order_id="o", item="x", conflict_config=ConflictConfig(policy="merge"))
    with pytest.raises(ConcurrencyError) as caught:
        await handler.handle(command)
    assert "asked for merge" in caught.value.__notes__[-1]
    assert handler.seen == [command]
    assert await repository.retrieve(["o"]) == [racer]


@pytest.mark.parametrize("policy", ["last_wins", "merge"])
def test_a_merging_policy_without_hooks_is_refused_when_decorating(policy: str) -> None:
    """LAST_WINS or MERGE configured without the hooks: a ConfigurationError naming them."""
    with pytest.raises(ConfigurationError, match="get_incoming_state, update_command"):
        resolve_conflicts(never, config=ConflictConfig(policy=policy))


def test_run_again_and_first_wins_need_no_hooks() -> None:
    """resolve_conflicts() with RUN_AGAIN or FIRST_WINS may leave the hooks out."""
    resolve_conflicts(config=ConflictConfig(policy="run_again"))
    resolve_conflicts(config=ConflictConfig(policy=ConflictResolutionPolicy.FIRST_WINS))
    resolve_conflicts()
    assert ConflictConfig(policy="RUN_AGAIN").policy is ConflictResolutionPolicy.RUN_AGAIN


def test_a_handler_class_without_state_methods_builds_for_run_again_and_first_wins() -> None:
    """A handler with RUN_AGAIN (or the default FIRST_WINS) needs no state methods."""

    class Plain(ConflictCommandHandler[str]):
        async def process(self, command: Any) -> CommandResponse[str]:
            return CommandResponse()

    class Delta(Plain):
        conflict_config = RUN_AGAIN

    assert Plain() is not None
    assert [type(b).__name__ for b in Delta().behaviors] == ["ResolveConflicts"]


@pytest.mark.parametrize("policy", ["last_wins", "merge"])
def test_a_merging_handler_class_missing_a_state_method_is_refused(policy: str) -> None:
    """A handler class configured to merge but missing a state method: a TypeError naming
    the class and the method, when it is built."""

    class HalfDone(ConflictCommandHandler[str]):
        conflict_config = ConflictConfig(policy=policy)

        async def process(self, command: Any) -> CommandResponse[str]:
            return CommandResponse()

        async def fetch_latest_state(self, command: Any) -> dict[str, Any] | None:
            return {}

        def get_incoming_state(self, command: Any) -> dict[str, Any]:
            return {}

    with pytest.raises(TypeError, match=r"HalfDone.*update_command") as caught:
        HalfDone()
    assert "fetch_latest_state" not in str(caught.value)
