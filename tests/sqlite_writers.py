"""Writers of one SQLite file for the store tests: another process, another program."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import msgspec
import pytest

from cqrs_resilience import ConcurrencyError, ConflictConfig, ConflictResolutionPolicy
from cqrs_resilience._demo import AddLineItem, DemoOrder
from cqrs_resilience.stores import SQLiteRepository

MERGE = ConflictConfig(
    policy=ConflictResolutionPolicy.MERGE, list_identity_key="id", max_attempts=10
)


def with_item(order: DemoOrder, item: str) -> DemoOrder:
    return DemoOrder(id=order.id, version=order.version, items=[*order.items, {"id": item}])


async def add_item(store: SQLiteRepository[DemoOrder], order_id: str, item: str) -> DemoOrder:
    """Read the order, add an item, write it: one acknowledged write (or an error)."""
    [order] = await store.retrieve([order_id])
    return await store.persist(with_item(order, item))


def add_item_command(seen: DemoOrder, item: str) -> AddLineItem:
    """A full-state command adding `item` to the order as it was `seen`."""
    state = {"id": seen.id, "version": seen.version, "items": [*seen.items, {"id": item}]}
    return AddLineItem(
        order_id=seen.id, expected_version=seen.version, state=state, conflict_config=MERGE
    )


def items_of(order: DemoOrder) -> list[str]:
    return [item["id"] for item in order.items]


@contextmanager
def another_process(path: Path) -> Iterator[sqlite3.Connection]:
    """Another process's connection to the file; any transaction it began is rolled back
    when the block ends."""
    with closing(sqlite3.connect(path, isolation_level=None, check_same_thread=False)) as conn:
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")


def take_the_write_lock(conn: sqlite3.Connection) -> None:
    if not conn.in_transaction:
        conn.execute("BEGIN IMMEDIATE")


def write_elsewhere(path: Path, order: DemoOrder, item: str) -> None:
    """Another process writes the order's next version with a plain INSERT, as a program
    that does not use this library (and so heeds nothing of it) would."""
    written = DemoOrder(id=order.id, version=order.version + 1, items=[*order.items, {"id": item}])
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute(
            "INSERT INTO aggregate_versions (aggregate_id, version, state) VALUES (?, ?, ?)",
            (f"DemoOrder:{order.id}", written.version, msgspec.msgpack.encode(written)),
        )


async def lose_a_resolution(store: SQLiteRepository[DemoOrder], path: Path, order_id: str) -> None:
    """A conflict resolution of `store` loses to another process (writing between its read
    and its write): the aggregate is contested from then on."""
    async with store.turn(order_id):
        [read] = await store.retrieve([order_id])
        write_elsewhere(path, read, f"elsewhere-{uuid.uuid4().hex[:6]}")
        with pytest.raises(ConcurrencyError):
            await store.persist(with_item(read, "lost"))
