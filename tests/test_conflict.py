"""resolve_conflicts() and the conflict handler classes: policies, merges, guards, hooks."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from cqrs_resilience import (
    Aggregate,
    Command,
    CommandResponse,
    ConcurrencyError,
    ConflictCommandHandler,
    ConflictConfig,
    ConflictResilient,
    ConflictResolutionMixin,
    ConflictResolutionPolicy,
    FakeClock,
    FaultyRepository,
    FixedRetryPolicy,
    HookRegistry,
    InMemoryRepository,
    MergeConflictError,
    MergeStrategyRegistry,
    OnMergeConflict,
    ResilientCommandHandler,
    Retryable,
    Turns,
    pipeline,
    resolve_conflicts,
    retry,
)
from cqrs_resilience._demo import AddLineItem, AddLineItemHandler, DemoOrder
from tests.test_merge_registry import CustomOrderMergeStrategy

MERGE = ConflictConfig(policy=ConflictResolutionPolicy.MERGE)


class Update(Command[str]):
    aggregate_id: str = "a1"
    state: dict[str, Any] = msgspec.field(default_factory=dict)


class Scenario:
    """A handler that conflicts a set number of times, and hooks that record what they saw."""

    def __init__(self, latest: dict[str, Any] | None, conflicts: int = 1) -> None:
        self.latest = latest
        self.conflicts = conflicts
        self.seen: list[Update] = []
        self.merged: list[dict[str, Any]] = []

    async def handler(self, command: Update) -> str:
        self.seen.append(command)
        if len(self.seen) <= self.conflicts:
            raise ConcurrencyError(aggregate_id="a1", expected_version=1, actual_version=2)
        return "done"

    async def fetch_latest_state(self, command: Update) -> dict[str, Any] | None:
        return self.latest

    def get_incoming_state(self, command: Update) -> dict[str, Any]:
        return command.state

    def update_command(self, command: Update, merged: dict[str, Any]) -> Update:
        self.merged.append(merged)
        return Update(aggregate_id=command.aggregate_id, state=merged)

    def wrap(self, **kwargs: Any) -> Any:
        behavior = resolve_conflicts(
            self.fetch_latest_state, self.get_incoming_state, self.update_command, **kwargs
        )
        return behavior(self.handler)


LATEST = {"id": "a1", "version": 2, "status": "processing", "meta": {"a": 1, "b": 2}}
INCOMING = {"notes": "gift", "meta": {"b": 3}}


async def test_first_wins_propagates_at_once(hooks: HookRegistry, events: list[Any]) -> None:
    """FIRST_WINS: the conflict reaches the caller and the handler is not called again."""
    scenario = Scenario(LATEST)
    with pytest.raises(ConcurrencyError):
        await scenario.wrap(hooks=hooks)(Update(state=INCOMING))
    assert len(scenario.seen) == 1
    assert [name for name, _ in events] == ["handler.conflict.detected", "handler.conflict.failed"]


async def test_last_wins_overlays_incoming_shallowly() -> None:
    """LAST_WINS: {**latest, **incoming}; a nested dict in incoming replaces latest's."""
    scenario = Scenario(LATEST)
    config = ConflictConfig(policy=ConflictResolutionPolicy.LAST_WINS)
    assert await scenario.wrap(config=config)(Update(state=INCOMING)) == "done"
    assert scenario.merged == [
        {"id": "a1", "version": 2, "status": "processing", "meta": {"b": 3}, "notes": "gift"}
    ]
    assert scenario.seen[1].state == scenario.merged[0]


async def test_merge_uses_the_named_strategy() -> None:
    """MERGE with "deep": nested dicts merge, current keys kept, incoming wins."""
    scenario = Scenario(LATEST)
    assert await scenario.wrap(config=MERGE)(Update(state=INCOMING)) == "done"
    assert scenario.merged == [
        {
            "id": "a1",
            "version": 2,
            "status": "processing",
            "meta": {"a": 1, "b": 3},
            "notes": "gift",
        }
    ]


async def test_attempts_are_bounded_then_the_last_conflict_propagates(
    hooks: HookRegistry, events: list[Any]
) -> None:
    """At most max_attempts resolutions per call; then the last ConcurrencyError is raised."""
    scenario = Scenario(LATEST, conflicts=100)
    config = ConflictConfig(policy=ConflictResolutionPolicy.MERGE, max_attempts=3)
    with pytest.raises(ConcurrencyError) as info:
        await scenario.wrap(config=config, hooks=hooks)(Update(state=INCOMING))
    assert len(scenario.seen) == 4
    assert info.value.__notes__ == [
        "conflict not resolved after 3 resolution attempts (max_attempts=3)"
    ]
    names = [name for name, _ in events]
    assert names.count("handler.conflict.detected") == 3
    assert names[-1] == "handler.conflict.failed"


async def test_a_vanished_aggregate_propagates_at_once() -> None:
    """If fetch_latest_state returns None the conflict propagates without another call."""
    scenario = Scenario(None)
    with pytest.raises(ConcurrencyError) as info:
        await scenario.wrap(config=MERGE)(Update(state=INCOMING))
    assert len(scenario.seen) == 1
    assert "no longer exists" in info.value.__notes__[0]


@pytest.mark.parametrize(
    "policy", [ConflictResolutionPolicy.LAST_WINS, ConflictResolutionPolicy.MERGE]
)
@pytest.mark.parametrize("strategy", ["deep", "field", "timestamp"])
async def test_protected_fields_always_come_from_latest(
    policy: ConflictResolutionPolicy, strategy: str
) -> None:
    """Whatever the policy or strategy, id and version come from latest, never incoming."""
    scenario = Scenario({"id": "a1", "version": 2, "modified_at": 1})
    hostile = {"id": "someone-else", "version": 999, "owner": "mallory", "modified_at": 2}
    config = ConflictConfig(policy=policy, strategy_name=strategy)
    await scenario.wrap(config=config)(Update(state=hostile))
    assert scenario.merged[0]["id"] == "a1"
    assert scenario.merged[0]["version"] == 2


async def test_protected_fields_absent_from_latest_cannot_be_introduced() -> None:
    """A protected field missing from latest is dropped, not taken from incoming."""
    scenario = Scenario({"status": "x"})
    config = ConflictConfig(policy=ConflictResolutionPolicy.LAST_WINS, protected_fields={"owner"})
    await scenario.wrap(config=config)(Update(state={"owner": "mallory", "status": "y"}))
    assert scenario.merged == [{"status": "y"}]


async def test_rebuilt_commands_keep_the_command_id() -> None:
    """update_command need not pass command_id: the library carries it over."""
    scenario = Scenario(LATEST, conflicts=2)
    original = Update(state=INCOMING)
    await scenario.wrap(config=MERGE)(original)
    assert [c.command_id for c in scenario.seen] == [original.command_id] * 3


async def test_every_round_merges_the_original_intent_into_the_newest_state() -> None:
    """After repeated conflicts the command's own state is merged into the latest latest."""
    scenario = Scenario({"id": "a1", "version": 2, "status": "a"}, conflicts=2)
    handler = scenario.wrap(config=MERGE)

    async def moving_target(command: Update) -> dict[str, Any]:
        version = 2 + len(scenario.seen)
        return {"id": "a1", "version": version, "status": f"s{version}"}

    scenario.fetch_latest_state = moving_target  # type: ignore[method-assign]
    handler = scenario.wrap(config=MERGE)
    await handler(Update(state={"notes": "n"}))
    assert scenario.merged == [
        {"id": "a1", "version": 3, "status": "s3", "notes": "n"},
        {"id": "a1", "version": 4, "status": "s4", "notes": "n"},
    ]


class Configured(Command[str], ConflictResilient):
    aggregate_id: str = "a1"
    state: dict[str, Any] = msgspec.field(default_factory=dict)


async def test_command_config_wins_over_behavior_config() -> None:
    """A ConflictResilient command's conflict_config takes precedence over config=."""
    scenario = Scenario(LATEST)
    command = Configured(state=INCOMING, conflict_config=MERGE)
    behavior = resolve_conflicts(
        scenario.fetch_latest_state,
        scenario.get_incoming_state,
        lambda cmd, merged: msgspec.structs.replace(cmd, state=merged),
    )
    assert await behavior(scenario.handler)(command) == "done"  # type: ignore[arg-type]
    first_wins = Configured(
        state=INCOMING, conflict_config=ConflictConfig(policy=ConflictResolutionPolicy.FIRST_WINS)
    )
    scenario2 = Scenario(LATEST)
    behavior2 = resolve_conflicts(
        scenario2.fetch_latest_state,
        scenario2.get_incoming_state,
        lambda cmd, merged: cmd,
        config=MERGE,
    )
    with pytest.raises(ConcurrencyError):
        await behavior2(scenario2.handler)(first_wins)  # type: ignore[arg-type]


async def test_unknown_strategy_names_every_registered_one() -> None:
    """An unknown strategy_name fails with a ValueError listing the registered names."""
    scenario = Scenario(LATEST)
    config = ConflictConfig(policy=ConflictResolutionPolicy.MERGE, strategy_name="nope")
    with pytest.raises(ValueError, match="deep") as info:
        await scenario.wrap(config=config)(Update(state=INCOMING))
    assert "field" in str(info.value)
    assert "timestamp" in str(info.value)


async def test_a_custom_registry_supplies_strategies() -> None:
    """registry= makes custom strategy names available."""

    class KeepCurrent:
        def merge(self, current: dict[str, Any], incoming: dict[str, Any]) -> dict[str, Any]:
            return dict(current)

    registry = MergeStrategyRegistry()
    registry.register("keep", KeepCurrent)
    scenario = Scenario(LATEST)
    config = ConflictConfig(policy=ConflictResolutionPolicy.MERGE, strategy_name="keep")
    await scenario.wrap(config=config, registry=registry)(Update(state=INCOMING))
    assert scenario.merged == [LATEST]


async def test_three_way_merge_keeps_both_sides_disjoint_changes() -> None:
    """With a base, a field changed only by the other writer survives a full-state command."""
    base = {"id": "a1", "version": 1, "status": "pending", "notes": ""}
    latest = {"id": "a1", "version": 2, "status": "processing", "notes": ""}
    full_state = {"id": "a1", "version": 1, "status": "pending", "notes": "gift wrap"}
    scenario = Scenario(latest)

    async def fetch_base(command: Update) -> dict[str, Any]:
        return base

    await scenario.wrap(config=MERGE, fetch_base_state=fetch_base)(Update(state=full_state))
    assert scenario.merged == [
        {"id": "a1", "version": 2, "status": "processing", "notes": "gift wrap"}
    ]


async def test_two_way_merge_would_have_lost_that_update() -> None:
    """Without a base the same full-state command silently reverts the other writer's change."""
    latest = {"id": "a1", "version": 2, "status": "processing", "notes": ""}
    full_state = {"id": "a1", "version": 1, "status": "pending", "notes": "gift wrap"}
    scenario = Scenario(latest)
    await scenario.wrap(config=MERGE)(Update(state=full_state))
    assert scenario.merged[0]["status"] == "pending"  # the concurrent "processing" is gone


async def test_three_way_conflicts_raise_with_every_path(
    hooks: HookRegistry, events: list[Any]
) -> None:
    """Both sides changing the same fields differently raises MergeConflictError with all paths."""
    base = {"id": "a1", "version": 1, "status": "pending", "notes": "", "qty": 1}
    latest = {"id": "a1", "version": 2, "status": "processing", "notes": "a", "qty": 1}
    incoming = {"id": "a1", "version": 1, "status": "cancelled", "notes": "b", "qty": 5}
    scenario = Scenario(latest)

    async def fetch_base(command: Update) -> dict[str, Any]:
        return base

    handler = scenario.wrap(config=MERGE, fetch_base_state=fetch_base, hooks=hooks)
    with pytest.raises(MergeConflictError) as info:
        await handler(Update(state=incoming))
    assert sorted(c.path for c in info.value.conflicts) == [("notes",), ("status",)]
    assert isinstance(info.value.__cause__, ConcurrencyError)
    assert len(scenario.seen) == 1
    assert events[-1][0] == "handler.conflict.failed"
    assert events[-1][1]["error"] is info.value


async def test_three_way_conflicts_can_be_settled_by_config() -> None:
    """on_conflict=PREFER_INCOMING settles both-sides changes with the command's values."""
    base = {"id": "a1", "version": 1, "status": "pending", "notes": ""}
    latest = {"id": "a1", "version": 2, "status": "processing", "notes": "a"}
    incoming = {"id": "a1", "version": 1, "status": "cancelled", "notes": ""}
    scenario = Scenario(latest)

    async def fetch_base(command: Update) -> dict[str, Any]:
        return base

    config = ConflictConfig(
        policy=ConflictResolutionPolicy.MERGE, on_conflict=OnMergeConflict.PREFER_INCOMING
    )
    await scenario.wrap(config=config, fetch_base_state=fetch_base)(Update(state=incoming))
    assert scenario.merged == [{"id": "a1", "version": 2, "status": "cancelled", "notes": "a"}]


async def test_conflict_hooks_report_detection_and_resolution(
    hooks: HookRegistry, events: list[Any]
) -> None:
    """A resolved conflict emits detected then resolved, naming policy and strategy."""
    scenario = Scenario(LATEST)
    await scenario.wrap(config=MERGE, hooks=hooks)(Update(state=INCOMING))
    assert [name for name, _ in events] == [
        "handler.conflict.detected",
        "handler.conflict.resolved",
    ]
    resolved = events[1][1]
    assert resolved["strategy"] == "deep"
    assert resolved["policy"] is ConflictResolutionPolicy.MERGE
    assert resolved["command.type"] == "Update"
    assert resolved["attempt"] == 1
    assert isinstance(resolved["error"], ConcurrencyError)


async def test_other_errors_pass_through_untouched() -> None:
    """Only ConcurrencyError triggers resolution; other errors propagate as they are."""

    async def broken(command: Update) -> str:
        raise KeyError("x")

    scenario = Scenario(LATEST)
    behavior = resolve_conflicts(
        scenario.fetch_latest_state, scenario.get_incoming_state, scenario.update_command
    )
    with pytest.raises(KeyError):
        await behavior(broken)(Update())
    assert scenario.merged == []


def test_bad_hooks_are_rejected() -> None:
    """Non-callable hooks and a non-ConflictConfig config fail up front."""
    with pytest.raises(TypeError, match="fetch_latest_state"):
        resolve_conflicts(1, dict, lambda c, m: c)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config"):
        resolve_conflicts(dict, dict, lambda c, m: c, config={"policy": "merge"})  # type: ignore[arg-type,arg-type]


def test_a_sync_handler_is_refused_when_decorated_and_never_called() -> None:
    """resolve_conflicts() awaits its handler: a sync one is a TypeError naming it, raised
    when decorating, before it could run (and write) once."""
    scenario = Scenario(LATEST)
    calls: list[Update] = []

    def save_order(command: Update) -> str:
        calls.append(command)
        return "done"

    with pytest.raises(TypeError, match=r"resolve_conflicts.*save_order is a sync function"):
        resolve_conflicts(
            scenario.fetch_latest_state, scenario.get_incoming_state, scenario.update_command
        )(save_order)
    assert calls == []


async def test_a_lambda_around_an_async_handler_is_resolved() -> None:
    """A lambda returning the async handler's coroutine is a handler like any other."""
    scenario = Scenario(LATEST)
    behavior = resolve_conflicts(
        scenario.fetch_latest_state,
        scenario.get_incoming_state,
        scenario.update_command,
        config=MERGE,
    )
    resolving = behavior(lambda command: scenario.handler(command))
    assert await resolving(Update(state=INCOMING)) == "done"
    assert len(scenario.seen) == 2


async def test_a_lambda_that_runs_a_sync_handler_is_a_type_error_naming_it() -> None:
    """A lambda whose call returns no awaitable is a TypeError naming it and saying it ran
    as a sync function, not "can't be used in 'await' expression"."""
    scenario = Scenario(LATEST)
    behavior = resolve_conflicts(
        scenario.fetch_latest_state, scenario.get_incoming_state, scenario.update_command
    )
    with pytest.raises(TypeError, match="<lambda> returned str, not an awaitable"):
        await behavior(lambda command: "done")(Update())


async def test_async_get_incoming_state_and_update_command_are_awaited() -> None:
    """Every hook may be async: an async get_incoming_state and update_command are awaited in
    each round, and the handler gets the rebuilt command."""
    scenario = Scenario(LATEST)

    async def get_incoming_state(command: Update) -> dict[str, Any]:
        return command.state

    async def update_command(command: Update, merged: dict[str, Any]) -> Update:
        return scenario.update_command(command, merged)

    behavior = resolve_conflicts(
        scenario.fetch_latest_state, get_incoming_state, update_command, config=MERGE
    )
    assert await behavior(scenario.handler)(Update(state=INCOMING)) == "done"
    assert (
        scenario.seen[1].state
        == scenario.merged[0]
        == {**LATEST, "meta": {"a": 1, "b": 3}, "notes": "gift"}
    )


# The reference's handler classes and examples, ported.


class Order(Aggregate):
    status: str = "pending"
    notes: str = ""
    items: list[dict[str, Any]] = msgspec.field(default_factory=list)
    created_at: str = "2024-01-01"

    def model_dump(self) -> dict[str, Any]:
        return self.to_dict()


class UpdateOrderCommand(Command[str], Retryable, ConflictResilient):
    order_id: str
    updates: dict[str, Any]
    retry_policy: FixedRetryPolicy = msgspec.field(
        default_factory=lambda: FixedRetryPolicy(max_retries=3, delay_ms=10, jitter=False)
    )
    conflict_config: ConflictConfig = msgspec.field(
        default_factory=lambda: ConflictConfig(
            policy=ConflictResolutionPolicy.MERGE,
            strategy_name="deep",
            append_lists=True,
            list_identity_key="product_id",
        )
    )


class UpdateOrderHandler(ResilientCommandHandler[str]):
    """Example 3 of the reference: the handler applies updates, including a stale version."""

    async def process(self, command: UpdateOrderCommand) -> CommandResponse[str]:
        orders = await self.dispatcher.retrieve([command.order_id], None)
        if not orders:
            raise ValueError(f"Order {command.order_id} not found")
        order = orders[0]
        for key, value in command.updates.items():
            if hasattr(order, key):
                setattr(order, key, value)
        await self.dispatcher.persist(order, None)
        return CommandResponse(result=order.id, events=[])

    async def fetch_latest_state(self, command: UpdateOrderCommand) -> dict[str, Any] | None:
        orders = await self.dispatcher.retrieve([command.order_id], None)
        return orders[0].model_dump() if orders else None

    def get_incoming_state(self, command: UpdateOrderCommand) -> dict[str, Any]:
        return command.updates

    def update_command(
        self, command: UpdateOrderCommand, merged_state: dict[str, Any]
    ) -> UpdateOrderCommand:
        return UpdateOrderCommand(
            order_id=command.order_id,
            updates=merged_state,
            retry_policy=command.retry_policy,
            conflict_config=command.conflict_config,
        )


@pytest.fixture
async def orders() -> InMemoryRepository[Order]:
    repository = InMemoryRepository(Order)
    await repository.persist(
        Order(id="order_123", items=[{"product_id": "p1", "qty": 1}]), command_id="create"
    )
    return repository


async def test_reference_example_3_full_resilience(
    orders: InMemoryRepository[Order], clock: FakeClock
) -> None:
    """A stale command conflicts, is deep-merged by product_id, retried, and succeeds."""
    await orders.persist(
        Order(
            id="order_123",
            version=1,
            status="processing",
            items=[{"product_id": "p1", "qty": 1}, {"product_id": "p2", "qty": 4}],
        )
    )
    handler = UpdateOrderHandler(FaultyRepository(orders, transient_rate=0.0), clock=clock)
    stale = UpdateOrderCommand(
        order_id="order_123",
        updates={
            "version": 1,
            "notes": "Express delivery",
            "items": [{"product_id": "p1", "qty": 3}],
        },
    )
    response = await handler.handle(stale)
    assert response.result == "order_123"
    final = (await orders.retrieve(["order_123"]))[0]
    assert final.version == 3
    assert final.status == "processing"
    assert final.notes == "Express delivery"
    assert final.items == [{"product_id": "p1", "qty": 3}, {"product_id": "p2", "qty": 4}]


async def test_reference_best_practice_test_conflict_resolution(
    orders: InMemoryRepository[Order],
) -> None:
    """The reference's "Test Conflict Resolution": the concurrent status stays, notes are added."""
    order2 = (await orders.retrieve(["order_123"]))[0]
    order2.status = "processing"
    await orders.persist(order2)
    command = UpdateOrderCommand(
        order_id="order_123",
        updates={"notes": "Customer request"},
        conflict_config=ConflictConfig(policy=ConflictResolutionPolicy.MERGE),
    )
    result = await UpdateOrderHandler(orders).handle(command)
    assert result.result == "order_123"
    final = (await orders.retrieve(["order_123"]))[0]
    assert final.status == "processing"
    assert final.notes == "Customer request"


class UpdateProfileCommand(Command[str], ConflictResilient):
    user_id: str
    updates: dict[str, Any]
    conflict_config: ConflictConfig = msgspec.field(
        default_factory=lambda: ConflictConfig(
            policy=ConflictResolutionPolicy.MERGE,
            strategy_name="field",
            include_fields={"name", "email", "preferences", "version"},
        )
    )


class User(Aggregate):
    name: str = ""
    email: str = ""
    role: str = "member"
    preferences: dict[str, Any] = msgspec.field(default_factory=dict)


class UpdateProfileHandler(ConflictCommandHandler[str]):
    """Example 2 of the reference."""

    async def process(self, command: UpdateProfileCommand) -> CommandResponse[str]:
        user = (await self.dispatcher.retrieve([command.user_id], None))[0]
        for key, value in command.updates.items():
            setattr(user, key, value)
        await self.dispatcher.persist(user, None)
        return CommandResponse(result=user.id)

    async def fetch_latest_state(self, command: UpdateProfileCommand) -> dict[str, Any] | None:
        users = await self.dispatcher.retrieve([command.user_id], None)
        return users[0].to_dict() if users else None

    def get_incoming_state(self, command: UpdateProfileCommand) -> dict[str, Any]:
        return command.updates

    def update_command(
        self, command: UpdateProfileCommand, merged_state: dict[str, Any]
    ) -> UpdateProfileCommand:
        return UpdateProfileCommand(
            user_id=command.user_id,
            updates=merged_state,
            conflict_config=command.conflict_config,
        )


async def test_reference_example_2_field_level_merge() -> None:
    """Only the included fields are taken from the command; role stays as stored."""
    users = InMemoryRepository(User)
    await users.persist(User(id="u1", name="Ada", email="ada@old"))
    await users.persist(User(id="u1", version=1, name="Ada", email="ada@old", role="admin"))
    command = UpdateProfileCommand(
        user_id="u1", updates={"version": 1, "email": "ada@new", "role": "member"}
    )
    assert (await UpdateProfileHandler(users).handle(command)).result == "u1"
    final = (await users.retrieve(["u1"]))[0]
    assert (final.version, final.email, final.role) == (3, "ada@new", "admin")


async def test_reference_example_4_custom_strategy_injected_into_a_handler(
    orders: InMemoryRepository[Order],
) -> None:
    """A registered custom strategy is used by name through the handler's registry."""
    registry = MergeStrategyRegistry()
    registry.register("custom_order", CustomOrderMergeStrategy)
    await orders.persist(Order(id="order_123", version=1, notes="kept"))
    command = UpdateOrderCommand(
        order_id="order_123",
        updates={"version": 1, "status": "shipped", "items": [{"product_id": "p9", "qty": 1}]},
        conflict_config=ConflictConfig(
            policy=ConflictResolutionPolicy.MERGE, strategy_name="custom_order"
        ),
    )
    handler = UpdateOrderHandler(orders, strategy_registry=registry)
    await handler.handle(command)
    final = (await orders.retrieve(["order_123"]))[0]
    assert final.status == "shipped"
    assert final.notes == "kept"
    assert final.items == [{"product_id": "p9", "qty": 1}]


def test_resilient_handler_puts_retry_outside_conflict_resolution() -> None:
    """retry -> resolve_conflicts -> process, as the contract says."""
    handler = UpdateOrderHandler(InMemoryRepository(Order))
    names = [type(b).__name__ for b in handler.behaviors]
    assert names == ["ResolveConflicts", "Retry"]  # the last added is the outermost
    assert issubclass(UpdateOrderHandler, ConflictResolutionMixin)


def test_merging_conflict_handlers_must_implement_the_state_methods() -> None:
    """A ConflictCommandHandler set to MERGE without the state methods cannot be built."""

    class Incomplete(ConflictCommandHandler[str]):
        conflict_config = MERGE

        async def process(self, command: Any) -> CommandResponse[str]:
            return CommandResponse()

    with pytest.raises(TypeError, match="fetch_latest_state"):
        Incomplete()


# Many writers at once, with the demo's full-state handler.


async def test_fifty_concurrent_writers_lose_nothing_and_apply_nothing_twice() -> None:
    """50 stale full-state writers with transient faults: every item lands once; version 51."""
    store = InMemoryRepository(DemoOrder)
    await store.persist(DemoOrder(id="o1"))
    faulty = FaultyRepository(store, transient_rate=0.2, timeout_after_commit_rate=0.1, seed=42)
    handler = AddLineItemHandler(faulty, clock=FakeClock())
    seen = (await store.retrieve(["o1"]))[0].to_dict()
    config = ConflictConfig(
        policy=ConflictResolutionPolicy.MERGE, list_identity_key="id", max_attempts=100
    )
    policy = FixedRetryPolicy(max_retries=50, delay_ms=1, jitter=False)
    commands = [
        AddLineItem(
            order_id="o1",
            expected_version=1,
            state={**seen, "items": [{"id": f"item-{i}", "by": i}]},
            retry_policy=policy,
            conflict_config=config,
        )
        for i in range(50)
    ]
    await asyncio.gather(*(handler.handle(c) for c in commands))
    final = (await store.retrieve(["o1"]))[0]
    assert sorted(item["id"] for item in final.items) == sorted(f"item-{i}" for i in range(50))
    assert final.version == 51
    assert faulty.injected_transient > 0
    assert faulty.injected_timeouts > 0
    assert handler.attempts > 50  # conflicts and faults really happened


async def test_functional_pipeline_gives_the_same_guarantees() -> None:
    """pipeline(retry(), resolve_conflicts(...)) on a plain function behaves like the class."""
    store = InMemoryRepository(DemoOrder)
    await store.persist(DemoOrder(id="o1"))
    faulty = FaultyRepository(store, transient_rate=0.3, timeout_after_commit_rate=0.2, seed=7)
    handler = AddLineItemHandler(faulty)
    config = ConflictConfig(
        policy=ConflictResolutionPolicy.MERGE, list_identity_key="id", max_attempts=50
    )

    @pipeline(
        retry(FixedRetryPolicy(max_retries=20, delay_ms=0), clock=FakeClock()),
        resolve_conflicts(
            handler.fetch_latest_state,
            handler.get_incoming_state,
            handler.update_command,
            fetch_base_state=handler.fetch_base_state,
        ),
    )
    async def add_item(command: AddLineItem) -> CommandResponse[str]:
        return await handler.process(command)

    seen = (await store.retrieve(["o1"]))[0].to_dict()
    await asyncio.gather(
        *(
            add_item(
                AddLineItem(
                    order_id="o1",
                    expected_version=1,
                    state={**seen, "items": [{"id": f"i{i}"}]},
                    retry_policy=FixedRetryPolicy(max_retries=20, delay_ms=0),
                    conflict_config=config,
                )
            )
            for i in range(20)
        )
    )
    final = (await store.retrieve(["o1"]))[0]
    assert sorted(item["id"] for item in final.items) == sorted(f"i{i}" for i in range(20))
    assert final.version == 21


class SlowRepository:
    """Every call suspends, as real I/O does, so concurrent writers really interleave."""

    def __init__(self, inner: InMemoryRepository[DemoOrder]) -> None:
        self.inner = inner

    async def retrieve(self, ids: list[str], uow: Any = None) -> list[DemoOrder]:
        await asyncio.sleep(0)
        return await self.inner.retrieve(ids)

    async def retrieve_version(self, aggregate_id: str, version: int) -> DemoOrder | None:
        await asyncio.sleep(0)
        return await self.inner.retrieve_version(aggregate_id, version)

    async def persist(self, aggregate: DemoOrder, uow: Any = None) -> DemoOrder:
        await asyncio.sleep(0)
        return await self.inner.persist(aggregate)


@pytest.mark.parametrize("per_request", [False, True], ids=["one handler", "handler per request"])
async def test_resolutions_take_turns_so_each_command_needs_about_two_attempts(
    per_request: bool,
) -> None:
    """30 stale writers on one aggregate: resolution rounds queue, not race (<= 2 attempts
    each), whether they share a handler or each has one built for its request."""
    store = InMemoryRepository(DemoOrder)
    await store.persist(DemoOrder(id="o1"))
    slow = SlowRepository(store)
    shared = AddLineItemHandler(slow)
    handlers = [AddLineItemHandler(slow) if per_request else shared for _ in range(30)]
    seen = (await store.retrieve(["o1"]))[0].to_dict()
    config = ConflictConfig(policy=ConflictResolutionPolicy.MERGE, list_identity_key="id")
    await asyncio.gather(
        *(
            handler.handle(
                AddLineItem(
                    order_id="o1",
                    expected_version=1,
                    state={**seen, "items": [{"id": f"i{i}"}]},
                    conflict_config=config,
                )
            )
            for i, handler in enumerate(handlers)
        )
    )
    assert (await store.retrieve(["o1"]))[0].version == 31
    assert sum(h.attempts for h in set(handlers)) <= 2 * 30


# --- what a command may ask for is bounded; protection only grows -----------------------------


class Hostile(Command[str], ConflictResilient):
    """A conflict-resilient command as it arrives from an HTTP body."""

    aggregate_id: str = "a1"
    state: dict[str, Any] = msgspec.field(default_factory=dict)


def hostile(body: dict[str, Any]) -> Hostile:
    return msgspec.json.decode(msgspec.json.encode(body), type=Hostile)


@pytest.mark.parametrize("policy", ["last_wins", "merge"])
async def test_a_command_cannot_switch_the_mass_assignment_guard_off(policy: str) -> None:
    """protected_fields=[] in a command adds nothing and removes nothing: id/version hold."""
    scenario = Scenario({"id": "a1", "version": 2, "status": "x"})
    command = hostile(
        {
            "state": {"id": "victim", "version": 999, "status": "y"},
            "conflict_config": {"policy": policy, "protected_fields": []},
        }
    )
    seen: list[dict[str, Any]] = []
    behavior = resolve_conflicts(
        scenario.fetch_latest_state,
        lambda c: c.state,
        lambda c, merged: seen.append(merged) or c,
    )
    await behavior(scenario.handler)(command)
    assert seen == [{"id": "a1", "version": 2, "status": "y"}]


async def test_a_command_adds_to_the_behaviors_protected_fields() -> None:
    """The behavior's protected fields and the command's both hold; neither replaces."""
    scenario = Scenario({"id": "a1", "version": 2, "owner": "ann", "plan": "free"})
    command = hostile(
        {
            "state": {"owner": "mallory", "plan": "gold", "note": "hi"},
            "conflict_config": {"policy": "last_wins", "protected_fields": ["plan"]},
        }
    )
    seen: list[dict[str, Any]] = []
    behavior = resolve_conflicts(
        scenario.fetch_latest_state,
        lambda c: c.state,
        lambda c, merged: seen.append(merged) or c,
        config=ConflictConfig(protected_fields={"owner"}),
    )
    await behavior(scenario.handler)(command)
    assert seen == [{"id": "a1", "version": 2, "owner": "ann", "plan": "free", "note": "hi"}]


async def test_a_command_cannot_ask_for_endless_resolution_rounds() -> None:
    """max_attempts=1000000000 from a command is capped at 10 resolution attempts, and the
    note says the cap stopped them."""
    scenario = Scenario(LATEST, conflicts=10**6)
    command = hostile({"conflict_config": {"policy": "merge", "max_attempts": 1_000_000_000}})
    behavior = resolve_conflicts(
        scenario.fetch_latest_state, lambda c: c.state, lambda c, merged: c
    )
    with pytest.raises(ConcurrencyError) as info:
        await behavior(scenario.handler)(command)
    assert len(scenario.seen) == 11  # the first attempt and 10 resolution attempts
    assert info.value.__notes__ == [
        "conflict not resolved after 10 resolution attempts: max_attempts_cap=10 caps the "
        "command's max_attempts=1000000000"
    ]


async def test_the_resolution_cap_is_settable_on_behavior_and_class() -> None:
    """max_attempts_cap bounds a command's rounds, on resolve_conflicts and handler classes."""
    command = hostile({"conflict_config": {"policy": "merge", "max_attempts": 50}})
    scenario = Scenario(LATEST, conflicts=10**6)
    behavior = resolve_conflicts(
        scenario.fetch_latest_state, lambda c: c.state, lambda c, s: c, max_attempts_cap=3
    )
    with pytest.raises(ConcurrencyError):
        await behavior(scenario.handler)(command)
    assert len(scenario.seen) == 4

    class Capped(ConflictCommandHandler[str]):
        max_attempts_cap = 2

        async def process(self, command: Any) -> CommandResponse[str]:
            raise ConcurrencyError(aggregate_id="a1")

        async def fetch_latest_state(self, command: Any) -> dict[str, Any]:
            return dict(LATEST)

        def get_incoming_state(self, command: Any) -> dict[str, Any]:
            return {}

        def update_command(self, command: Any, merged_state: dict[str, Any]) -> Any:
            self.rounds += 1
            return command

    handler = Capped()
    handler.rounds = 0
    with pytest.raises(ConcurrencyError):
        await handler.handle(command)
    assert handler.rounds == 2


async def test_the_behaviors_own_config_is_trusted() -> None:
    """A config written in code may ask for more rounds than the cap allows a command."""
    scenario = Scenario(LATEST, conflicts=15)
    config = ConflictConfig(policy=ConflictResolutionPolicy.MERGE, max_attempts=20)
    assert await scenario.wrap(config=config)(Update(state={})) == "done"
    assert len(scenario.seen) == 16


async def test_max_attempts_zero_means_no_resolution(
    events: list[Any], hooks: HookRegistry
) -> None:
    """ConflictConfig(max_attempts=0) is valid: the conflict propagates at once."""
    scenario = Scenario(LATEST)
    config = ConflictConfig(policy=ConflictResolutionPolicy.MERGE, max_attempts=0)
    with pytest.raises(ConcurrencyError) as info:
        await scenario.wrap(config=config, hooks=hooks)(Update(state={}))
    assert len(scenario.seen) == 1
    assert scenario.merged == []
    assert "max_attempts is 0" in str(info.value.__notes__)
    assert [name for name, _ in events] == ["handler.conflict.detected", "handler.conflict.failed"]


# --- three-way: protected fields are never conflicts ------------------------------------------


async def test_incoming_without_id_or_version_is_no_three_way_conflict() -> None:
    """A partial full state (no id/version) merges three-way without a false conflict."""
    store = InMemoryRepository(DemoOrder)
    base = await store.persist(DemoOrder(id="o1"))
    latest = await store.persist(msgspec.structs.replace(base, status="paid"))
    seen: list[dict[str, Any]] = []

    async def fetch_latest(command: Any) -> dict[str, Any]:
        return latest.to_dict()

    async def fetch_base(command: Any) -> dict[str, Any]:
        return base.to_dict()

    behavior = resolve_conflicts(
        fetch_latest,
        lambda c: {"status": "open", "items": [{"id": "i1"}]},
        lambda c, merged: seen.append(merged) or c,
        fetch_base_state=fetch_base,
        config=ConflictConfig(policy=ConflictResolutionPolicy.MERGE, list_identity_key="id"),
    )
    await behavior(Scenario(None).handler)(Update())
    assert seen == [{"id": "o1", "version": 2, "status": "paid", "items": [{"id": "i1"}]}]


async def test_a_stale_or_hostile_version_in_incoming_is_no_three_way_conflict() -> None:
    """Incoming's version differs from base and latest: still no conflict, latest's wins."""
    seen: list[dict[str, Any]] = []

    async def fetch_latest(command: Any) -> dict[str, Any]:
        return {"id": "o1", "version": 5, "status": "paid"}

    async def fetch_base(command: Any) -> dict[str, Any]:
        return {"id": "o1", "version": 1, "status": "open"}

    behavior = resolve_conflicts(
        fetch_latest,
        lambda c: {"id": "x", "version": 999, "status": "open", "note": "n"},
        lambda c, merged: seen.append(merged) or c,
        fetch_base_state=fetch_base,
        config=MERGE,
    )
    await behavior(Scenario(None).handler)(Update())
    assert seen == [{"id": "o1", "version": 5, "status": "paid", "note": "n"}]


# --- turns are the process's, not a handler instance's ----------------------------------------


async def test_turns_can_be_scoped_by_passing_your_own() -> None:
    """Behaviors given one Turns object share it; the process's turns are not used."""
    turns = Turns()
    behaviors = [
        resolve_conflicts(lambda c: None, lambda c: {}, lambda c, s: c, turns=turns)
        for _ in range(2)
    ]
    assert behaviors[0].turns is behaviors[1].turns is turns
    assert resolve_conflicts(lambda c: None, lambda c: {}, lambda c, s: c).turns is not turns
    async with turns.turn("a1"):
        assert "1 key" in repr(turns)


@pytest.mark.parametrize("config", [{"policy": "merge"}, "merge", 5])
async def test_a_command_config_that_is_no_config_is_a_type_error(config: Any) -> None:
    """A command's conflict_config is untrusted: one that is no ConflictConfig is a TypeError
    naming it, caused by the conflict it came to resolve, and nothing is written."""
    orders = InMemoryRepository(DemoOrder)
    stale = await orders.persist(DemoOrder(id="o"))
    latest = await orders.persist(stale)
    handler = AddLineItemHandler(orders, HookRegistry())
    command = AddLineItem(
        order_id="o",
        expected_version=stale.version,
        state={"id": "o", "version": stale.version, "items": [{"id": "x"}]},
        conflict_config=config,
    )
    with pytest.raises(TypeError, match=r"AddLineItem\.conflict_config must be") as info:
        await handler.handle(command)
    assert isinstance(info.value.__cause__, ConcurrencyError)
    assert await orders.retrieve(["o"]) == [latest]
