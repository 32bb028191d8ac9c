"""Commands on a durable queue: procrastinate jobs, run by workers on any number of machines.

    pip install 'cqrs-resilience[procrastinate]'

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
    add_item = command_task(app, AddItemHandler(orders), AddItem)
    await add_item.send(AddItem(order_id="o1", item="tea"))   # from a web request, say
    # workers: `procrastinate --app=yourmodule.app worker`, or app.run_worker_async()

procrastinate keeps its jobs in PostgreSQL, the database the PostgreSQL store already needs:
no other server to run. A job carries the command (msgspec JSON, `command_id` included), so
every run of it is the same command, and the stores make its effect happen once
(`contrib._jobs`). Transient failures that outlive the handler's own `retry()` become job
retries with the engine's backoff (`JobRetry`); any other failure fails the job at once, with
its error logged, never retried; a job that does not decode fails the same way, and the queue
goes on. A job whose worker stops while it runs (a deploy) runs again instead of being
aborted; a job someone asked to abort is aborted. Workers send heartbeats;
`recover_stalled_jobs()` hands the jobs of a worker that died (SIGKILL, a lost machine) back
to the queue, to run again.

`lock=` serializes the commands of one aggregate through procrastinate's job locks: one runs
at a time, in the order they were sent (an alternative to optimistic conflict resolution for
very hot aggregates).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .._errors import TransientError, UndecodableCommandError
from ._jobs import CommandJobs, JobRetry

try:
    import procrastinate
    from procrastinate import JobContext
    from procrastinate.job_context import AbortReason
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "cqrs_resilience.contrib.procrastinate needs procrastinate: "
        "pip install 'cqrs-resilience[procrastinate]'"
    ) from exc

__all__ = ["CommandTask", "JobRetry", "command_task", "recover_stalled_jobs"]

C = TypeVar("C")
logger = logging.getLogger("cqrs_resilience")


class _Strategy(procrastinate.BaseRetryStrategy):
    """procrastinate's view of a `JobRetry`."""

    def __init__(self, retry: JobRetry) -> None:
        self.retry = retry

    def get_retry_decision(
        self, *, exception: BaseException, job: procrastinate.jobs.Job
    ) -> procrastinate.RetryDecision | None:
        wait = self.retry.decide(exception, job.attempts + 1)
        if wait is None:
            return None
        decision: procrastinate.RetryDecision = procrastinate.RetryDecision(
            retry_in={"milliseconds": round(wait * 1000)}
        )
        return decision


class CommandTask(Generic[C]):
    """A command type registered as a procrastinate task: `send()` commands to it."""

    def __init__(
        self,
        jobs: CommandJobs[C],
        task: procrastinate.tasks.Task[Any, Any, Any],
        lock: Callable[[C], str] | None,
    ) -> None:
        self.jobs = jobs
        self.task = task
        self.lock = lock

    @property
    def name(self) -> str:
        """The procrastinate task's name."""
        return self.task.name

    async def send(
        self,
        command: C,
        *,
        connection: Any = None,
        schedule_in_s: float | None = None,
        priority: int | None = None,
    ) -> int:
        """Queue `command` for a worker; the job's id. With `connection` (a psycopg
        `AsyncConnection` in a transaction of yours), the job is written in that transaction
        and runs only once you commit it (the transactional outbox)."""
        payload = self.jobs.encode(command)
        options: dict[str, Any] = {}
        if self.lock is not None:
            options["lock"] = f"{self.task.name}:{self.lock(command)}"
        if connection is not None:
            options["connection"] = connection
        if schedule_in_s is not None:
            options["schedule_in"] = {"milliseconds": round(schedule_in_s * 1000)}
        if priority is not None:
            options["priority"] = priority
        job_id: int = await self.task.configure(**options).defer_async(command=payload)
        return job_id


def command_task(
    app: procrastinate.App,
    handler: Any,
    command_type: type[C],
    *,
    name: str | None = None,
    queue: str = "commands",
    retry: JobRetry | None = None,
    lock: Callable[[C], str] | None = None,
) -> CommandTask[C]:
    """Register `handler` (a handler class instance, or an async function taking the command,
    such as a `pipeline()`) as the procrastinate task that runs `command_type` commands.

    `name` defaults to the command type's module and name; `queue` is the procrastinate
    queue its jobs go to; `retry` how transient failures are retried by the engine (a
    `JobRetry()` by default); `lock`, a function of the command (`lambda c: c.order_id`),
    runs the commands of one key one at a time, in the order they were sent.
    """
    jobs = CommandJobs(handler, command_type)
    strategy = _Strategy(retry if retry is not None else JobRetry())
    task_name = name or f"{command_type.__module__}.{command_type.__qualname__}"

    async def run(context: JobContext, command: Any) -> None:
        try:
            await jobs.run(command)
        except asyncio.CancelledError:
            if context.abort_reason() != AbortReason.SHUTDOWN:
                raise  # an abort someone asked for: the job is aborted
            # Its worker is stopping (a deploy, a scale-down): the job is not done, and runs
            # again on a worker; its writes so far replay. procrastinate would abort it.
            raise TransientError(
                f"job {context.job.id} of {task_name}: its worker stopped while it ran"
            ) from None
        except UndecodableCommandError as exc:
            logger.error("job %s of %s failed, not retried: %s", context.job.id, task_name, exc)
            raise
        except Exception as exc:
            wait = strategy.retry.decide(exc, context.job.attempts + 1)
            if wait is None:
                logger.error(
                    "job %s of %s failed, not retried: %s: %s",
                    context.job.id,
                    task_name,
                    type(exc).__name__,
                    exc,
                )
            raise

    run.__name__ = run.__qualname__ = task_name.rsplit(".", 1)[-1]
    task = app.task(name=task_name, queue=queue, retry=strategy, pass_context=True)(run)
    return CommandTask(jobs, task, lock)


async def recover_stalled_jobs(
    app: procrastinate.App, *, seconds_since_heartbeat: float = 30.0, queue: str | None = None
) -> int:
    """Send the jobs of workers that stopped sending heartbeats (killed, their machine lost)
    back to the queue, to run again; how many. Run it now and then: from a periodic task, a
    supervisor, or a cron job. A re-run is the same command: its effect still happens once.
    `queue` limits it to that procrastinate queue (the database may hold others' queues)."""
    stalled = list(
        await app.job_manager.get_stalled_jobs(
            seconds_since_heartbeat=seconds_since_heartbeat, queue=queue
        )
    )
    for job in stalled:
        await app.job_manager.retry_job(job)
    return len(stalled)
