"""The demo's updates as jobs: the command a job carries, its handler, and a worker process.

A job's command is fixed when it is sent and runs later, when its order has moved on. The
inline engine's full-state command (the order as the writer read it, plus one item, written
at the version read) does not fit a queue: sent long before it runs, it conflicts on nearly
every run, its payload grows with the order, and the version it was built on is pruned
(`keep_versions`) before a deep queue drains, so the three-way merge has no base. A job
carries a delta instead, `AddItem`: the item alone. Its handler reads the order, appends the
item and writes at the version it read; on a conflict it runs again on the order as it is then
(`RUN_AGAIN`: nothing to fetch, merge or rebuild). Every run of a
job is the same command, its `command_id` included, so a write that committed and then timed
out, a job the engine retries and a killed worker's job run again all add the item once.

A worker process (`worker_main`) follows its parent (`follow_parent()`), opens the store and
a procrastinate app, and runs a procrastinate worker on the run's queue, with a heartbeat
every `HEARTBEAT_S`. What it counts goes to the parent on `results`, as `WorkerNews`: "ready"
once its app is open, the counts since the last news every `NEWS_EVERY_S`, and "stopped"
when the parent sets `stop` (or "crashed"). With `kill_after`, the first worker to have run
that many jobs (the `kill_claim` decides which) sends its news and SIGKILLs itself in the
middle of a job, its write committed and the job not yet marked done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ._conflict_config import ConflictConfig, ConflictResolutionPolicy
from ._demo import (
    DEMO_CONFIG,
    DemoHandler,
    DemoOptions,
    DemoOrder,
    WorkerStats,
    open_repository,
)
from ._faults import FaultyRepository
from ._hooks import HookRegistry
from ._messages import Command, CommandResponse, ConflictResilient, Retryable
from ._signals import follow_parent
from .contrib._jobs import JobRetry

if TYPE_CHECKING:
    import procrastinate

    from .contrib.procrastinate import CommandTask

TASK_NAME = "cqrs_resilience.demo.add_item"
HEARTBEAT_S = 0.5
"""How often a worker tells the database it is alive."""
STALLED_AFTER_S = 2.0
"""A worker silent this long is dead: its jobs go back to the queue."""
JOB_POLL_S = 0.2
"""How often an idle worker looks for jobs: retried and recovered ones are not announced."""
NEWS_EVERY_S = 0.25
DEMO_JOB_RETRY = JobRetry(max_retries=10, wait_s=0.05, max_wait_s=1.0)
"""What outlives the handler's own retries is retried by the engine, soon: it is a demo."""
RUN_AGAIN = ConflictConfig(
    policy=ConflictResolutionPolicy.RUN_AGAIN, max_attempts=DEMO_CONFIG.max_attempts
)
"""On a conflict, run the command again on the order as it is now (nothing to merge)."""


class AddItem(Command[str], Retryable, ConflictResilient):
    """A delta command: the line item alone, added to the order as the handler finds it."""

    order_id: str
    item: dict[str, Any]


class AddItemHandler(DemoHandler):
    """Reads the order, appends the item, writes at the version read; runs again on a
    conflict."""

    conflict_config = RUN_AGAIN

    async def process(self, command: AddItem) -> CommandResponse[str]:
        self.attempts += 1
        order = (await self.repository.retrieve([command.order_id]))[0]
        items = [*order.items, command.item]
        stored = await self.repository.persist(msgspec.structs.replace(order, items=items))
        return CommandResponse(result=f"{stored.id}@v{stored.version}")


def queue_name(options: DemoOptions) -> str:
    """The run's own procrastinate queue: jobs left by other runs in the database stay out."""
    return f"cqrs-resilience-demo-{options.run_id}"


def jobs_at_once(options: DemoOptions, workers: int) -> int:
    """Jobs one worker runs at a time: the writers, split between the workers."""
    return math.ceil(options.writers / workers)


def queue_app(
    dsn: str, handler: Any, options: DemoOptions, *, connections: int = 4
) -> tuple[procrastinate.App, CommandTask[AddItem]]:
    """A procrastinate app on `dsn` with the task that runs `AddItem` jobs with `handler`."""
    import procrastinate

    from .contrib.procrastinate import command_task

    connector = procrastinate.PsycopgConnector(conninfo=dsn, min_size=1, max_size=connections)
    app = procrastinate.App(connector=connector)
    task = command_task(
        app,
        handler,
        AddItem,
        name=TASK_NAME,
        queue=queue_name(options),
        retry=DEMO_JOB_RETRY,
        lock=_order_of if options.lock_orders else None,
    )
    return app, task


def _order_of(command: AddItem) -> str:
    """The job lock of `--lock-orders`: one order's jobs run one at a time, in order."""
    return command.order_id


class WorkerNews(msgspec.Struct, kw_only=True):
    """What a worker process tells its parent: its stage and what it counted since it last
    told."""

    worker: int
    stage: str  # "ready", "running", "killed", "stopped", "crashed"
    stats: WorkerStats = msgspec.field(default_factory=WorkerStats)


class _Tally:
    """A worker's counts since its last news."""

    def __init__(self, handler: AddItemHandler, faulty: FaultyRepository[DemoOrder]) -> None:
        self.stats = WorkerStats()
        self.handler = handler
        self.faulty = faulty
        self._told = (0, 0, 0)

    def take(self) -> WorkerStats:
        stats, self.stats = self.stats, WorkerStats()
        now = (self.handler.attempts, self.faulty.injected_transient, self.faulty.injected_timeouts)
        told, self._told = self._told, now
        stats.attempts = now[0] - told[0]
        stats.injected_transient = now[1] - told[1]
        stats.injected_timeouts = now[2] - told[2]
        return stats


class _ErrorsToStats(logging.Handler):
    """Errors logged in a worker go to the parent's table, not to the terminal."""

    def __init__(self, tally: Callable[[], WorkerStats]) -> None:
        super().__init__(logging.ERROR)
        self.tally = tally

    def emit(self, record: logging.LogRecord) -> None:
        # A failed job is logged twice, by procrastinate and by the adapter: keep the
        # adapter's line, which names the error.
        if getattr(record, "action", None) != "job_error":
            self.tally().errors.append(record.getMessage().splitlines()[0])


def worker_main(
    options: DemoOptions,
    worker: int,
    workers: int,
    results: Any,
    stop: Any,
    kill_claim: Any,
    kill_after: int | None,
) -> None:
    """A worker process: run the run's jobs until the parent sets `stop`."""
    follow_parent()
    try:
        asyncio.run(_work(options, worker, workers, results, stop, kill_claim, kill_after))
    except BaseException as exc:  # report, so the parent can say what went wrong
        error = f"worker {worker} crashed: {type(exc).__name__}: {exc}"
        news = WorkerNews(worker=worker, stage="crashed", stats=WorkerStats(errors=[error]))
        results.put(msgspec.msgpack.encode(news))


async def _work(
    options: DemoOptions,
    worker: int,
    workers: int,
    results: Any,
    stop: Any,
    kill_claim: Any,
    kill_after: int | None,
) -> None:
    assert options.dsn is not None

    def tell(news: WorkerNews) -> None:
        results.put(msgspec.msgpack.encode(news))

    hooks = HookRegistry()
    repository = await open_repository(options)
    faulty = FaultyRepository(
        repository,
        transient_rate=options.transient_rate,
        timeout_after_commit_rate=options.timeout_rate,
        seed=options.seed * 1_000_003 + worker,
    )
    handler = AddItemHandler(faulty, hooks)
    tally = _Tally(handler, faulty)
    for event, name in (
        ("handler.retry.scheduled", "retries"),
        ("handler.conflict.detected", "conflicts_detected"),
        ("handler.conflict.resolved", "conflicts_resolved"),
    ):
        hooks.subscribe(event, _counter(lambda: tally.stats, name))
    logging.getLogger().addHandler(_ErrorsToStats(lambda: tally.stats))
    runs = 0

    async def handle(command: AddItem) -> None:
        nonlocal runs
        started = time.perf_counter()
        try:
            await handler.handle(command)
        finally:
            tally.stats.latencies_ms.append((time.perf_counter() - started) * 1000)
            runs += 1
        if kill_after is not None and runs >= kill_after and _claim(kill_claim):
            # The write committed, the job is not marked done: the worst moment to die.
            tell(WorkerNews(worker=worker, stage="killed", stats=tally.take()))
            results.close()
            results.join_thread()  # the news is written (by a thread of the queue's own)
            os.kill(os.getpid(), signal.SIGKILL)

    at_once = jobs_at_once(options, workers)
    app, _ = queue_app(options.dsn, handle, options, connections=min(at_once, 8) + 2)
    try:
        async with app.open_async():
            tell(WorkerNews(worker=worker, stage="ready"))
            running = asyncio.create_task(
                app.run_worker_async(
                    queues=[queue_name(options)],
                    name=f"cqrs-resilience-demo-{worker}",
                    concurrency=at_once,
                    install_signal_handlers=False,
                    fetch_job_polling_interval=JOB_POLL_S,
                    update_heartbeat_interval=HEARTBEAT_S,
                    stalled_worker_timeout=STALLED_AFTER_S,
                )
            )
            while not stop.is_set() and not running.done():
                await asyncio.sleep(NEWS_EVERY_S)
                tell(WorkerNews(worker=worker, stage="running", stats=tally.take()))
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    finally:
        await repository.close()
    tell(WorkerNews(worker=worker, stage="stopped", stats=tally.take()))


def _counter(stats: Callable[[], WorkerStats], name: str) -> Callable[[dict[str, Any]], None]:
    def count(context: dict[str, Any]) -> None:
        current = stats()
        setattr(current, name, getattr(current, name) + 1)

    return count


def _claim(kill_claim: Any) -> bool:
    """True for the one worker that gets to die."""
    if kill_claim is None:
        return False
    with kill_claim.get_lock():
        if kill_claim.value:
            return False
        kill_claim.value = 1
        return True
