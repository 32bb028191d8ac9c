"""The demo's queue engine: `cqrs-resilience demo --engine procrastinate --workers N`.

The parent process creates the orders and the procrastinate schema (if the database has
none), starts N worker processes (`_demo_jobs.worker_main`) and, once they are ready, plays
the writers: each sends its updates as jobs (`command_task(...).send`), one after another.
The workers run them, `--writers` jobs at once in all, split between them, through the same
resilient handler as the inline engine with the same injected faults, but with the delta
command a queue needs (`_demo_jobs` says why). Meanwhile the parent reads the queue's counts
every `POLL_S` (the progress bar, and whether every job is done) and, every `RECOVER_EVERY_S`,
sends the jobs of workers silent for `STALLED_AFTER_S` back to the queue
(`recover_stalled_jobs`). With `--kill-worker` one worker is SIGKILLed in the middle of a job;
the parent starts another in its place, as a supervisor would. When every job has succeeded
or failed, the workers are stopped, and the orders checked as the inline engine checks them.

Elapsed time runs from the first job sent to the last one done: starting the worker
processes is not counted. Latencies are the handler's, per run of a job.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from ._demo import (
    DEMO_POLICY,
    WORKER_GRACE_S,
    DemoOptions,
    Report,
    WorkerStats,
    _Progress,
    create_orders,
    plural,
    stop_workers,
    verify,
)
from ._demo_jobs import (
    RUN_AGAIN,
    STALLED_AFTER_S,
    AddItem,
    WorkerNews,
    jobs_at_once,
    queue_app,
    queue_name,
    worker_main,
)
from ._signals import signals_held

if TYPE_CHECKING:
    import procrastinate

    from .contrib.procrastinate import CommandTask

POLL_S = 0.1
RECOVER_EVERY_S = 1.0
WORKER_START_S = 60.0
"""How long the worker processes get to connect before the run gives up."""
INSTALL_HINT = "pip install 'cqrs-resilience[procrastinate]'"


class QueueOptions(msgspec.Struct, kw_only=True, frozen=True):
    """How the queue engine runs: `workers` processes, one of them killed if `kill_worker`."""

    workers: int = 2
    kill_worker: bool = False


def queue_unavailable() -> str | None:
    """Why the queue engine cannot run here (a package missing, and how to install it)."""
    try:
        import procrastinate  # noqa: F401
        import psycopg  # noqa: F401
    except ImportError as exc:
        return f"--engine procrastinate needs {exc.name or 'procrastinate'}: {INSTALL_HINT}"
    return None


@contextlib.contextmanager
def throwaway_server() -> Iterator[str]:
    """A PostgreSQL server of its own for the run, removed when the block ends; its DSN."""
    from ._pg_server import PostgresServer, PostgresUnavailableError

    try:
        server = PostgresServer()
        print(
            "cqrs-resilience: starting a throwaway PostgreSQL server (removed at exit)",
            file=sys.stderr,
            flush=True,
        )
        dsn = server.start()
    except PostgresUnavailableError as exc:
        raise PostgresUnavailableError(
            "--engine procrastinate runs on PostgreSQL: pass --dsn postgresql://..., or install "
            f"the PostgreSQL server for a throwaway one ({exc})"
        ) from exc
    try:
        yield dsn
    finally:
        with signals_held():
            server.stop()


def run_queue_demo(options: DemoOptions, engine: QueueOptions) -> Report:
    """Create the orders and the queue, run the jobs on `engine.workers` processes, verify."""
    asyncio.run(_prepare(options))
    total = options.writers * options.updates
    bar = _Progress(total)
    workers = _Workers(options, engine)
    try:
        workers.start(engine.workers)
        run = asyncio.run(_drive(options, workers, bar))
        workers.finish()
    except BaseException:
        with signals_held(deliver=False):  # stopping already: a second signal waits for this
            stop_workers(workers.processes, terminate=True)
        raise
    run.stats.add(workers.stats)
    processes = "process" if engine.workers == 1 else "processes"
    report = Report(
        options,
        run.stats,
        run.elapsed,
        layout=(
            f"{options.writers} x {options.updates} as jobs, {engine.workers} worker {processes} "
            f"({plural(jobs_at_once(options, engine.workers), 'job')} at a time each)"
        ),
        resolved_label="conflicts resolved (commands run again)",
        failed_label="failed jobs (error logged, not retried)",
        engine_rows=[
            ("jobs retried by the engine", str(run.retried)),
            ("stalled jobs recovered", str(run.recovered)),
        ],
    )
    if options.lock_orders:
        report.engine_rows.insert(0, ("one order at a time", "yes: procrastinate job locks"))
    if engine.kill_worker:
        killed = "1 (SIGKILL mid-job), replaced" if workers.killed is not None else "0"
        report.engine_rows.append(("worker processes killed", killed))
    asyncio.run(verify(options, report))
    return report


async def _prepare(options: DemoOptions) -> None:
    assert options.dsn is not None
    import psycopg

    await create_orders(options)
    async with await psycopg.AsyncConnection.connect(options.dsn, autocommit=True) as conn:
        row = await (await conn.execute("SELECT to_regclass('procrastinate_jobs')")).fetchone()
    if row is None or row[0] is None:
        app, _ = queue_app(options.dsn, _sent_only, options)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()


async def _sent_only(command: AddItem) -> None:
    raise RuntimeError("the demo's parent process sends jobs; its workers run them")


class _Run(msgspec.Struct, kw_only=True):
    stats: WorkerStats
    elapsed: float
    retried: int = 0
    recovered: int = 0


async def _drive(options: DemoOptions, workers: _Workers, bar: _Progress) -> _Run:
    """Wait for the workers, send the jobs, recover stalled ones, until every job is done."""
    assert options.dsn is not None
    import psycopg

    name = queue_name(options)
    deadline = time.monotonic() + WORKER_START_S
    while not workers.all_ready():
        workers.collect()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker processes did not start in {WORKER_START_S:.0f} s")
        await asyncio.sleep(POLL_S)
    app, task = queue_app(options.dsn, _sent_only, options)
    stats = WorkerStats()
    async with (
        app.open_async(),
        await psycopg.AsyncConnection.connect(options.dsn, autocommit=True) as conn,
    ):
        bar.show(0)
        started = time.perf_counter()
        sending = asyncio.create_task(_send(options, task, stats))
        recovered = 0
        recovered_at = started
        while True:
            workers.collect()
            counts = await _job_counts(conn, name)
            bar.show(counts["succeeded"] + counts["failed"])
            if sending.done():
                sending.result()  # a job that could not be sent ends the run
                if counts["todo"] + counts["doing"] == 0:
                    break
            if not workers.alive():
                stats.errors.append(
                    f"every worker process died; {counts['todo'] + counts['doing']} jobs left"
                )
                break
            if time.perf_counter() - recovered_at >= RECOVER_EVERY_S:
                recovered += await _recover(app, name)
                recovered_at = time.perf_counter()
            await asyncio.sleep(POLL_S)
        # The database's clock: from the first job sent to the last one done, to the ms.
        elapsed = await _elapsed(conn, name) or time.perf_counter() - started
        retried = await _count(conn, _RETRIES, name) - recovered
        stats.commands = counts["succeeded"] + counts["failed"]
        stats.failed = counts["failed"]
        decode = msgspec.json.Decoder(AddItem).decode
        for (payload,) in await (await conn.execute(_FAILED, (name,))).fetchall():
            stats.failed_tokens.append(decode(payload).item["id"])
    bar.show(stats.commands)
    return _Run(stats=stats, elapsed=elapsed, retried=max(0, retried), recovered=recovered)


async def _send(options: DemoOptions, task: CommandTask[AddItem], stats: WorkerStats) -> None:
    """The writers: each sends its updates as jobs, one after another."""
    policy = msgspec.structs.replace(DEMO_POLICY, max_retries=options.max_retries)
    order_ids = options.order_ids()

    async def writer(writer_id: int) -> None:
        rng = random.Random(options.seed * 7919 + writer_id)
        for n in range(options.updates):
            order_id = rng.choice(order_ids)
            token = f"w{writer_id}-u{n}"
            item = {"id": token, "writer": writer_id, "qty": rng.randint(1, 5)}
            command = AddItem(
                order_id=order_id, item=item, retry_policy=policy, conflict_config=RUN_AGAIN
            )
            await task.send(command)
            stats.sent.setdefault(order_id, []).append(token)

    await asyncio.gather(*(writer(w) for w in range(options.writers)))


async def _recover(app: procrastinate.App, name: str) -> int:
    from .contrib.procrastinate import recover_stalled_jobs

    return await recover_stalled_jobs(app, seconds_since_heartbeat=STALLED_AFTER_S, queue=name)


_COUNTS = "SELECT status::text, count(*) FROM procrastinate_jobs WHERE queue_name = %s GROUP BY 1"
# A job the engine retries, or a stalled one recovered, goes from doing back to todo.
_RETRIES = """
    SELECT count(*) FROM procrastinate_events event
    JOIN procrastinate_jobs job ON job.id = event.job_id
    WHERE job.queue_name = %s AND event.type = 'deferred_for_retry'
"""
_SPAN = """
    SELECT EXTRACT(EPOCH FROM max(event.at) - min(event.at)) FROM procrastinate_events event
    JOIN procrastinate_jobs job ON job.id = event.job_id WHERE job.queue_name = %s
"""
_FAILED = """
    SELECT args->>'command' FROM procrastinate_jobs WHERE queue_name = %s AND status = 'failed'
"""


async def _elapsed(conn: Any, name: str) -> float:
    row = await (await conn.execute(_SPAN, (name,))).fetchone()
    return float(row[0]) if row and row[0] is not None else 0.0


async def _job_counts(conn: Any, name: str) -> Counter[str]:
    rows = await (await conn.execute(_COUNTS, (name,))).fetchall()
    return Counter({status: count for status, count in rows})


async def _count(conn: Any, statement: str, name: str) -> int:
    row = await (await conn.execute(statement, (name,))).fetchone()
    return int(row[0]) if row else 0


class _Workers:
    """The worker processes: started, heard, the killed one replaced, stopped."""

    def __init__(self, options: DemoOptions, engine: QueueOptions) -> None:
        self.options = options
        self.engine = engine
        context = multiprocessing.get_context("spawn")
        self.context = context
        # These start multiprocessing's resource tracker, which must run before `signals_held()`:
        # launching it unblocks SIGINT and SIGTERM, and workers would inherit them unblocked.
        self.results = context.Queue()
        self.stop = context.Event()
        self.kill_claim = context.Value("i", 0) if engine.kill_worker else None
        total = options.writers * options.updates
        # Someone runs at least total/workers jobs: some worker gets that far.
        self.kill_after = max(1, total // (3 * engine.workers)) if engine.kill_worker else None
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.stats = WorkerStats()
        self.stages: dict[int, str] = {}
        self.killed: int | None = None

    def start(self, count: int) -> None:
        with signals_held():  # a worker started is a worker `stop_workers` can stop
            for _ in range(count):
                worker = self.context.Process(
                    target=worker_main,
                    args=(
                        self.options,
                        len(self.processes),
                        self.engine.workers,
                        self.results,
                        self.stop,
                        self.kill_claim,
                        self.kill_after,
                    ),
                    daemon=True,
                )
                worker.start()
                self.processes.append(worker)

    def collect(self) -> None:
        """Take in the workers' news; start a worker in place of the one killed."""
        while True:
            try:
                raw = self.results.get_nowait()
            except queue.Empty:
                break
            news = msgspec.msgpack.decode(raw, type=WorkerNews)
            self.stages[news.worker] = news.stage
            self.stats.add(news.stats)
            if news.stage == "killed":
                self.killed = news.worker
        killed, replaced = self.killed, len(self.processes) > self.engine.workers
        stopping = self.stop.is_set()
        if killed is not None and not (replaced or stopping or self.processes[killed].is_alive()):
            self.start(1)

    def all_ready(self) -> bool:
        """Every worker is ready, or gone (a crash is reported with the table)."""
        return all(
            n in self.stages or not worker.is_alive() for n, worker in enumerate(self.processes)
        )

    def alive(self) -> bool:
        return any(worker.is_alive() for worker in self.processes) or (
            self.killed is not None and len(self.processes) == self.engine.workers
        )

    def finish(self) -> None:
        """Ask the workers to stop, hear their last news, and reap them."""
        self.stop.set()
        deadline = time.monotonic() + WORKER_GRACE_S
        while time.monotonic() < deadline and any(
            worker.is_alive() and self.stages.get(n) not in ("stopped", "crashed")
            for n, worker in enumerate(self.processes)
        ):
            self.collect()
            time.sleep(POLL_S / 2)
        with signals_held():
            stop_workers(self.processes, terminate=False)
        self.collect()
