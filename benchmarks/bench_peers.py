"""Peers: our write path against the raw driver's floor, SQLAlchemy + tenacity and eventsourcing.

One workload, every side in the same run: "add a line item to order X" as a delta command
(read the order, append, write at the version read; on a conflict, run again), the orders
starting with 50 items at version 1. What each side does per command is in
`_peers_sides.py`; how their stores are kept apart and restored, in `_peers_common.py`.

Rows, on SQLite (WAL, `synchronous=FULL`, every side) and PostgreSQL (the tests' throwaway
server, `fsync=off`, or the one `--dsn` / `CQRS_RESILIENCE_PG_DSN` names):

- **hot, 1 writer** and **hot, 8 writers**: 1,000 commands on one order, from writer tasks in
  one process (eventsourcing, which is synchronous, hands each task's commands to a thread);
- **Zipf, 8 writers**: 4,000 commands over 10,000 orders whose popularity follows a Zipf
  distribution (s = 1.1, ranks shuffled over the ids), dealt round-robin to 8 writer tasks.

Each run opens the side's store (a repository, a pool, an engine, an application), warms it
up on an order of its own (3 commands per writer, not timed), then times the row's commands:
from the first command's start to the last one's end. A command's latency runs from its
start to its return, retries and waits for a connection included. After every run the
stored orders are checked: every item present exactly once, the version one more per item.
`--runs N` runs each row N times, the sides taking turns to go first; the table shows each
side's median commands/s with the lowest and highest, and its ratio to ours (ours / side,
from the same run: above 1 means ours is faster), the median of the runs' ratios with their
spread. eventsourcing runs in each of its modes; the summary takes its best per row.

Then the resend check: each side gets the same command (the same command id) twice, as a
client that did not hear the answer sends it again; which sides applied it twice.

`--profile` times and counts ours against the floor per row instead (see `_peers_profile.py`).

    python benchmarks/bench_peers.py                     # SQLite and PostgreSQL, --runs 1
    python benchmarks/bench_peers.py --runs 3            # medians of 3 alternating runs
    python benchmarks/bench_peers.py --quick --sqlite-only
    python benchmarks/bench_peers.py --profile --rows hot-1,zipf
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _peers_common import (
    Database,
    LineItem,
    PostgresDatabase,
    Side,
    SQLiteDatabase,
    Stored,
    check_sqlite_default,
    seed_items,
)
from _peers_records import FloorRecords
from _peers_sides import EventsourcingSide, Floor, Ours, SQLAlchemySide, es_modes

ENV_DSN = "CQRS_RESILIENCE_PG_DSN"
ZIPF_S = 1.1
HOT_ID = "hot"
WARM_ID = "warm"
WARM_COMMANDS = 3  # per writer, before the clock starts
SEED = 1


class Command(msgspec.Struct, frozen=True):
    order_id: str
    item: LineItem
    command_id: str


Plan = list[list[Command]]  # per writer task: its commands in order


class RowSpec(msgspec.Struct, frozen=True):
    key: str  # "hot-1", "hot-8", "zipf"
    label: str
    writers: int
    commands: int


class Outcome(msgspec.Struct, frozen=True):
    """One side's run of one row."""

    commands: int
    elapsed_s: float
    attempts: list[int]
    latencies_ms: list[float]

    @property
    def rate(self) -> float:
        return self.commands / self.elapsed_s

    @property
    def attempts_per_command(self) -> float:
        return sum(self.attempts) / self.commands

    def latency_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- loads -----------------------------------------------------------------------------------


def order_ids(count: int) -> list[str]:
    return [f"order-{n:05d}" for n in range(count)]


def new_item(n: int, prefix: str = "c") -> LineItem:
    return LineItem(id=f"{prefix}{n}", sku=f"sku-{n % 97}", quantity=1 + n % 5)


def zipf_plan(orders: int, commands: int, writers: int) -> Plan:
    """`commands` commands over `orders` orders, popularity Zipf(s) over the shuffled ids,
    dealt round-robin to the writers."""
    rng = random.Random(SEED)
    ids = order_ids(orders)
    rng.shuffle(ids)  # popularity has nothing to do with key order
    cumulative = list(itertools.accumulate(rank**-ZIPF_S for rank in range(1, orders + 1)))
    chosen = rng.choices(ids, cum_weights=cumulative, k=commands)
    sequence = [Command(o, new_item(n), f"zipf-{n}") for n, o in enumerate(chosen)]
    return [sequence[w::writers] for w in range(writers)]


def hot_plan(writers: int, commands: int) -> Plan:
    sequence = [Command(HOT_ID, new_item(n), f"hot-{n}") for n in range(commands)]
    return [sequence[w::writers] for w in range(writers)]


def plan_for(row: RowSpec, orders: int) -> Plan:
    if row.key == "zipf":
        return zipf_plan(orders, row.commands, row.writers)
    return hot_plan(row.writers, row.commands)


def warm_plan(writers: int) -> Plan:
    return [
        [Command(WARM_ID, new_item(w * 100 + k, "warm-"), f"warm-{w}-{k}") for k in range(3)]
        for w in range(writers)
    ]


# --- one run ---------------------------------------------------------------------------------


async def _run(db: Database, side: Side, plan: Plan) -> Outcome:
    writer = await side.open(db, len(plan))
    attempts: list[int] = []
    latencies_ms: list[float] = []

    async def task(commands: list[Command], timed: bool) -> None:
        for c in commands:
            began = time.perf_counter()
            tried = await writer.add(c.order_id, c.item, c.command_id)
            if timed:
                latencies_ms.append((time.perf_counter() - began) * 1000)
                attempts.append(tried)

    try:
        await asyncio.gather(*(task(commands, False) for commands in warm_plan(len(plan))))
        started = time.perf_counter()
        await asyncio.gather(*(task(commands, True) for commands in plan))
        elapsed = time.perf_counter() - started
    finally:
        await writer.close()
    return Outcome(
        commands=len(latencies_ms), elapsed_s=elapsed, attempts=attempts, latencies_ms=latencies_ms
    )


def run_side(db: Database, side: Side, plan: Plan) -> Outcome:
    """Restore the side's store, run the plan, check every item landed exactly once."""
    asyncio.run(db.restore(side))
    gc.collect()
    outcome = asyncio.run(_run(db, side, plan))
    check_stored(db, side, [*plan, *warm_plan(len(plan))])
    return outcome


def check_stored(db: Database, side: Side, plan: Plan) -> None:
    """Every order the plan touched: its seed items and each new item exactly once, and its
    version one more per item added."""
    added: dict[str, list[str]] = {}
    for command in (c for commands in plan for c in commands):
        added.setdefault(command.order_id, []).append(command.item.id)
    stored = asyncio.run(side.stored(db, list(added)))
    seeded = [i.id for i in seed_items()]
    for order_id, items in added.items():
        found = stored.get(order_id, Stored(version=0, item_ids=[]))
        expected = Counter([*seeded, *items])
        if Counter(found.item_ids) != expected or found.version != 1 + len(items):
            doubled = sorted(i for i, n in Counter(found.item_ids).items() if n > 1)
            missing = sorted(set(expected) - set(found.item_ids))
            raise AssertionError(
                f"{db.name}, {side.name}: order {order_id!r} at version {found.version} holds "
                f"{len(found.item_ids)} items, expected {sum(expected.values())} at version "
                f"{1 + len(items)}; missing {missing[:5]}, doubled {doubled[:5]}"
            )


# --- the resend check ---------------------------------------------------------------------


def resend(db: Database, side: Side) -> int:
    """How many times one command sent twice (same command id) landed in the order."""
    asyncio.run(db.restore(side))
    command = Command(HOT_ID, new_item(0, "resent-"), "resent-command")

    async def send_twice() -> None:
        writer = await side.open(db, 1)
        try:
            for _ in range(2):  # the client did not hear the first answer
                await writer.add(command.order_id, command.item, command.command_id)
        finally:
            await writer.close()

    asyncio.run(send_twice())
    stored = asyncio.run(side.stored(db, [HOT_ID]))[HOT_ID]
    return stored.item_ids.count(command.item.id)


# --- many runs, one table ------------------------------------------------------------------


class RowResult(msgspec.Struct):
    db: str
    row: RowSpec
    runs: dict[str, list[Outcome]]  # side name -> one outcome per run, in run order


def compare(db: Database, sides: Sequence[Side], row: RowSpec, plan: Plan, runs: int) -> RowResult:
    result = RowResult(db=db.name, row=row, runs={side.name: [] for side in sides})
    for n in range(runs):
        # A drift in the shared machine's speed favours no side: each goes first in turn.
        shift = n % len(sides)
        for side in [*sides[shift:], *sides[:shift]]:
            outcome = run_side(db, side, plan)
            result.runs[side.name].append(outcome)
            print(
                f"  ({db.name} {row.label}, run {n + 1}: {side.name} {outcome.rate:,.0f} cmd/s, "
                f"{outcome.attempts_per_command:.2f} attempts per command)",
                file=sys.stderr,
                flush=True,
            )
    return result


def median_outcome(outcomes: list[Outcome]) -> Outcome:
    return sorted(outcomes, key=lambda o: o.rate)[len(outcomes) // 2]


def ratios(result: RowResult, side: str) -> list[float]:
    """ours / side, run by run."""
    ours = result.runs[Ours.name]
    return [o.rate / s.rate for o, s in zip(ours, result.runs[side], strict=True)]


def _spread(values: list[float], fmt: str, unit: str = "") -> str:
    """The median, and the lowest and highest when there are several."""
    median = f"{statistics.median(values):{fmt}}{unit}"
    if len(values) == 1:
        return median
    return f"{median} ({min(values):{fmt}}-{max(values):{fmt}})"


def _ms(value: float) -> str:
    return (
        f"{value:.2f} ms"
        if value < 10
        else f"{value:.1f} ms"
        if value < 100
        else f"{value:,.0f} ms"
    )


HEADER = (
    "| row | side | commands/s | attempts per command (max) | p50 | p99 | ours / side |\n"
    "|---|---|---:|---:|---:|---:|---:|"
)


def format_rows(result: RowResult) -> list[str]:
    lines = []
    for side, outcomes in result.runs.items():
        median = median_outcome(outcomes)
        rate = _spread([o.rate for o in outcomes], ",.0f")
        ratio = "1" if side == Ours.name else _spread(ratios(result, side), ".2f", "x")
        lines.append(
            f"| {result.db}, {result.row.label} | {side} | {rate} "
            f"| {median.attempts_per_command:.2f} ({max(median.attempts)}) "
            f"| {_ms(median.latency_ms(0.5))} | {_ms(median.latency_ms(0.99))} | {ratio} |"
        )
    return lines


def best_es(result: RowResult) -> str | None:
    """The eventsourcing mode with the highest median commands/s in this row."""
    modes = [s for s in result.runs if s.startswith("eventsourcing")]
    if not modes:
        return None
    return max(modes, key=lambda s: statistics.median(o.rate for o in result.runs[s]))


def format_summary(results: list[RowResult]) -> str:
    lines = [
        "| row | ours (cmd/s) | ours vs SQLAlchemy + tenacity | ours vs eventsourcing "
        "(best mode) | ours vs the floor | ours vs the floor + our records |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        ours = statistics.median(o.rate for o in result.runs[Ours.name])
        cells = []
        for side in (SQLAlchemySide.name, best_es(result), Floor.name, FloorRecords.name):
            if side is None or side not in result.runs:
                cells.append("-")
                continue
            mode = side.removeprefix("eventsourcing ") + " " if side.startswith("event") else ""
            cells.append(f"{mode}{_spread(ratios(result, side), '.2f', 'x')}")
        lines.append(f"| {result.db}, {result.row.label} | {ours:,.0f} | {' | '.join(cells)} |")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres(args: argparse.Namespace) -> Iterator[PostgresDatabase | None]:
    """The PostgreSQL database the run uses, its bench schemas dropped at the start and end;
    None with --sqlite-only, or (in --quick) when no server can be started."""
    if args.sqlite_only:
        yield None
        return
    with contextlib.ExitStack() as stack:
        if args.dsn:
            dsn = args.dsn
        else:
            from tests.pg_server import PostgresServer, PostgresUnavailableError

            try:
                dsn = stack.enter_context(PostgresServer())
            except PostgresUnavailableError as exc:
                if not args.quick:
                    raise
                print(f"  (PostgreSQL skipped: {exc})", file=sys.stderr)
                yield None
                return
        db = PostgresDatabase(dsn=dsn)
        asyncio.run(db.drop_all())
        try:
            yield db
        finally:
            asyncio.run(db.drop_all())


def sides_for(db: Database, args: argparse.Namespace, load: str | None = None) -> list[Side]:
    """The sides of a row of `load` ("hot", "zipf"; None: of any row) on `db`."""
    modes = [m for m in args.es_modes or es_modes(db, load) if m in es_modes(db, load)]
    sides: list[Side] = [
        Ours(),
        Floor(),
        FloorRecords(),
        SQLAlchemySide(),
        *(EventsourcingSide(m) for m in modes),
    ]
    if args.sides is None:
        return sides
    # eventsourcing's modes answer to "eventsourcing" as a whole
    es = "eventsourcing" in args.sides
    return [s for s in sides if s.key in args.sides or (es and s.key.startswith("es_"))]


def seed(db: Database, sides: Sequence[Side], ids: list[str]) -> None:
    for side in sides:
        began = time.perf_counter()
        asyncio.run(db.reset(side))
        asyncio.run(side.seed(db, ids))
        asyncio.run(db.snapshot(side))
        took = time.perf_counter() - began
        print(
            f"  ({db.name}: {side.name} seeded {len(ids):,} orders in {took:.1f} s)",
            file=sys.stderr,
        )


def rows_for(args: argparse.Namespace) -> list[RowSpec]:
    hot, zipf = (100, 400) if args.quick else (1_000, 4_000)
    hot, zipf = args.hot_commands or hot, args.commands or zipf
    rows = [
        RowSpec(key="hot-1", label="hot, 1 writer", writers=1, commands=hot),
        RowSpec(key="hot-8", label="hot, 8 writers", writers=8, commands=hot),
        RowSpec(key="zipf", label="Zipf, 8 writers", writers=8, commands=zipf),
    ]
    return [row for row in rows if args.rows is None or row.key in args.rows]


def main(args: argparse.Namespace) -> None:
    began, load = time.perf_counter(), _load()
    check_sqlite_default()
    orders = args.orders or (1_000 if args.quick else 10_000)
    rows = rows_for(args)
    results: list[RowResult] = []
    resent: list[tuple[str, str, int]] = []
    with tempfile.TemporaryDirectory() as folder, postgres(args) as pg:
        databases: list[Database] = [] if args.pg_only else [SQLiteDatabase(folder=folder)]
        if pg is not None:
            databases.append(pg)
        for db in databases:
            sides = sides_for(db, args)
            if args.profile:
                from _peers_profile import profile_rows

                sides = [side for side in sides if side.key in ("ours", "floor")]
                seed(db, sides, [*order_ids(orders), HOT_ID, WARM_ID])
                plans = [(row, plan_for(row, orders), warm_plan(row.writers)) for row in rows]
                profile_rows(db, sides, plans)
                continue
            seed(db, sides, [*order_ids(orders), HOT_ID, WARM_ID])
            for row in rows:
                row_sides = sides_for(db, args, row.key.split("-")[0])
                results.append(compare(db, row_sides, row, plan_for(row, orders), args.runs))
            resent += [(db.name, side.name, resend(db, side)) for side in sides]
    if args.profile:
        return

    zipf = ""
    for row in (r for r in rows if r.key == "zipf"):
        touched = Counter(c.order_id for w in plan_for(row, orders) for c in w)
        zipf = (
            f"; Zipf: s = {ZIPF_S} over {orders:,} orders ({len(touched):,} touched, the "
            f"hottest {max(touched.values())} times)"
        )
    print(
        f"\nAdd a line item (delta command), orders starting with 50 items; {args.runs} run(s) "
        f"per side and row, sides alternating{zipf}. commands/s: median (lowest-highest); "
        "latency and attempts: the median run's.\n"
    )
    print(HEADER)
    for result in results:
        print("\n".join(format_rows(result)))
    print("\nSummary: ours / side, median of the runs' ratios (lowest-highest)\n")
    print(format_summary(results))
    print("\nResend: the same command (same command id) sent twice\n")
    print("| database | side | times applied |\n|---|---|---:|")
    for db_name, side_name, times in resent:
        print(f"| {db_name} | {side_name} | {times}{' (twice)' if times > 1 else ''} |")
    took = time.perf_counter() - began
    print(
        f"\n({took:.0f} s; load average (1, 5, 15 min) at the start {load}, at the end {_load()})"
    )


def _load() -> str:
    return ", ".join(f"{n:.2f}" for n in os.getloadavg())


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--sqlite-only", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--pg-only", action="store_true", help="skip SQLite")
    parser.add_argument(
        "--sides",
        type=_names,
        help="sides to run: ours, floor, floor_records, sqlalchemy, eventsourcing",
    )
    parser.add_argument("--dsn", default=os.environ.get(ENV_DSN), help="PostgreSQL to use")
    parser.add_argument("--runs", type=int, default=1, help="runs per side and row (median)")
    parser.add_argument("--orders", type=int, help="orders of the Zipf rows (default 10,000)")
    parser.add_argument("--commands", type=int, help="commands per Zipf row (default 4,000)")
    parser.add_argument("--hot-commands", type=int, help="commands per hot row (default 1,000)")
    parser.add_argument("--rows", type=_names, help="rows to run: hot-1, hot-8, zipf")
    parser.add_argument(
        "--es-modes", type=_names, help="eventsourcing modes (default: every one; --quick: cache)"
    )
    parser.add_argument("--profile", action="store_true", help="profile ours against the floor")
    args = parser.parse_args()
    if args.quick and args.es_modes is None:
        args.es_modes = ["cache"]
    main(args)
