"""The lost update a two-way merge allows, and the three-way merge prevents.

python examples/lost_update.py
"""

from __future__ import annotations

import asyncio
from typing import Any

from cqrs_resilience import (
    Aggregate,
    Command,
    CommandResponse,
    ConflictConfig,
    ConflictResolutionPolicy,
    InMemoryRepository,
    MergeConflictError,
    pipeline,
    resolve_conflicts,
)


class Order(Aggregate):
    status: str = "pending"
    notes: str = ""


class SaveOrder(Command[int]):
    """A full-state command: the whole order as the client wants it, and the version it read."""

    order_id: str
    expected_version: int
    state: dict[str, Any]


def build(orders: InMemoryRepository[Order], *, three_way: bool) -> Any:
    async def fetch_latest_state(command: SaveOrder) -> dict[str, Any] | None:
        found = await orders.retrieve([command.order_id])
        return found[0].to_dict() if found else None

    async def fetch_base_state(command: SaveOrder) -> dict[str, Any] | None:
        base = await orders.retrieve_version(command.order_id, command.expected_version)
        return base.to_dict() if base else None

    def update_command(command: SaveOrder, merged: dict[str, Any]) -> SaveOrder:
        return SaveOrder(
            order_id=command.order_id, expected_version=merged["version"], state=merged
        )

    @pipeline(
        resolve_conflicts(
            fetch_latest_state,
            lambda command: command.state,
            update_command,
            fetch_base_state=fetch_base_state if three_way else None,
            config=ConflictConfig(policy=ConflictResolutionPolicy.MERGE),
        )
    )
    async def save_order(command: SaveOrder) -> CommandResponse[int]:
        fields = {k: v for k, v in command.state.items() if k not in ("id", "version")}
        order = Order(id=command.order_id, version=command.expected_version, **fields)
        return CommandResponse(result=(await orders.persist(order)).version)

    return save_order


async def race(three_way: bool) -> None:
    orders = InMemoryRepository(Order)
    v1 = await orders.persist(Order(id="o1"))
    save_order = build(orders, three_way=three_way)
    seen_by_a, seen_by_b = v1.to_dict(), v1.to_dict()

    # Writer A moves the order on; writer B, still looking at v1, adds a note.
    await save_order(
        SaveOrder(order_id="o1", expected_version=1, state={**seen_by_a, "status": "processing"})
    )
    await save_order(
        SaveOrder(order_id="o1", expected_version=1, state={**seen_by_b, "notes": "gift wrap"})
    )

    final = (await orders.retrieve(["o1"]))[0]
    kind = "three-way" if three_way else "two-way"
    lost = "  <- A's change is LOST" if final.status != "processing" else ""
    print(f"{kind:>9} merge: status={final.status!r}, notes={final.notes!r}{lost}")


async def both_change_status() -> None:
    orders = InMemoryRepository(Order)
    v1 = (await orders.persist(Order(id="o1"))).to_dict()
    save_order = build(orders, three_way=True)
    await save_order(
        SaveOrder(order_id="o1", expected_version=1, state={**v1, "status": "shipped"})
    )
    try:
        await save_order(
            SaveOrder(order_id="o1", expected_version=1, state={**v1, "status": "cancelled"})
        )
    except MergeConflictError as exc:
        for conflict in exc.conflicts:
            print(
                f"  conflict at {conflict.path}: base={conflict.base!r}, "
                f"current={conflict.current!r}, incoming={conflict.incoming!r}"
            )


async def main() -> None:
    await race(three_way=False)
    await race(three_way=True)
    print("When both writers change the same field, the three-way merge says so:")
    await both_change_status()


if __name__ == "__main__":
    asyncio.run(main())
