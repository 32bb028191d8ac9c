"""The demo command: it runs on each store, reports honestly, and refuses bad options."""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cqrs_resilience.__main__ import main
from cqrs_resilience._demo import (
    DemoOrder,
    Report,
    WorkerStats,
    create_orders,
    default_options,
    open_repository,
    run_writers,
    stop_workers,
    verify,
)


def test_demo_on_sqlite_reports_every_update_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A small demo run on a SQLite file passes its exactly-once check and exits 0."""
    code = main(
        ["demo", "--writers", "6", "--updates", "5", "--sqlite", str(tmp_path / "d.sqlite3")]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS: 30/30 updates present exactly once" in out
    for metric in ("attempts", "retries", "conflicts detected", "conflicts resolved", "p99"):
        assert metric in out


def test_demo_with_worker_processes_on_sqlite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Worker processes share one SQLite file and still lose nothing."""
    code = main(
        [
            "demo",
            "--writers",
            "4",
            "--updates",
            "4",
            "--processes",
            "2",
            "--sqlite",
            str(tmp_path / "d.sqlite3"),
        ]
    )
    assert code == 0
    assert "PASS: 16/16" in capsys.readouterr().out


@pytest.mark.postgres
def test_demo_with_worker_processes_on_postgres(
    pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dsn with --processes: many workers, one PostgreSQL, nothing lost or doubled."""
    code = main(
        ["demo", "--dsn", pg_database, "--processes", "4", "--writers", "8", "--updates", "4"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS: 32/32" in out
    assert "PostgreSQL" in out


async def test_the_check_catches_a_lost_update(tmp_path: Path) -> None:
    """If an update is missing from the final state, the report fails and names it."""
    options = default_options(writers=2, updates=2, orders=1, sqlite_path=str(tmp_path / "x"))
    await create_orders(options)
    stats = await run_writers(options, [0, 1], lambda: None)
    repository = await open_repository(options)
    (order_id,) = options.order_ids()
    order = (await repository.retrieve([order_id]))[0]
    dropped = order.items.pop()
    await repository.persist(DemoOrder(id=order_id, version=order.version, items=order.items))
    await repository.close()
    report = Report(options, stats, elapsed=1.0)
    await verify(options, report)
    assert not report.ok
    assert report.lost == [dropped["id"]]
    assert report.bad_versions  # one more version than items now


async def test_the_check_catches_a_doubled_update(tmp_path: Path) -> None:
    """An update applied twice fails the check."""
    options = default_options(writers=1, updates=1, orders=1, sqlite_path=str(tmp_path / "y"))
    await create_orders(options)
    stats = await run_writers(options, [0], lambda: None)
    repository = await open_repository(options)
    (order_id,) = options.order_ids()
    order = (await repository.retrieve([order_id]))[0]
    items = [*order.items, order.items[0]]
    await repository.persist(DemoOrder(id=order_id, version=order.version, items=items))
    await repository.close()
    report = Report(options, stats, elapsed=1.0)
    await verify(options, report)
    assert report.doubled == [order.items[0]["id"]]
    assert not report.ok


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--writers", "0"], "--writers"),
        (["demo", "--transient-rate", "1.5"], "rate"),
        (["demo", "--timeout-rate", "x"], "not a number"),
        (["demo", "--dsn", "mysql://localhost/db"], "PostgreSQL URL"),
        (["demo", "--writers", "2", "--processes", "3"], "cannot exceed"),
        (["demo", "--dsn", "postgresql://h/d", "--sqlite", "f"], "not both"),
        (["demo", "--bogus"], "unrecognized"),
        (["demo", "--engine", "celery"], "invalid choice: 'celery'"),
        (["demo", "--workers", "2"], "--workers needs --engine procrastinate"),
        (["demo", "--kill-worker"], "--kill-worker needs --engine procrastinate"),
        (["demo", "--lock-orders"], "--lock-orders needs --engine procrastinate"),
        (
            ["demo", "--engine", "procrastinate", "--sqlite", "f"],
            "--sqlite does not go with --engine procrastinate",
        ),
        (
            ["demo", "--engine", "procrastinate", "--processes", "2"],
            "--processes does not go with --engine procrastinate",
        ),
        (
            ["demo", "--engine", "procrastinate", "--keep"],
            "--keep does not go with --engine procrastinate",
        ),
        (
            ["demo", "--engine", "procrastinate", "--writers", "2", "--workers", "3"],
            "--workers (3) cannot exceed --writers (2)",
        ),
    ],
)
def test_bad_options_get_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad options exit with status 2 and say what is wrong."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    """demo --help lists every option."""
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    for option in (
        "--writers",
        "--updates",
        "--orders",
        "--transient-rate",
        "--timeout-rate",
        "--dsn",
        "--sqlite",
        "--processes",
        "--seed",
        "--max-retries",
        "--keep",
        "--engine",
        "--workers",
        "--kill-worker",
        "--lock-orders",
    ):
        assert option in out


def test_an_unreachable_database_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A DSN naming no server ends with a one-line error, not a traceback."""
    code = main(["demo", "--dsn", "postgresql://nobody:secret@127.0.0.1:1/none"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error" in err
    assert "secret" not in err


def test_worker_stats_add_up() -> None:
    """Stats from several processes are summed field by field."""
    a = WorkerStats(commands=2, retries=1, latencies_ms=[1.0], sent={"o": ["t1"]})
    b = WorkerStats(commands=3, retries=2, latencies_ms=[2.0], sent={"o": ["t2"]})
    a.add(b)
    assert (a.commands, a.retries, a.latencies_ms, a.sent) == (
        5,
        3,
        [1.0, 2.0],
        {"o": ["t1", "t2"]},
    )


def test_module_entry_point_runs() -> None:
    """python -m cqrs_resilience without a command prints help and exits 2."""
    assert main([]) == 2
    assert asyncio  # the module imports asyncio for the async tests above


def _deaf_to_sigterm(ready: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    threading.Event().wait()  # forever: only SIGKILL ends this


def test_a_worker_that_ignores_terminate_is_killed_after_the_grace() -> None:
    """Stopping worker processes is bounded: one still running after the grace is killed,
    and every one is reaped."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    deaf = context.Process(target=_deaf_to_sigterm, args=(ready,), daemon=True)
    deaf.start()
    try:
        assert ready.wait(timeout=30), "the worker did not start"
        started = time.monotonic()
        stop_workers([deaf], terminate=True, grace_s=0.2)
        assert time.monotonic() - started < 10
        assert deaf.exitcode == -signal.SIGKILL
    finally:
        if deaf.exitcode is None:
            deaf.kill()
            deaf.join()


def test_stopping_workers_that_were_never_started_is_a_no_op() -> None:
    """An interrupt before the workers started stops nothing and waits for nothing."""
    workers = [multiprocessing.get_context("spawn").Process(target=print)]
    stop_workers(workers, terminate=True, grace_s=0.0)
    assert workers[0].exitcode is None
