"""Contention: optimistic writes with a three-way MERGE against pessimistic locking.

Two loads, each run by the optimistic side (the library: `ResilientCommandHandler` + MERGE
over `SQLiteRepository` / `PostgresRepository`) and by the pessimistic side (the usual
hand-written lock: `BEGIN IMMEDIATE` / `SELECT ... FOR UPDATE`), on SQLite and on PostgreSQL.
Every command adds one line item to an order; `_contention_sides.py` says what each side does
per command and how both are kept equally careful.

- **One hot aggregate**: 1 and 8 writer tasks (`--writers`) in one process, all on one order.
- **Zipf load**: 10,000 orders whose popularity follows a Zipf distribution (s = 1.1, the
  ranks shuffled over the ids), from 1, 4 and 8 worker processes with 8 writer tasks each, as
  a service would run. One seeded sequence of commands is dealt round-robin to the writer
  tasks; both sides get the same sequence and the same deal.

The orders exist before the clock starts: each side creates them through its own write path
(the library's `persist`, a plain INSERT) into a fresh store, kept as a snapshot and restored
before every run. Workers are processes (multiprocessing "spawn", the hot aggregate's one
too), started once per row; for each run every worker opens its own store — a repository, a
connection, a pool — and all start together behind a barrier. A run's time goes from the
first worker's start to the last one's end; a command's latency from the writer task starting
it (the optimistic side's read included) to its return, waits for a connection or a lock
included. Each side runs `--repeat` times per row (3), the sides taking turns to go first;
the table shows each side's median run, stderr every run.

Reported per row: commands/s; attempts per command, on average and the most one command
took (the handler's `process` calls; the pessimistic side makes exactly one transaction per
command); p50 and p99 latency; the side's store size at the end (SQLite: the database file
plus its -wal once the workers have closed their connections; PostgreSQL:
`pg_total_relation_size` of the side's tables); and the optimistic / pessimistic throughput
ratio. After every run the stored orders are checked: every item present exactly once, each
version one more than the item count.

What the sides do not share, on purpose: the optimistic side keeps every version and a
record of every command (idempotency) and checks each state reads back; the pessimistic side
overwrites the row in place and remembers nothing, so its store stays small, and a command
retried after a lost reply would add its item twice. PostgreSQL runs in a schema of its own,
`cqrs_contention_bench`, dropped at the start and the end; the throwaway server has fsync
off, which takes the same cost off every commit of either side.

    python benchmarks/bench_contention.py                 # SQLite and PostgreSQL (a throwaway
                                                          # server, or CQRS_RESILIENCE_PG_DSN)
    python benchmarks/bench_contention.py --quick --sqlite-only
    python benchmarks/bench_contention.py --processes 1,2 --commands 2000 --writers 1,8,32
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import queue
import random
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _contention_sides import SIDES, PostgresStore, Side, SQLiteStore, Store

AGGREGATES = 10_000
ZIPF_S = 1.1
HOT_ID = "hot"
CONNECTIONS_PER_PROCESS = 8  # PostgreSQL pool size, both sides (SQLite: always one)
BARRIER_TIMEOUT_S = 120.0

Command = tuple[str, str]  # (order id, item id)
Plan = list[list[list[Command]]]  # per process, per writer task: its commands in order


class WorkerRun(msgspec.Struct, kw_only=True):
    """What one worker process did, or why it could not."""

    started: float = 0.0
    ended: float = 0.0
    attempts: int = 0
    most_attempts: int = 0
    latencies_ms: list[float] = msgspec.field(default_factory=list)
    error: str | None = None


class Outcome(msgspec.Struct, kw_only=True, frozen=True):
    """One side's result in one row."""

    commands: int
    elapsed_s: float
    attempts: int
    most_attempts: int  # by one command
    latencies_ms: list[float]
    size_bytes: int

    @property
    def rate(self) -> float:
        return self.commands / self.elapsed_s

    def latency_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Row(msgspec.Struct, kw_only=True, frozen=True):
    store: str
    load: str  # "hot" or "zipf"
    processes: int
    writers: int
    optimistic: Outcome
    pessimistic: Outcome

    @property
    def ratio(self) -> float:
        return self.optimistic.rate / self.pessimistic.rate


# --- loads ------------------------------------------------------------------------------


def order_ids() -> list[str]:
    return [f"order-{n:05d}" for n in range(AGGREGATES)]


def zipf_orders(commands: int, seed: int) -> list[str]:
    """The orders `commands` commands go to, popularity Zipf(s) over the shuffled ids."""
    rng = random.Random(seed)
    ids = order_ids()
    rng.shuffle(ids)  # popularity has nothing to do with key order
    cumulative = list(itertools.accumulate(rank**-ZIPF_S for rank in range(1, AGGREGATES + 1)))
    return rng.choices(ids, cum_weights=cumulative, k=commands)


def zipf_plan(orders: list[str], processes: int, tasks: int) -> Plan:
    """The sequence dealt round-robin to `processes` x `tasks` writer tasks."""
    writers = processes * tasks
    commands = [(order_id, f"c{n}") for n, order_id in enumerate(orders)]
    dealt = [commands[w::writers] for w in range(writers)]
    return [dealt[p * tasks : (p + 1) * tasks] for p in range(processes)]


def hot_plan(writers: int, per_writer: int) -> Plan:
    return [[[(HOT_ID, f"w{w}-{n}") for n in range(per_writer)] for w in range(writers)]]


# --- one side, one row, in worker processes -----------------------------------------------


class Workers:
    """Spawned worker processes kept for one row; each run hands every one its writer tasks."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.barrier = context.Barrier(processes, timeout=BARRIER_TIMEOUT_S)
        self.results = context.Queue()
        self.inboxes = [context.Queue() for _ in range(processes)]
        self.processes = [
            context.Process(target=_serve, args=(inbox, self.barrier, self.results), daemon=True)
            for inbox in self.inboxes
        ]
        for process in self.processes:
            process.start()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for process in self.processes:
            process.join(timeout=30)

    def run(self, store: Store, side: Side, plan: Plan) -> list[WorkerRun]:
        for inbox, tasks in zip(self.inboxes, plan, strict=True):
            inbox.put((store, side, tasks))
        runs: list[WorkerRun] = []
        while len(runs) < len(plan):
            try:
                runs.append(msgspec.msgpack.decode(self.results.get(timeout=1.0), type=WorkerRun))
            except queue.Empty:
                if not all(process.is_alive() for process in self.processes):
                    runs.append(WorkerRun(error="a worker process died"))
                    break
        errors = [run.error for run in runs if run.error]
        if errors:
            raise RuntimeError(f"{store.name}, {side} side: {'; '.join(errors)}")
        return runs


def _serve(inbox: Any, barrier: Any, results: Any) -> None:
    """A worker process: run one side's writer tasks per job, until told to stop."""
    while (job := inbox.get()) is not None:
        store, side, tasks = job
        try:
            run = asyncio.run(_run_tasks(store, side, tasks, barrier))
        except BaseException as exc:  # report it, and release the others from the barrier
            barrier.abort()
            run = WorkerRun(error=f"{type(exc).__name__}: {exc}")
        results.put(msgspec.msgpack.encode(run))


def run_side(workers: Workers, store: Store, side: Side, plan: Plan) -> Outcome:
    """Restore the side's store, run the plan, measure the store and check what it holds."""
    asyncio.run(store.restore(side))
    runs = workers.run(store, side, plan)
    size = asyncio.run(store.size_bytes(side))
    check_stored(store, side, plan)
    return Outcome(
        commands=sum(len(commands) for tasks in plan for commands in tasks),
        elapsed_s=max(r.ended for r in runs) - min(r.started for r in runs),
        attempts=sum(r.attempts for r in runs),
        most_attempts=max(r.most_attempts for r in runs),
        latencies_ms=[ms for r in runs for ms in r.latencies_ms],
        size_bytes=size,
    )


async def _run_tasks(
    store: Store, side: Side, tasks: list[list[Command]], barrier: Any
) -> WorkerRun:
    writer = await store.open_writer(side, min(len(tasks), CONNECTIONS_PER_PROCESS))
    latencies_ms: list[float] = []
    attempts: list[int] = []

    async def task(commands: list[Command]) -> None:
        for order_id, item_id in commands:
            began = time.perf_counter()
            attempts.append(await writer.add(order_id, item_id))
            latencies_ms.append((time.perf_counter() - began) * 1000)

    try:
        barrier.wait()  # every process has its store open; nothing else runs on this loop yet
        started = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
        await asyncio.gather(*(task(commands) for commands in tasks))
        ended = time.perf_counter()
    finally:
        await writer.close()
    return WorkerRun(
        started=started,
        ended=ended,
        attempts=sum(attempts),
        most_attempts=max(attempts, default=0),
        latencies_ms=latencies_ms,
    )


def check_stored(store: Store, side: Side, plan: Plan) -> None:
    """Every item in its order exactly once, and each version one more than the item count."""
    expected: dict[str, list[str]] = {}
    for order_id, item_id in (c for tasks in plan for commands in tasks for c in commands):
        expected.setdefault(order_id, []).append(item_id)
    stored = asyncio.run(store.stored(side, list(expected)))
    for order_id, items in expected.items():
        order = stored.get(order_id)
        found = sorted(item["id"] for item in order.items) if order else []
        if order is None or found != sorted(items) or order.version != 1 + len(found):
            raise AssertionError(
                f"{store.name}, {side} side: order {order_id!r} holds {len(found)} items at "
                f"version {order.version if order else None}, expected {len(items)} items"
            )


def compare(store: Store, load: str, plan: Plan, repeat: int) -> Row:
    """Each side's median of `repeat` runs, the sides taking turns to go first."""
    runs: dict[Side, list[Outcome]] = {side: [] for side in SIDES}
    with Workers(len(plan)) as workers:
        for n in range(repeat):
            # A drift in the shared machine's speed then favours neither side.
            for side in SIDES if n % 2 == 0 else SIDES[::-1]:
                runs[side].append(run_side(workers, store, side, plan))
    for side, outcomes in runs.items():
        rates = ", ".join(f"{o.rate:,.0f}" for o in outcomes)
        print(f"  ({store.name} {load} x{len(plan)}: {side} {rates} cmd/s)", file=sys.stderr)
    optimistic, pessimistic = (
        sorted(runs[side], key=lambda o: o.rate)[len(runs[side]) // 2] for side in SIDES
    )
    return Row(
        store=store.name,
        load=load,
        processes=len(plan),
        writers=sum(len(tasks) for tasks in plan),
        optimistic=optimistic,
        pessimistic=pessimistic,
    )


# --- report -----------------------------------------------------------------------------

HEADER = (
    "| store | processes | writers | commands | optimistic (cmd/s) | attempts per command "
    "| p50 | p99 | store size | pessimistic (cmd/s) | p50 | p99 | store size "
    "| optimistic / pessimistic |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def format_row(row: Row) -> str:
    opt, pes = row.optimistic, row.pessimistic
    return (
        f"| {row.store} | {row.processes} | {row.writers} | {opt.commands:,} "
        f"| {opt.rate:,.0f} | {opt.attempts / opt.commands:.2f} (max {opt.most_attempts}) "
        f"| {_ms(opt.latency_ms(0.5))} | {_ms(opt.latency_ms(0.99))} | {_size(opt.size_bytes)} "
        f"| {pes.rate:,.0f} | {_ms(pes.latency_ms(0.5))} | {_ms(pes.latency_ms(0.99))} "
        f"| {_size(pes.size_bytes)} | {row.ratio:.2f}x |"
    )


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 100 else f"{value:,.0f} ms"


def _size(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:.1f} MB" if size_bytes >= 1e6 else f"{size_bytes / 1e3:.0f} kB"


# --- main -------------------------------------------------------------------------------


def prepare(store: Store, ids: list[str]) -> None:
    began = time.perf_counter()
    for side in SIDES:
        asyncio.run(store.prepare(side, ids))
    took = time.perf_counter() - began
    print(f"  ({store.name}: {len(ids):,} order(s) created in {took:.1f} s)", file=sys.stderr)


def main(args: argparse.Namespace) -> None:
    began = time.perf_counter()
    rows: list[Row] = []
    with ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory())
        stores: list[Store] = [SQLiteStore(folder=folder)]
        if not args.sqlite_only:
            from tests.pg_server import postgres_dsn

            dsn = stack.enter_context(postgres_dsn())
            postgres = asyncio.run(PostgresStore.create(dsn))
            stack.callback(lambda: asyncio.run(postgres.drop()))
            stores.append(postgres)

        print("\nOne hot aggregate: writer tasks in one process\n")
        print(HEADER, flush=True)
        for store in stores:
            for writers in args.writers:
                prepare(store, [HOT_ID])
                plan = hot_plan(writers, args.hot_commands // writers)
                rows.append(compare(store, "hot", plan, args.repeat))
                print(format_row(rows[-1]), flush=True)

        orders = zipf_orders(args.commands, args.seed)
        hottest = max(Counter(orders).values())
        print(
            f"\nZipf load: {AGGREGATES:,} orders, s = {ZIPF_S}, seed {args.seed}; "
            f"{len(orders):,} commands touch {len(set(orders)):,} orders, the hottest "
            f"{hottest} times; {args.tasks} writer tasks per process\n"
        )
        print(HEADER, flush=True)
        for store in stores:
            prepare(store, order_ids())
            for processes in args.processes:
                plan = zipf_plan(orders, processes, args.tasks)
                rows.append(compare(store, "zipf", plan, args.repeat))
                print(format_row(rows[-1]), flush=True)

    print(f"\n({time.perf_counter() - began:.0f} s)", file=sys.stderr)


def _counts(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer commands, fewer rows")
    parser.add_argument("--sqlite-only", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--commands", type=int, help="commands per Zipf row (default 1000)")
    parser.add_argument("--hot-commands", type=int, help="commands per hot row (default 256)")
    parser.add_argument("--processes", type=_counts, help="Zipf process counts (default 1,4,8)")
    parser.add_argument("--writers", type=_counts, help="hot writer counts (default 1,8)")
    parser.add_argument("--tasks", type=int, default=8, help="writer tasks per Zipf process")
    parser.add_argument("--seed", type=int, default=1, help="seed of the Zipf sequence")
    parser.add_argument("--repeat", type=int, help="runs per side and row (default 3)")
    args = parser.parse_args()
    quick = args.quick
    args.commands = args.commands or (400 if quick else 1000)
    args.hot_commands = args.hot_commands or (64 if quick else 256)
    args.processes = args.processes or ([1, 4] if quick else [1, 4, 8])
    args.writers = args.writers or [1, 8]
    args.repeat = args.repeat or (1 if quick else 3)
    main(args)
