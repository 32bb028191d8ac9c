"""An app for the queue tests: orders on PostgreSQL, one command (add an item) as a
procrastinate task. Importable by worker processes, which build the same app."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import procrastinate

from cqrs_resilience import (
    Aggregate,
    Command,
    ConcurrencyError,
    FixedRetryPolicy,
    TransientError,
    retry,
)
from cqrs_resilience.contrib.procrastinate import CommandTask, JobRetry, command_task
from cqrs_resilience.stores import PostgresRepository


class Order(Aggregate):
    items: list[str] = msgspec.field(default_factory=list)


class AddItem(Command[None]):
    order_id: str
    item: str


class Faults:
    """What the handler does besides adding the item, per item (set by a test)."""

    def __init__(self) -> None:
        self.fail_first: dict[str, int] = {}  # item -> runs that raise TransientError first
        self.fail_after_write: dict[str, int] = {}  # item -> runs that raise once written
        self.broken: set[str] = set()  # items whose runs raise ValueError (a bug)
        self.broken_after_write: set[str] = set()  # ... the same, once the item is written
        self.runs: dict[str, int] = {}
        self.work_s = 0.0  # time a run takes after its write (to be caught in the middle)
        self.pause_before_write: Any = None  # async callables a run awaits with its item
        self.pause_after_write: Any = None


def orders_app(
    dsn: str, *, lock: bool = False
) -> tuple[procrastinate.App, CommandTask[AddItem], Any]:
    """(the procrastinate app, the task adding items, the orders store, the faults)."""
    orders = PostgresRepository(dsn, Order, max_size=4)
    faults = Faults()

    @retry(on=(ConcurrencyError,), policy=FixedRetryPolicy(max_retries=100, delay_ms=1))
    async def add_item(command: AddItem) -> None:
        item = command.item
        faults.runs[item] = faults.runs.get(item, 0) + 1
        if faults.fail_first.get(item, 0) > 0:
            faults.fail_first[item] -= 1
            raise TransientError(f"{item}: the store is down for now")
        if item in faults.broken:
            raise ValueError(f"{item}: a bug in the handler")
        if faults.pause_before_write is not None:
            await faults.pause_before_write(item)
        found = await orders.retrieve([command.order_id])
        order = found[0] if found else Order(id=command.order_id)
        await orders.persist(msgspec.structs.replace(order, items=[*order.items, item]))
        if faults.pause_after_write is not None:
            await faults.pause_after_write(item)
        if faults.work_s:
            await asyncio.sleep(faults.work_s)
        if item in faults.broken_after_write:
            raise ValueError(f"{item}: a bug in the handler, after the write")
        if faults.fail_after_write.get(item, 0) > 0:
            faults.fail_after_write[item] -= 1
            raise TransientError(f"{item}: committed, then the reply was lost")

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
    task = command_task(
        app,
        add_item,
        AddItem,
        retry=JobRetry(wait_s=0.0),
        lock=(lambda command: command.order_id) if lock else None,
    )
    return app, task, (orders, faults)
