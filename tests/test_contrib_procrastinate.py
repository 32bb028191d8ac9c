"""Commands on procrastinate's queue: every run of a job is the same command, so its effect
happens once; transient failures retried by the engine, others failed at once; a worker
killed in the middle of jobs loses and doubles nothing."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cqrs_resilience import (
    BrokenCircuitError,
    ConcurrencyError,
    ConfigurationError,
    TransientError,
    UndecodableCommandError,
)
from cqrs_resilience.contrib._jobs import JobRetry

procrastinate = pytest.importorskip("procrastinate")

from cqrs_resilience.contrib.procrastinate import recover_stalled_jobs  # noqa: E402
from tests.queued_orders import AddItem, orders_app  # noqa: E402

BOUND_S = 60.0


# --- what the engine retries --------------------------------------------------------------------


@given(
    attempts=st.integers(1, 20),
    retry_after=st.none() | st.floats(0, 1000, allow_nan=False),
    wait_s=st.floats(0, 10),
    max_wait_s=st.floats(0, 600),
)
def test_transient_failures_wait_longer_each_time_within_the_bounds(
    attempts: int, retry_after: float | None, wait_s: float, max_wait_s: float
) -> None:
    """A transient failure is retried after `wait_s` doubled per run, at most `max_wait_s`,
    never sooner than its `retry_after` (capped too), for `max_retries` more runs."""
    policy = JobRetry(max_retries=10, wait_s=wait_s, max_wait_s=max_wait_s)
    wait = policy.decide(TransientError("down", retry_after=retry_after), attempts)
    if attempts > 10:  # the 11th run was the 10th retry
        assert wait is None
        return
    assert wait is not None
    assert wait <= max_wait_s
    assert wait >= min(wait_s * 2 ** (attempts - 1), max_wait_s)
    if retry_after is not None:
        assert wait >= min(retry_after, max_wait_s)
    later = policy.decide(TransientError("down", retry_after=retry_after), attempts + 1)
    assert later is None or later >= wait


@pytest.mark.parametrize(
    "error",
    [
        TransientError("down"),
        ConnectionError("reset"),
        TimeoutError("slow"),
        BrokenCircuitError(2.0),
        ConcurrencyError(aggregate_id="o"),
    ],
    ids=type,
)
def test_what_may_pass_with_time_is_retried(error: Exception) -> None:
    """Failures that outlived the in-process retries and may pass are retried by the engine."""
    assert JobRetry().decide(error, 1) is not None


@pytest.mark.parametrize(
    "error",
    [ValueError("bug"), KeyError("x"), UndecodableCommandError("AddItem", "garbage")],
    ids=type,
)
def test_anything_else_fails_the_job_at_once(error: Exception) -> None:
    """A bug, a refused command or a job that does not decode is never retried."""
    assert JobRetry().decide(error, 1) is None


@pytest.mark.parametrize(
    "options",
    [{"max_retries": -1}, {"wait_s": -1}, {"max_wait_s": float("inf")}, {"max_retries": 1.5}],
)
def test_a_retry_policy_out_of_range_is_refused(options: dict[str, Any]) -> None:
    """Settings out of range fail at once, naming the setting."""
    with pytest.raises(ConfigurationError, match=next(iter(options))):
        JobRetry(**options)


# --- on a real queue ------------------------------------------------------------------------


async def run_jobs(app: Any, dsn: str) -> None:
    """Run a worker until no job is left to do (a job the engine retries is to do again)."""
    for _ in range(50):
        await asyncio.wait_for(
            app.run_worker_async(
                queues=["commands"], wait=False, install_signal_handlers=False, concurrency=4
            ),
            BOUND_S,
        )
        if (await job_statuses(dsn))["todo"] == 0:
            return
    raise AssertionError("jobs were still to do after 50 runs of the worker")


async def job_statuses(dsn: str) -> Counter[str]:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cursor = await conn.execute("SELECT status FROM procrastinate_jobs")
        return Counter(status for (status,) in await cursor.fetchall())


@pytest.fixture
async def queue(pg_database: str) -> Any:
    """The orders app on a fresh database, its schema applied."""
    app, task, (orders, faults) = orders_app(pg_database)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        yield app, task, orders, faults, pg_database
    await orders.close()


@pytest.mark.postgres
async def test_commands_sent_are_handled_once_each(queue: Any) -> None:
    """Every command sent is handled: its item is in the order once."""
    app, task, orders, _, dsn = queue
    for n in range(20):
        await task.send(AddItem(order_id="o", item=f"i{n}"))
    await run_jobs(app, dsn)
    [order] = await orders.retrieve(["o"])
    assert sorted(order.items) == sorted(f"i{n}" for n in range(20))
    assert await job_statuses(dsn) == Counter({"succeeded": 20})


@pytest.mark.postgres
async def test_a_transient_failure_that_outlives_the_handler_is_retried_by_the_engine(
    queue: Any,
) -> None:
    """Failing twice before writing, and once after its write committed: the job is run again
    by the engine each time, and the item lands once."""
    app, task, orders, faults, dsn = queue
    faults.fail_first["flaky"] = 2
    faults.fail_after_write["flaky"] = 1
    await task.send(AddItem(order_id="o", item="flaky"))
    await run_jobs(app, dsn)
    [order] = await orders.retrieve(["o"])
    assert order.items == ["flaky"]
    assert faults.runs["flaky"] == 4
    assert await job_statuses(dsn) == Counter({"succeeded": 1})


@pytest.mark.postgres
async def test_a_bug_fails_the_job_at_once_and_the_queue_goes_on(
    queue: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler raising anything that will not pass with time fails its job on the first
    run, logged, never retried; the jobs after it run."""
    app, task, orders, faults, dsn = queue
    faults.broken.add("bug")
    await task.send(AddItem(order_id="o", item="bug"))
    await task.send(AddItem(order_id="o", item="fine"))
    with caplog.at_level(logging.ERROR, logger="cqrs_resilience"):
        await run_jobs(app, dsn)
    [order] = await orders.retrieve(["o"])
    assert order.items == ["fine"]
    assert faults.runs["bug"] == 1
    assert await job_statuses(dsn) == Counter({"succeeded": 1, "failed": 1})
    assert any("not retried" in r.getMessage() and "bug" in r.getMessage() for r in caplog.records)


@pytest.mark.postgres
async def test_a_job_that_does_not_decode_fails_and_never_blocks_the_queue(queue: Any) -> None:
    """Garbage in the queue, or a command of another schema, fails its job at once, even
    under the aggregate's lock; the commands queued after it run."""
    app, task, orders, _, dsn = queue
    for junk in ["not json", '{"order_id": "o"}', '{"command_id": "", "order_id": "o", "item": 1}']:
        job = procrastinate.jobs.Job(
            id=None,
            queue="commands",
            lock=None,
            queueing_lock=None,
            task_name=task.name,
            task_kwargs={"command": junk},
        )
        await app.job_manager.defer_job_async(job)
    await task.send(AddItem(order_id="o", item="after"))
    await run_jobs(app, dsn)
    [order] = await orders.retrieve(["o"])
    assert order.items == ["after"]
    assert await job_statuses(dsn) == Counter({"succeeded": 1, "failed": 3})


@pytest.mark.postgres
async def test_a_failed_job_run_again_by_hand_applies_nothing_twice(queue: Any) -> None:
    """A job that failed after its write (a bug, since fixed) and is retried by hand is the
    same command: its write replays, the item is in the order once."""
    import datetime

    app, task, orders, faults, dsn = queue
    faults.broken_after_write.add("once")
    job_id = await task.send(AddItem(order_id="o", item="once"))
    await run_jobs(app, dsn)
    assert await job_statuses(dsn) == Counter({"failed": 1})
    faults.broken_after_write.clear()  # the fix is deployed
    now = datetime.datetime.now(datetime.UTC)
    await app.job_manager.retry_job_by_id_async(job_id, retry_at=now)
    await run_jobs(app, dsn)
    [order] = await orders.retrieve(["o"])
    assert order.items == ["once"]
    assert faults.runs["once"] == 2
    assert await job_statuses(dsn) == Counter({"succeeded": 1})


@pytest.mark.postgres
async def test_a_command_sent_in_a_transaction_runs_only_if_it_commits(queue: Any) -> None:
    """Sent on the caller's connection, a command is queued with the caller's own writes:
    rolled back, it never runs; committed, it runs."""
    import psycopg

    app, task, orders, _, dsn = queue
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        async with conn.transaction(force_rollback=True):
            await task.send(AddItem(order_id="o", item="rolled back"), connection=conn)
        async with conn.transaction():
            await task.send(AddItem(order_id="o", item="committed"), connection=conn)
    await run_jobs(app, dsn)
    [order] = await orders.retrieve(["o"])
    assert order.items == ["committed"]


@pytest.mark.postgres
async def test_a_lock_runs_one_aggregates_commands_one_at_a_time_in_order(
    pg_database: str,
) -> None:
    """With `lock=`, the commands of one order run one after another, in the order sent,
    with four jobs running at once: no conflict, the items in sending order."""
    app, task, (orders, faults) = orders_app(pg_database, lock=True)
    faults.work_s = 0.005
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        for n in range(12):
            await task.send(AddItem(order_id="o", item=f"i{n:02d}"))
            await task.send(AddItem(order_id="p", item=f"i{n:02d}"))
        await run_jobs(app, pg_database)
        [o, p] = await orders.retrieve(["o", "p"])
    await orders.close()
    assert o.items == p.items == [f"i{n:02d}" for n in range(12)]
    assert o.version == 12


@pytest.mark.postgres
async def test_stalled_jobs_are_recovered_from_the_queue_named_only(queue: Any) -> None:
    """`recover_stalled_jobs(queue=...)` sends back the stalled jobs of that queue alone: the
    database's other queues are left to their own workers."""
    from cqrs_resilience.contrib.procrastinate import command_task

    app, task, _, _, dsn = queue
    other = command_task(app, task.jobs.handle, AddItem, name="other", queue="other")
    await task.send(AddItem(order_id="o", item="mine"))
    await other.send(AddItem(order_id="o", item="theirs"))
    worker_id = await app.job_manager.register_worker()  # a worker that then dies
    for _ in range(2):
        assert await app.job_manager.fetch_job(queues=None, worker_id=worker_id)
    assert await job_statuses(dsn) == Counter({"doing": 2})
    assert await recover_stalled_jobs(app, seconds_since_heartbeat=0, queue="commands") == 1
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cursor = await conn.execute("SELECT queue_name, status FROM procrastinate_jobs")
        assert sorted(await cursor.fetchall()) == [("commands", "todo"), ("other", "doing")]


# --- a worker killed in the middle of jobs ----------------------------------------------------


def _work(dsn: str, started: Any) -> None:
    """A worker process: run jobs until killed."""

    async def main() -> None:
        app, _, (_, faults) = orders_app(dsn)
        faults.work_s = 0.02  # each job takes a moment after its write: caught in the middle
        async with app.open_async():
            started.set()
            await app.run_worker_async(
                queues=["commands"],
                concurrency=4,
                install_signal_handlers=False,
                update_heartbeat_interval=0.2,
                stalled_worker_timeout=1.0,
            )

    asyncio.run(main())


@pytest.mark.postgres
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
async def test_a_worker_killed_mid_jobs_loses_and_doubles_nothing(pg_database: str) -> None:
    """300 commands on three orders, two worker processes, one SIGKILLed in the middle of
    its jobs: its stalled jobs are recovered and run again, every item is in its order
    exactly once, and no job is left `doing`."""
    app, task, (orders, _) = orders_app(pg_database)
    count = 300
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        sent = [AddItem(order_id=f"o{n % 3}", item=f"i{n}") for n in range(count)]
        for command in sent:
            await task.send(command)
        context = multiprocessing.get_context("spawn")
        workers = []
        for _ in range(2):
            started = context.Event()
            worker = context.Process(target=_work, args=(pg_database, started), daemon=True)
            worker.start()
            assert await asyncio.to_thread(started.wait, BOUND_S)
            workers.append(worker)
        deadline = time.monotonic() + BOUND_S
        while (await job_statuses(pg_database))["succeeded"] < count // 3:
            assert time.monotonic() < deadline, "the workers made no progress"
            await asyncio.sleep(0.05)
        doing_at_kill = (await job_statuses(pg_database))["doing"]
        os.kill(workers[0].pid, signal.SIGKILL)  # type: ignore[arg-type]
        await asyncio.to_thread(workers[0].join, BOUND_S)
        recovered = 0
        while (statuses := await job_statuses(pg_database))["succeeded"] < count:
            assert time.monotonic() < deadline, f"jobs never finished: {statuses}"
            recovered += await recover_stalled_jobs(app, seconds_since_heartbeat=1.0)
            await asyncio.sleep(0.1)
        workers[1].kill()
        await asyncio.to_thread(workers[1].join, BOUND_S)
        orders_now = {o.id: o for o in await orders.retrieve(["o0", "o1", "o2"])}
    await orders.close()
    assert statuses == Counter({"succeeded": count}), statuses
    assert doing_at_kill > 0 and recovered > 0, (doing_at_kill, recovered)
    items = Counter(item for order in orders_now.values() for item in order.items)
    assert items == Counter({command.item: 1 for command in sent})
    for order in orders_now.values():
        assert order.version == len(order.items)


@pytest.mark.postgres
@pytest.mark.parametrize("when", ["before its write", "after its write"])
async def test_a_worker_cancelled_in_the_middle_of_a_job_loses_and_doubles_nothing(
    pg_database: str, when: str
) -> None:
    """The worker stopped (its task cancelled, with no grace) while a job runs its handler,
    before or after the command's write: the job is not aborted but runs again, and its item
    lands once."""
    app, task, (orders, faults) = orders_app(pg_database)
    inside = asyncio.Event()
    hold = asyncio.Event()
    entered: list[str] = []

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        await task.send(AddItem(order_id="o", item="cancelled"))

        async def pause(item: str) -> None:
            entered.append(item)
            inside.set()
            await hold.wait()

        faults.pause_before_write = pause if when == "before its write" else None
        faults.pause_after_write = pause if when == "after its write" else None
        worker = asyncio.ensure_future(
            app.run_worker_async(
                queues=["commands"],
                install_signal_handlers=False,
                update_heartbeat_interval=0.1,
                stalled_worker_timeout=0.5,
                shutdown_graceful_timeout=0,
            )
        )
        await asyncio.wait_for(inside.wait(), BOUND_S)
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker
        faults.pause_before_write = faults.pause_after_write = None
        assert await job_statuses(pg_database) == Counter({"todo": 1})  # to run again
        await run_jobs(app, pg_database)
        statuses = await job_statuses(pg_database)
        [order] = await orders.retrieve(["o"])
    await orders.close()
    assert order.items == ["cancelled"]
    assert entered == ["cancelled"]
    assert statuses == Counter({"succeeded": 1})


@pytest.mark.postgres
async def test_a_job_aborted_on_request_stays_aborted(pg_database: str) -> None:
    """Someone asks to abort a running job: it is aborted, not run again."""
    app, task, (orders, faults) = orders_app(pg_database)
    inside = asyncio.Event()

    async def hang(item: str) -> None:
        inside.set()
        await asyncio.Event().wait()

    faults.pause_before_write = hang
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        job_id = await task.send(AddItem(order_id="o", item="unwanted"))
        worker = asyncio.ensure_future(
            app.run_worker_async(
                queues=["commands"], install_signal_handlers=False, abort_job_polling_interval=0.05
            )
        )
        await asyncio.wait_for(inside.wait(), BOUND_S)
        await app.job_manager.cancel_job_by_id_async(job_id, abort=True)
        deadline = time.monotonic() + BOUND_S
        while (statuses := await job_statuses(pg_database))["aborted"] < 1:
            assert time.monotonic() < deadline, statuses
            await asyncio.sleep(0.05)
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker
        assert await orders.retrieve(["o"]) == []
    await orders.close()
    assert faults.runs["unwanted"] == 1
