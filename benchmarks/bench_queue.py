"""What the queue costs: the demo's workload through procrastinate, against the same in-process.

The demo's workload (32 writers x 25 updates on 3 hot orders; faults off, they are not the
queue's cost), on one PostgreSQL database, with K = 1, 2 and 4 processes:

- **in-process, full-state**: the inline demo: K processes of writers, each reading the order
  and sending a full-state command through the handler (three-way MERGE on a conflict);
- **in-process, delta**: the same writers sending the queue's command instead (the item
  alone; on a conflict, run again): the baseline the queue is measured against;
- **queue**: `cqrs-resilience demo --engine procrastinate --workers K`: the writers send the
  delta commands as jobs, K worker processes run them, `--writers` at a time in all;
- **queue, locked**: the same with `--lock-orders`: one order's jobs run one at a time, in
  the order sent (procrastinate's job locks), so they never conflict: the alternative to
  optimistic conflict resolution for very hot aggregates.

Then one writer and one process, one command at a time: what the queue adds to each command
(sending the job, a worker fetching it and marking it done) shows whole there.

Commands per second count from the first command to the last one done; starting the
processes is not counted. Each figure is the median of the repeats.

    python benchmarks/bench_queue.py                 # full run (a few minutes)
    python benchmarks/bench_queue.py --quick         # smoke run
    python benchmarks/bench_queue.py --dsn postgresql://...   # else a throwaway server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cqrs_resilience._demo import (
    DEMO_CONFIG,
    DEMO_POLICY,
    AddLineItem,
    AddLineItemHandler,
    DemoOptions,
    _state,
    create_orders,
    default_options,
    open_repository,
)
from cqrs_resilience._demo_jobs import RUN_AGAIN, AddItem, AddItemHandler
from cqrs_resilience._demo_queue import QueueOptions, run_queue_demo
from cqrs_resilience._pg_server import PostgresServer

ENV_DSN = "CQRS_RESILIENCE_PG_DSN"
ENGINES = ("in-process, full-state", "in-process, delta", "queue", "queue, locked")


async def writers(
    engine: str, options: DemoOptions, writer_ids: list[int], ready: Any, go: Any
) -> int:
    """The demo's writers in this process, sending `engine`'s commands; commands sent. The
    store is opened before the start, as the queue's workers open theirs before they run."""
    repository = await open_repository(options)
    delta = AddItemHandler(repository)
    full_state = AddLineItemHandler(repository)
    policy = msgspec.structs.replace(DEMO_POLICY, max_retries=options.max_retries)
    order_ids = options.order_ids()

    async def writer(writer_id: int) -> None:
        rng = random.Random(options.seed * 7919 + writer_id)  # the demo's writers' choices
        for n in range(options.updates):
            order_id = rng.choice(order_ids)
            item = {"id": f"w{writer_id}-u{n}", "writer": writer_id, "qty": rng.randint(1, 5)}
            if engine == "in-process, delta":
                await delta.handle(
                    AddItem(
                        order_id=order_id, item=item, retry_policy=policy, conflict_config=RUN_AGAIN
                    )
                )
                continue
            seen = _state((await repository.retrieve([order_id]))[0])
            command = AddLineItem(
                order_id=order_id,
                expected_version=seen["version"],
                state={**seen, "items": [*seen["items"], item]},
                retry_policy=policy,
                conflict_config=DEMO_CONFIG,
            )
            await full_state.handle(command)

    try:
        ready.release()
        await asyncio.to_thread(go.wait)
        await asyncio.gather(*(writer(w) for w in writer_ids))
    finally:
        await repository.close()
    return len(writer_ids) * options.updates


def in_process_main(
    engine: str, options: DemoOptions, writer_ids: list[int], ready: Any, go: Any, done: Any
) -> None:
    """One process of in-process writers: ready, wait for the start, write, report."""
    done.put(asyncio.run(writers(engine, options, writer_ids, ready, go)))


def run_in_process(engine: str, options: DemoOptions, processes: int) -> float:
    """Commands per second of the writers in `processes` processes, timed once all are up."""
    asyncio.run(create_orders(options))
    context = multiprocessing.get_context("spawn")
    ready, go, done = context.Semaphore(0), context.Event(), context.Queue()
    shares = [list(range(p, options.writers, processes)) for p in range(processes)]
    workers = [
        context.Process(
            target=in_process_main, args=(engine, options, share, ready, go, done), daemon=True
        )
        for share in shares
    ]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.acquire()
    started = time.perf_counter()
    go.set()
    count: int = sum(done.get() for _ in workers)
    elapsed = time.perf_counter() - started
    for worker in workers:
        worker.join()
    return count / elapsed


def run_queue(options: DemoOptions, workers: int, *, locked: bool = False) -> float:
    with contextlib.redirect_stderr(io.StringIO()):  # the demo's progress bar
        if locked:
            options = msgspec.structs.replace(options, lock_orders=True)
        report = run_queue_demo(options, QueueOptions(workers=workers))
    if not report.ok:
        raise SystemExit(f"the queue lost or failed commands: {report.stats.errors[:3]}")
    return report.stats.commands / report.elapsed


def measure(dsn: str, engine: str, processes: int, writers: int, updates: int) -> float:
    """Commands per second of one run with a fresh set of orders."""
    options = default_options(
        writers=writers, updates=updates, transient_rate=0.0, timeout_rate=0.0, dsn=dsn
    )
    if engine.startswith("queue"):
        return run_queue(options, processes, locked=engine == "queue, locked")
    return run_in_process(engine, options, processes)


def processes(count: int) -> str:
    return "process" if count == 1 else "processes"


@contextlib.contextmanager
def postgres(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    with PostgresServer() as started:
        yield started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--dsn", default=os.environ.get(ENV_DSN), help="PostgreSQL to use")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (median)")
    args = parser.parse_args()
    quick = (8, 5, 20, (1, 2))
    writers, updates, serial_updates, counts = quick if args.quick else (32, 25, 200, (1, 2, 4))
    repeats = args.repeats or (1 if args.quick else 3)
    rows: list[tuple[str, dict[str, float]]] = []
    with postgres(args.dsn) as dsn:
        plan = [(f"{writers} writers, {k} {processes(k)}", k, writers, updates) for k in counts]
        plan.append(("1 writer, 1 process (serial)", 1, 1, serial_updates))
        for label, count, writer_count, update_count in plan:
            rates = {
                engine: statistics.median(
                    measure(dsn, engine, count, writer_count, update_count) for _ in range(repeats)
                )
                for engine in ENGINES
            }
            rows.append((label, rates))
            print(f"  {label}: done", file=sys.stderr, flush=True)
    print(
        f"The demo's workload ({writers} writers x {updates} updates on 3 hot orders, no "
        f"faults; serial: 1 x {serial_updates}) on one PostgreSQL; commands/s, median of "
        f"{repeats}\n"
    )
    print(
        "| processes | in-process, full-state | in-process, delta | queue | queue ÷ delta "
        "| the queue adds per command | queue, locked per order | locked ÷ queue |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, rates in rows:
        full, delta, queued, locked = (rates[engine] for engine in ENGINES)
        added_ms = 1000 / queued - 1000 / delta
        print(
            f"| {label} | {full:,.0f} | {delta:,.0f} | {queued:,.0f} | "
            f"{queued / delta:.2f}x | {added_ms:+.2f} ms | {locked:,.0f} | "
            f"{locked / queued:.2f}x |"
        )
    print(
        "\nThe queue adds per command: the run's time per command through the queue minus "
        "in-process (delta), in wall-clock ms at that parallelism."
    )


if __name__ == "__main__":
    main()
