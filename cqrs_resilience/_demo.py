"""The demo: many writers, a few hot orders, injected faults, and a check that nothing is lost.

Each writer reads an order, sends a *full-state* command (the whole order as it wants it: the
state it read plus one new line item) through a `ResilientCommandHandler` with a three-way
MERGE, and goes on. Writers race, so most commands conflict; the store fails some writes
before they happen and times out some after they commit. At the end every line item must be
in its order exactly once, and each order's version must equal one plus its item count.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ._clock import Clock
from ._conflict_config import ConflictConfig, ConflictResolutionPolicy
from ._errors import VersionPrunedError
from ._faults import FaultyRepository
from ._handlers import ResilientCommandHandler
from ._hooks import HookRegistry
from ._messages import Command, CommandResponse, ConflictResilient, Retryable
from ._policies import ExponentialBackoffPolicy
from ._repository import Aggregate, Repository
from ._signals import follow_parent, signals_held


class DemoOrder(Aggregate):
    """A hot aggregate: line items many writers add to at once."""

    status: str = "open"
    items: list[dict[str, Any]] = msgspec.field(default_factory=list)


DEMO_POLICY = ExponentialBackoffPolicy(max_retries=12, initial_delay_ms=2, max_delay_ms=200)
MAX_RETRIES_LIMIT = 100
"""The most retries a demo command may ask for (`--max-retries`)."""
DEMO_CONFIG = ConflictConfig(
    policy=ConflictResolutionPolicy.MERGE,
    strategy_name="deep",
    list_identity_key="id",
    max_attempts=200,
)


def _state(order: DemoOrder) -> dict[str, Any]:
    """The order as merges take it. Its fields hold plain data already (as decoded), so a
    shallow dict serves: merges never change their inputs, and `to_dict()`'s deep copy of a
    thousand line items would cost more than the merge."""
    return msgspec.structs.asdict(order)


class AddLineItem(Command[str], Retryable, ConflictResilient):
    """A full-state command: the order as the writer wants it, and the version it read."""

    order_id: str
    expected_version: int
    state: dict[str, Any]


class DemoHandler(ResilientCommandHandler[str]):
    """What the demo's handlers share: the orders' repository, a count of `process` calls,
    and the caps the demo's commands need."""

    # The demo's commands ask for more patience than the default caps allow a command (10
    # retries, 10 rounds): dozens of writers race on three orders, with injected faults.
    max_retries_cap = MAX_RETRIES_LIMIT
    max_attempts_cap = DEMO_CONFIG.max_attempts

    def __init__(
        self,
        repository: Repository[DemoOrder],
        hooks: HookRegistry | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(repository, hooks=hooks, clock=clock)
        self.attempts = 0

    async def fetch_latest_state(self, command: Any) -> dict[str, Any] | None:
        found = await self.repository.retrieve([command.order_id])
        return _state(found[0]) if found else None


class AddLineItemHandler(DemoHandler):
    """Writes the command's state at its expected version; conflicts are merged three-way."""

    async def process(self, command: AddLineItem) -> CommandResponse[str]:
        self.attempts += 1
        fields = {k: v for k, v in command.state.items() if k not in ("id", "version")}
        order = DemoOrder(id=command.order_id, version=command.expected_version, **fields)
        stored = await self.repository.persist(order)
        return CommandResponse(result=f"{stored.id}@v{stored.version}")

    async def fetch_base_state(self, command: AddLineItem) -> dict[str, Any] | None:
        base = await self.repository.retrieve_version(command.order_id, command.expected_version)
        return _state(base) if base else None

    def get_incoming_state(self, command: AddLineItem) -> dict[str, Any]:
        return command.state

    def update_command(self, command: AddLineItem, merged_state: dict[str, Any]) -> AddLineItem:
        return AddLineItem(
            order_id=command.order_id,
            expected_version=merged_state["version"],
            state=merged_state,
            retry_policy=command.retry_policy,
            conflict_config=command.conflict_config,
        )


class DemoOptions(msgspec.Struct, kw_only=True, frozen=True):
    """Everything a demo run needs; picklable, so worker processes get the same."""

    writers: int = 32
    updates: int = 25
    orders: int = 3
    transient_rate: float = 0.1
    timeout_rate: float = 0.02
    processes: int = 1
    dsn: str | None = None
    sqlite_path: str | None = None
    sqlite_removed: bool = False  # a temporary file, removed when the run ends
    server_removed: bool = False  # a throwaway PostgreSQL server, removed when the run ends
    seed: int = 0
    max_retries: int = DEMO_POLICY.max_retries
    run_id: str = ""
    lock_orders: bool = False  # the queue engine: one order's jobs one at a time (job locks)

    def order_ids(self) -> list[str]:
        return [f"demo-{self.run_id}-order-{n}" for n in range(1, self.orders + 1)]


class WorkerStats(msgspec.Struct, kw_only=True):
    """What one process saw; summed across processes for the report."""

    commands: int = 0
    failed: int = 0
    attempts: int = 0
    retries: int = 0
    conflicts_detected: int = 0
    conflicts_resolved: int = 0
    injected_transient: int = 0
    injected_timeouts: int = 0
    latencies_ms: list[float] = msgspec.field(default_factory=list)
    sent: dict[str, list[str]] = msgspec.field(default_factory=dict)
    failed_tokens: list[str] = msgspec.field(default_factory=list)
    """Updates whose command failed visibly: their caller knows, so they may be absent."""
    errors: list[str] = msgspec.field(default_factory=list)

    def add(self, other: WorkerStats) -> None:
        for name in (
            "commands",
            "failed",
            "attempts",
            "retries",
            "conflicts_detected",
            "conflicts_resolved",
            "injected_transient",
            "injected_timeouts",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latencies_ms.extend(other.latencies_ms)
        for order_id, tokens in other.sent.items():
            self.sent.setdefault(order_id, []).extend(tokens)
        self.failed_tokens.extend(other.failed_tokens)
        self.errors.extend(other.errors)


async def open_repository(options: DemoOptions) -> Any:
    """The store the options name: PostgreSQL for a DSN, else the SQLite file."""
    from .stores import PostgresRepository, SQLiteRepository

    repository: Any
    if options.dsn:
        repository = PostgresRepository(options.dsn, DemoOrder)
    else:
        assert options.sqlite_path is not None
        repository = SQLiteRepository(options.sqlite_path, DemoOrder)
    await repository.open()
    return repository


async def create_orders(options: DemoOptions) -> None:
    repository = await open_repository(options)
    try:
        for order_id in options.order_ids():
            await repository.persist(DemoOrder(id=order_id))
    finally:
        await repository.close()


async def run_writers(
    options: DemoOptions, writer_ids: list[int], progress: Callable[[], None]
) -> WorkerStats:
    """Run some writers to completion in this process and count what happened."""
    stats = WorkerStats()
    hooks = HookRegistry()

    def count(name: str) -> Callable[[dict[str, Any]], None]:
        def counter(context: dict[str, Any]) -> None:
            setattr(stats, name, getattr(stats, name) + 1)

        return counter

    hooks.subscribe("handler.retry.scheduled", count("retries"))
    hooks.subscribe("handler.conflict.detected", count("conflicts_detected"))
    hooks.subscribe("handler.conflict.resolved", count("conflicts_resolved"))

    repository = await open_repository(options)
    faulty = FaultyRepository(
        repository,
        transient_rate=options.transient_rate,
        timeout_after_commit_rate=options.timeout_rate,
        seed=options.seed * 1_000_003 + min(writer_ids, default=0),
    )
    handler = AddLineItemHandler(faulty, hooks)
    policy = msgspec.structs.replace(DEMO_POLICY, max_retries=options.max_retries)
    config = DEMO_CONFIG
    order_ids = options.order_ids()

    async def writer(writer_id: int) -> None:
        rng = random.Random(options.seed * 7919 + writer_id)
        for n in range(options.updates):
            order_id = rng.choice(order_ids)
            token = f"w{writer_id}-u{n}"
            seen = _state((await repository.retrieve([order_id]))[0])
            item = {"id": token, "writer": writer_id, "qty": rng.randint(1, 5)}
            command = AddLineItem(
                order_id=order_id,
                expected_version=seen["version"],
                state={**seen, "items": [*seen["items"], item]},
                retry_policy=policy,
                conflict_config=config,
            )
            stats.sent.setdefault(order_id, []).append(token)
            started = time.perf_counter()
            try:
                await handler.handle(command)
            except Exception as exc:
                stats.failed += 1
                stats.failed_tokens.append(token)
                stats.errors.append(f"{token}: {type(exc).__name__}: {exc}")
            stats.latencies_ms.append((time.perf_counter() - started) * 1000)
            stats.commands += 1
            progress()

    try:
        await asyncio.gather(*(writer(w) for w in writer_ids))
    finally:
        await repository.close()
    stats.attempts = handler.attempts
    stats.injected_transient = faulty.injected_transient
    stats.injected_timeouts = faulty.injected_timeouts
    return stats


def _process_main(options: DemoOptions, writer_ids: list[int], done: Any, results: Any) -> None:
    follow_parent()

    def progress() -> None:
        with done.get_lock():
            done.value += 1

    try:
        stats = asyncio.run(run_writers(options, writer_ids, progress))
    except BaseException as exc:  # report, so the parent can say what went wrong
        stats = WorkerStats(errors=[f"worker crashed: {type(exc).__name__}: {exc}"])
    results.put(msgspec.msgpack.encode(stats))


@dataclass
class Report:
    """The outcome of a run: counts, timings, and the exactly-once check."""

    options: DemoOptions
    stats: WorkerStats
    elapsed: float
    final: dict[str, DemoOrder] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    bad_versions: list[str] = field(default_factory=list)
    applied_after_failing: int = 0
    """Commands that failed visibly yet are in the final state (committed, then timed out)."""
    store_bytes: int = 0
    # What another engine (the queue's) says in the table instead, or besides.
    layout: str = ""
    """How the commands ran, when not by writers in processes of their own."""
    resolved_label: str = "conflicts resolved (commands merged)"
    failed_label: str = "failed visibly (caller got the error)"
    engine_rows: list[tuple[str, str]] = field(default_factory=list)
    """Rows after the injected faults."""

    @property
    def exactly_once(self) -> bool:
        """No acknowledged update lost, none applied twice, versions consistent."""
        return not (self.lost or self.doubled or self.bad_versions)

    @property
    def failed_visibly(self) -> int:
        """Commands whose caller got an error, or that never ran (a worker process died)."""
        total = self.options.writers * self.options.updates
        return self.stats.failed + max(0, total - self.stats.commands)

    @property
    def ok(self) -> bool:
        return self.exactly_once and not self.failed_visibly


def plural(count: int, noun: str) -> str:
    """`1 writer`, `2 writers`: the count and the noun, agreeing."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class _Progress:
    """A one-line progress bar on stderr (a line per 10% when not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stderr.isatty()
        self.shown = -1
        self.last = -1

    def show(self, done: int) -> None:
        if done == self.last:
            return
        self.last = done
        percent = done * 100 // max(self.total, 1)
        if self.tty:
            if percent == self.shown and done != self.total:
                return
            bar = "#" * (percent * 30 // 100)
            sys.stderr.write(f"\r  [{bar:<30}] {done}/{plural(self.total, 'command')}")
            if done >= self.total:
                sys.stderr.write("\n")
        elif percent // 10 != self.shown // 10 or done == self.total:
            sys.stderr.write(f"  {done}/{plural(self.total, 'command')} ({percent}%)\n")
        sys.stderr.flush()
        self.shown = percent


async def verify(options: DemoOptions, report: Report) -> None:
    """Every acknowledged update in its order exactly once, a visibly failed one at most once;
    versions consistent with the items."""
    failed = set(report.stats.failed_tokens)
    repository = await open_repository(options)
    try:
        for order_id in options.order_ids():
            order = (await repository.retrieve([order_id]))[0]
            report.final[order_id] = order
            tokens = [item["id"] for item in order.items]
            sent = report.stats.sent.get(order_id, [])
            report.lost += sorted(set(sent) - failed - set(tokens))
            report.applied_after_failing += len(failed & set(tokens))
            report.doubled += sorted({t for t in tokens if tokens.count(t) > 1})
            if order.version != 1 + len(tokens):
                report.bad_versions.append(
                    f"{order_id}: version {order.version} with {len(tokens)} items"
                )
            # Every version the store still keeps is one item more than the one before.
            for version in range(order.version, 0, -1):
                try:
                    kept = await repository.retrieve_version(order_id, version)
                except VersionPrunedError:
                    break
                if kept is None or len(kept.items) != version - 1:
                    report.bad_versions.append(f"{order_id}: version {version} wrong or missing")
        report.store_bytes = await store_size(options, repository)
    finally:
        await repository.close()


def _file_sizes(*paths: str) -> int:
    return sum(os.path.getsize(path) for path in paths if os.path.exists(path))


async def store_size(options: DemoOptions, repository: Any) -> int:
    """Bytes the store takes: the SQLite file and its log, or the PostgreSQL tables."""
    if not options.dsn:
        assert options.sqlite_path is not None
        return _file_sizes(options.sqlite_path, f"{options.sqlite_path}-wal")
    import psycopg

    tables = ("aggregate_versions", "processed_writes", "command_keys")
    sizes = " + ".join(f"pg_total_relation_size('{table}')" for table in tables)
    async with await psycopg.AsyncConnection.connect(options.dsn) as conn:
        row = await (await conn.execute(f"SELECT {sizes}")).fetchone()
    return int(row[0]) if row else 0


def run_demo(options: DemoOptions) -> Report:
    """Create the orders, run the writers (in K processes if asked), verify, report."""
    asyncio.run(create_orders(options))
    total = options.writers * options.updates
    bar = _Progress(total)
    started = time.perf_counter()
    if options.processes == 1:
        bar.show(0)
        count = 0

        def progress() -> None:
            nonlocal count
            count += 1
            bar.show(count)

        stats = asyncio.run(run_writers(options, list(range(options.writers)), progress))
    else:
        stats = _run_processes(options, bar)
    report = Report(options, stats, time.perf_counter() - started)
    asyncio.run(verify(options, report))
    return report


def _run_processes(options: DemoOptions, bar: _Progress) -> WorkerStats:
    context = multiprocessing.get_context("spawn")
    # These start multiprocessing's resource tracker, which must run before `signals_held()`:
    # launching it unblocks SIGINT and SIGTERM, and workers would inherit them unblocked.
    done = context.Value("i", 0)
    results = context.Queue()
    shares = [list(range(p, options.writers, options.processes)) for p in range(options.processes)]
    workers = [
        context.Process(target=_process_main, args=(options, share, done, results), daemon=True)
        for share in shares
    ]
    stats = WorkerStats()
    received = 0
    try:
        with signals_held():  # a worker started is a worker the `except` below can stop
            for worker in workers:
                worker.start()
        bar.show(0)  # the workers run: the first progress line says they have started
        while received < len(workers):
            try:
                stats.add(msgspec.msgpack.decode(results.get(timeout=0.2), type=WorkerStats))
                received += 1
            except Exception:  # queue.Empty: nothing yet
                if not any(w.is_alive() for w in workers) and results.empty():
                    stats.errors.append("a worker process died without reporting")
                    break
            bar.show(done.value)
    except BaseException:
        with signals_held(deliver=False):  # stopping already: a second signal waits for this
            stop_workers(workers, terminate=True)
        raise
    with signals_held():
        stop_workers(workers, terminate=False)  # they have reported: let them exit
    bar.show(done.value)
    return stats


WORKER_GRACE_S = 2.0
"""How long a worker process gets to exit before it is killed."""


def stop_workers(
    workers: Sequence[multiprocessing.process.BaseProcess],
    *,
    terminate: bool,
    grace_s: float = WORKER_GRACE_S,
) -> None:
    """Reap every started worker within `grace_s` (after SIGTERM if `terminate`), killing
    those still running then."""
    started = [worker for worker in workers if worker.pid is not None]
    if terminate:
        for worker in started:
            worker.terminate()
    deadline = time.monotonic() + grace_s
    for worker in started:
        worker.join(max(0.0, deadline - time.monotonic()))
    for worker in started:
        if worker.exitcode is None:
            worker.kill()
            worker.join()


def format_report(report: Report) -> str:
    """The closing table."""
    stats, options = report.stats, report.options
    removed = ", removed at exit" if options.sqlite_removed else ""
    store = "PostgreSQL" if options.dsn else f"SQLite ({options.sqlite_path}{removed})"
    if options.server_removed:
        store = "PostgreSQL (a throwaway server, removed at exit)"
    total = options.writers * options.updates
    processes = "process" if options.processes == 1 else "processes"
    layout = (
        report.layout or f"{options.writers} x {options.updates} in {options.processes} {processes}"
    )
    rows = [
        ("store", store),
        ("writers x updates", layout),
        ("hot orders", str(options.orders)),
        ("commands", f"{stats.commands} ({stats.failed} failed visibly)"),
        ("attempts (process calls)", str(stats.attempts)),
        ("retries (transient)", str(stats.retries)),
        ("conflicts detected (ConcurrencyErrors)", str(stats.conflicts_detected)),
        (report.resolved_label, str(stats.conflicts_resolved)),
        ("injected transient faults", str(stats.injected_transient)),
        ("injected commit-then-timeout", str(stats.injected_timeouts)),
        *report.engine_rows,
        ("throughput", f"{stats.commands / report.elapsed:,.0f} commands/s"),
        ("latency p50", f"{_percentile(stats.latencies_ms, 0.50):.1f} ms"),
        ("latency p99", f"{_percentile(stats.latencies_ms, 0.99):.1f} ms"),
        ("elapsed", f"{report.elapsed:.2f} s"),
        ("store size", f"{report.store_bytes / 1e6:.1f} MB"),
    ]
    items = sum(len(order.items) for order in report.final.values())
    failed = report.failed_visibly
    if not report.exactly_once:
        check = (
            f"FAIL: {len(report.lost)} lost, {len(report.doubled)} doubled, "
            f"{plural(len(report.bad_versions), 'version problem')}"
        )
    elif failed:
        check = (
            f"PASS: {stats.commands - stats.failed}/{total} acknowledged updates present "
            "exactly once, versions consistent"
        )
    else:
        check = f"PASS: {items}/{total} updates present exactly once, versions consistent"
    rows.append(("every update exactly once", check))
    if failed:
        rows.append(
            (
                report.failed_label,
                f"{plural(failed, 'command')}, {report.applied_after_failing} of them applied",
            )
        )
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    lines = [
        f"| {'metric':<{width}} | {'value':<{value_width}} |",
        f"|{'-' * (width + 2)}|{'-' * (value_width + 2)}|",
    ]
    lines += [f"| {name:<{width}} | {value:<{value_width}} |" for name, value in rows]
    for label, problems in (
        ("lost", report.lost),
        ("doubled", report.doubled),
        ("versions", report.bad_versions),
        ("errors", stats.errors),
    ):
        if problems:
            lines.append(
                f"{label}: {', '.join(problems[:10])}{' ...' if len(problems) > 10 else ''}"
            )
    return "\n".join(lines)


def default_options(**overrides: Any) -> DemoOptions:
    """Options with a fresh run id; give `dsn` or `sqlite_path` (see `temporary_sqlite`)."""
    run_id = overrides.pop("run_id", None) or uuid.uuid4().hex[:8]
    return DemoOptions(run_id=run_id, **overrides)


@contextlib.contextmanager
def temporary_sqlite(*, keep: bool = False) -> Iterator[str]:
    """A SQLite file path in a new temporary folder, removed afterwards unless `keep`."""
    with contextlib.ExitStack() as cleanup:
        with signals_held():  # a folder made is a folder the cleanup knows
            folder = tempfile.mkdtemp(prefix="cqrs-resilience-demo-")
            if not keep:
                cleanup.callback(_remove_folder, folder)
        yield os.path.join(folder, "demo.sqlite3")


def _remove_folder(folder: str) -> None:
    with signals_held():
        shutil.rmtree(folder, ignore_errors=True)
