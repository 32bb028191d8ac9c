"""The demo on a queue (`--engine procrastinate`): the same table and exactly-once check, jobs
retried by the engine, a killed worker's jobs recovered, a throwaway server, clean stops."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import pytest

from cqrs_resilience import _pg_server
from cqrs_resilience.__main__ import main
from tests.demo_runs import children_of, demo_running, ended, needs_proc, read_until, watching

pytest.importorskip("procrastinate")

QUEUE = ["demo", "--engine", "procrastinate"]
SMALL = ["--writers", "6", "--updates", "5"]


def row(out: str, metric: str) -> str:
    """The value of one row of the demo's table."""
    found = re.search(rf"^\| {re.escape(metric)} +\| (.*?) +\|$", out, re.MULTILINE)
    assert found, f"no {metric!r} row in:\n{out}"
    return found.group(1)


@pytest.mark.postgres
def test_jobs_run_by_worker_processes_pass_the_exactly_once_check(
    pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two worker processes run the updates as jobs: the same table as the inline engine,
    plus the queue's rows, and every update in its order exactly once."""
    code = main([*QUEUE, "--workers", "2", "--dsn", pg_database, *SMALL])
    out = capsys.readouterr().out
    assert code == 0, out
    assert row(out, "every update exactly once").startswith("PASS: 30/30 updates present")
    layout = "6 x 5 as jobs, 2 worker processes (3 jobs at a time each)"
    assert row(out, "writers x updates") == layout
    assert row(out, "commands") == "30 (0 failed visibly)"
    assert row(out, "store") == "PostgreSQL"
    for metric in ("attempts (process calls)", "retries (transient)", "latency p99"):
        assert row(out, metric)
    assert row(out, "stalled jobs recovered") == "0"
    assert row(out, "jobs retried by the engine").isdigit()


@pytest.mark.postgres
def test_failures_that_outlive_the_handler_are_retried_by_the_engine(
    pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no retries in the handler, each transient fault fails a run of its job, and the
    engine runs the job again: nothing fails visibly, nothing is lost or doubled."""
    argv = [*QUEUE, "--dsn", pg_database, *SMALL, "--max-retries", "0", "--transient-rate", "0.25"]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert int(row(out, "jobs retried by the engine")) > 0
    assert row(out, "retries (transient)") == "0"
    assert row(out, "every update exactly once").startswith("PASS: 30/30")


@pytest.mark.postgres
def test_with_lock_orders_one_orders_jobs_never_conflict(
    pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--lock-orders`: each order's jobs run one at a time, in the order sent (job locks):
    no conflict at all, and every update present exactly once."""
    code = main([*QUEUE, "--workers", "2", "--lock-orders", "--dsn", pg_database, *SMALL])
    out = capsys.readouterr().out
    assert code == 0, out
    assert row(out, "one order at a time") == "yes: procrastinate job locks"
    assert row(out, "conflicts detected (ConcurrencyErrors)") == "0"
    assert row(out, "every update exactly once").startswith("PASS: 30/30 updates present")


@pytest.mark.postgres
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_a_worker_killed_mid_job_has_its_jobs_recovered(
    pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--kill-worker: a worker process SIGKILLed right after a write, its job not marked done;
    the job is recovered and run again, another worker takes its place, and every update is
    in its order exactly once."""
    code = main([*QUEUE, "--workers", "2", "--kill-worker", "--dsn", pg_database, *SMALL])
    out = capsys.readouterr().out
    assert code == 0, out
    assert row(out, "worker processes killed") == "1 (SIGKILL mid-job), replaced"
    assert int(row(out, "stalled jobs recovered")) >= 1
    assert row(out, "every update exactly once").startswith("PASS: 30/30")


@pytest.mark.usefixtures("pg_binaries")
def test_without_a_dsn_a_throwaway_server_is_started_and_removed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --dsn: the run gets a PostgreSQL server of its own, says so, and the server is
    gone when the command returns."""
    import psycopg

    started: list[str] = []
    start = _pg_server.PostgresServer.start

    def recorded(server: _pg_server.PostgresServer) -> str:
        started.append(start(server))
        return started[-1]

    monkeypatch.setattr(_pg_server.PostgresServer, "start", recorded)
    code = main([*QUEUE, "--writers", "2", "--updates", "2", "--workers", "1"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "starting a throwaway PostgreSQL server" in err
    assert row(out, "store") == "PostgreSQL (a throwaway server, removed at exit)"
    assert row(out, "every update exactly once").startswith("PASS: 4/4")
    [dsn] = started
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=5).close()


def test_without_a_dsn_or_server_binaries_the_error_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --dsn and no PostgreSQL installed: exit 2 with one line saying to pass --dsn or
    install PostgreSQL, no traceback."""

    def no_binaries() -> Path:
        raise _pg_server.PostgresUnavailableError("PostgreSQL server binaries not found")

    monkeypatch.setattr(_pg_server, "find_bin_dir", no_binaries)
    assert main([*QUEUE, *SMALL]) == 2
    err = capsys.readouterr().err
    assert "--engine procrastinate runs on PostgreSQL: pass --dsn" in err
    assert "install the PostgreSQL server" in err
    assert "Traceback" not in err


def test_without_procrastinate_installed_the_error_gives_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--engine procrastinate where procrastinate is missing: a usage error naming the
    package and the pip command that installs it."""
    monkeypatch.setitem(sys.modules, "procrastinate", None)
    with pytest.raises(SystemExit) as info:
        main([*QUEUE, "--dsn", "postgresql://localhost/db"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "needs procrastinate: pip install 'cqrs-resilience[procrastinate]'" in err


def _watchdog(children: dict[int, str]) -> tuple[int, Path]:
    """The throwaway server's watchdog among the demo's children, and the server's folder."""
    for pid in children:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if len(args) > 5 and args[1] == b"-c" and b"pg_ctl" in args[2]:
            return pid, Path(args[5].decode())
    pytest.fail(f"no watchdog among {children}")


@needs_proc
@pytest.mark.usefixtures("pg_binaries")
@pytest.mark.parametrize(
    ("signum", "status"),
    [
        pytest.param(signal.SIGINT, 130, id="SIGINT"),
        pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
    ],
)
def test_a_stop_signal_stops_the_workers_and_the_throwaway_server(
    tmp_path: Path, signum: int, status: int
) -> None:
    """SIGINT or SIGTERM mid-run: every worker process stopped, the throwaway server stopped
    and its folder removed, exit 128 + the signal, no traceback."""
    argv = [*QUEUE, "--workers", "2", "--writers", "4", "--updates", "1000"]
    with demo_running(argv, tmp_path) as run:
        read_until(run, lambda line: re.match(r"  [1-9]\d*/4000 ", line) is not None)
        children = children_of(run.pid)
        watchdog, folder = _watchdog(children)
        postmaster = int((folder / "data" / "postmaster.pid").read_text().split()[0])
        with watching([*children, postmaster]) as pidfds:
            run.send_signal(signum)
            assert run.wait(timeout=60) == status
            assert ended(pidfds[watchdog], 0)  # the demo waited for the server's removal
            assert all(ended(pidfd, timeout_s=10) for pidfd in pidfds.values()), children
        assert not folder.exists()
        _, err = run.communicate(timeout=60)
        assert "cqrs-resilience: interrupted" in err
        assert "Traceback" not in err
