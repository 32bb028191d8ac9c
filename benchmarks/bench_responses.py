"""What `idempotent()` costs: a first send, and a resend answered from its recorded response.

One process, one event loop, one command at a time, on each store (in memory, SQLite, and
PostgreSQL with `CQRS_RESILIENCE_PG_DSN`). The command adds an item to an order of its own
(read, append, persist), so every send writes once. Timed side by side, in alternating rounds:

- **handler**: the function alone, in its command's scope (as `handle()`, `retry()` or any
  behaviour runs it: its write is recorded under the command's id);
- **handler + one write**: that, then one more write (what recording a response costs at the
  least: the yardstick of the contract, within 1.2x);
- **first send**: `idempotent(store)` around the function, each command new: a read that finds
  nothing, the function (whose write also claims the response), and the write that records it;
- **resend**: the same command again, answered from its recorded response;
- **one read**: `retrieve()` of one order, what a resend may cost at most.

Each figure is the median of the rounds' per-send means (µs).

    python benchmarks/bench_responses.py            # full run (about a minute)
    python benchmarks/bench_responses.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cqrs_resilience import Aggregate, Command, InMemoryRepository, command_scope, idempotent
from cqrs_resilience.stores import PostgresRepository, SQLiteRepository


class Order(Aggregate):
    items: list[str] = msgspec.field(default_factory=list)


class AddItem(Command[None]):
    order_id: str
    item: str


class Receipt(msgspec.Struct):
    version: int
    items: list[str]


Send = Callable[[AddItem], Awaitable[Any]]


def add_item(store: Any) -> Callable[[AddItem], Awaitable[Receipt]]:
    async def add(command: AddItem) -> Receipt:
        found = await store.retrieve([command.order_id])
        order = found[0] if found else Order(id=command.order_id)
        stored = await store.persist(msgspec.structs.replace(order, items=[command.item]))
        return Receipt(stored.version, stored.items)

    return add


def in_scope(send: Callable[[AddItem], Awaitable[Receipt]]) -> Send:
    async def scoped(command: AddItem) -> Receipt:
        with command_scope(command):
            return await send(command)

    return scoped


def commands(count: int) -> list[AddItem]:
    return [AddItem(order_id=uuid.uuid4().hex, item="tea") for _ in range(count)]


async def timed(send: Send, batch: list[AddItem]) -> float:
    """µs per send over the batch."""
    started = time.perf_counter()
    for command in batch:
        await send(command)
    return (time.perf_counter() - started) / len(batch) * 1e6


@asynccontextmanager
async def stores(sqlite_dir: str) -> AsyncIterator[list[tuple[str, Any]]]:
    memory = InMemoryRepository(Order)
    opened: list[tuple[str, Any]] = [("in memory", memory)]
    sqlite = SQLiteRepository(Path(sqlite_dir) / "bench.sqlite3", Order)
    await sqlite.open()
    opened.append(("SQLite", sqlite))
    dsn = os.environ.get("CQRS_RESILIENCE_PG_DSN")
    if dsn:
        postgres = PostgresRepository(dsn, Order, namespace=f"bench{uuid.uuid4().hex[:8]}")
        await postgres.open()
        opened.append(("PostgreSQL", postgres))
    try:
        yield opened
    finally:
        for _, store in opened:
            close = getattr(store, "close", None)
            if close is not None:
                await close()


async def measure(store: Any, rounds: int, per_round: int) -> dict[str, float]:
    handler = in_scope(add_item(store))
    answering = idempotent(store)(add_item(store))

    async def handler_and_a_write(command: AddItem) -> Receipt:
        receipt: Receipt = await handler(command)
        await store.persist(Order(id=command.order_id + "-2"))
        return receipt

    resent = commands(1)[0]
    await answering(resent)
    [read_id] = [resent.order_id]

    async def one_read(command: AddItem) -> Any:
        return await store.retrieve([read_id])

    rows: dict[str, Send] = {
        "handler": handler,
        "handler + one write": handler_and_a_write,
        "first send (idempotent)": answering,
        "resend (idempotent)": lambda command: answering(resent),
        "one read": one_read,
    }
    samples: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, send in rows.items():  # the same order every round: each sees the others
            samples[name].append(await timed(send, commands(per_round)))
    return {name: statistics.median(values) for name, values in samples.items()}


async def main(quick: bool) -> None:
    rounds, per_round = (3, 20) if quick else (9, 150)
    with tempfile.TemporaryDirectory() as folder:
        async with stores(folder) as opened:
            results = [(name, await measure(store, rounds, per_round)) for name, store in opened]
    print(f"`idempotent()`: µs per send, medians of {rounds} rounds of {per_round} sends\n")
    print(
        "| store | handler | handler + one write | first send | first send ÷ (handler + "
        "one write) | resend | one read | resend ÷ one read |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in results:
        first = row["first send (idempotent)"]
        yardstick = row["handler + one write"]
        resend = row["resend (idempotent)"]
        read = row["one read"]
        print(
            f"| {name} | {row['handler']:,.0f} | {yardstick:,.0f} | {first:,.0f} | "
            f"{first / yardstick:.2f}x | {resend:,.1f} | {read:,.1f} | {resend / read:.2f}x |"
        )
    print("\nTarget: first send ≤ 1.20x (handler + one write).")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    asyncio.run(main(parser.parse_args().quick))
