"""The command line: exit statuses, stop signals, the temporary store, option messages, --help."""

from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
from pathlib import Path

import pytest

import cqrs_resilience
from cqrs_resilience import __main__ as cli
from cqrs_resilience import _demo
from cqrs_resilience._demo import Report, WorkerStats, default_options, plural
from tests.demo_runs import (
    children_of,
    demo_running,
    ended,
    needs_proc,
    read_until,
    start_demo,
    watching,
    worker_pids,
)

SMALL = ["demo", "--writers", "2", "--updates", "2", "--orders", "1"]


@needs_proc
@pytest.mark.parametrize(
    ("signum", "status", "processes"),
    [
        pytest.param(signal.SIGINT, 130, "1", id="SIGINT"),
        pytest.param(signal.SIGINT, 130, "2", id="SIGINT-2-processes"),
        pytest.param(signal.SIGTERM, 143, "1", id="SIGTERM"),
        pytest.param(signal.SIGTERM, 143, "2", id="SIGTERM-2-processes"),
        pytest.param(signal.SIGHUP, 129, "2", id="SIGHUP-2-processes"),
    ],
)
def test_a_stop_signal_stops_every_worker_and_removes_the_temporary_folder(
    tmp_path: Path, signum: int, status: int, processes: str
) -> None:
    """SIGINT, SIGTERM or SIGHUP mid-run: every worker process stopped and reaped, no
    temporary folder left, exit 128 + the signal, "interrupted" on stderr, no traceback."""
    argv = ["demo", "--writers", "4", "--updates", "500", "--processes", processes]
    with demo_running(argv, tmp_path) as run:
        # Progress goes to stderr a line per 10% when it is not a terminal: after "  N/2000
        # commands" with N > 0, the writers are busy.
        line = read_until(run, lambda line: re.match(r"  [1-9]\d*/2000 ", line) is not None)
        assert not line.startswith("  2000/"), "finished before the signal; give it more work"
        children = children_of(run.pid)
        workers = worker_pids(children)
        assert len(workers) == (0 if processes == "1" else int(processes)), children
        with watching(list(children)) as pidfds:
            run.send_signal(signum)
            assert run.wait(timeout=60) == status
            # The demo waited for its workers. multiprocessing's helper process (the resource
            # tracker) ends by itself once they and the demo are gone.
            assert [pid for pid in workers if Path(f"/proc/{pid}").exists()] == []
            assert all(ended(pidfd, timeout_s=10) for pidfd in pidfds.values()), children
        assert not list(tmp_path.glob("cqrs-resilience-demo-*"))
        _, err = run.communicate(timeout=60)
        assert "cqrs-resilience: interrupted" in err
        assert "Traceback" not in err


@needs_proc
def test_workers_stop_on_their_own_when_the_demo_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves the demo no time to clean up; its worker processes notice that it is
    gone and exit within seconds instead of writing on alone."""
    argv = ["demo", "--writers", "4", "--updates", "5000", "--processes", "2"]
    with demo_running(argv, tmp_path) as run:
        read_until(run, lambda line: line.startswith("  0/"))  # once the workers started
        children = children_of(run.pid)
        workers = worker_pids(children)
        assert len(workers) == 2, children
        with watching(list(children)) as pidfds:
            assert not any(ended(pidfds[pid], 0) for pid in workers)
            run.kill()
            assert all(ended(pidfd, timeout_s=5) for pidfd in pidfds.values()), children


def test_main_runs_from_another_thread(tmp_path: Path) -> None:
    """main() called off the main thread (where no signal handler can be set) still runs the
    demo, worker processes included, and returns its status."""
    statuses: list[int] = []
    argv = [*SMALL, "--processes", "2", "--sqlite", str(tmp_path / "d.sqlite3")]
    thread = threading.Thread(target=lambda: statuses.append(cli.main(argv)))
    thread.start()
    thread.join(timeout=120)
    assert statuses == [0]


def test_a_run_removes_its_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --keep, the temporary SQLite folder is gone when the command returns, as the
    table says."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert cli.main(SMALL) == 0
    assert not list(tmp_path.iterdir())
    assert "demo.sqlite3, removed at exit)" in capsys.readouterr().out


def test_keep_leaves_the_temporary_store_and_says_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--keep: the SQLite file stays and stderr names it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert cli.main([*SMALL, "--keep"]) == 0
    (kept,) = tmp_path.glob("cqrs-resilience-demo-*/demo.sqlite3")
    out, err = capsys.readouterr()
    assert f"kept {kept}" in err
    assert f"SQLite ({kept})" in out


def test_an_sqlite_file_given_stays(tmp_path: Path) -> None:
    """--sqlite PATH: the file is the user's and outlives the run."""
    path = tmp_path / "mine.sqlite3"
    assert cli.main([*SMALL, "--sqlite", str(path)]) == 0
    assert path.exists()


def _main_fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_a_missing_sqlite_directory_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --sqlite path in a folder that does not exist says so, with the demo's usage."""
    missing = tmp_path / "no" / "such"
    err = _main_fails([*SMALL, "--sqlite", str(missing / "d.sqlite3")], capsys)
    assert f"--sqlite: directory {missing} does not exist" in err
    assert "usage: cqrs-resilience demo" in err


def test_an_unwritable_sqlite_directory_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --sqlite path in a read-only folder says the folder is not writable."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):  # root writes anywhere: pretend it cannot here
        real = os.access

        def access(path: str | os.PathLike[str], mode: int) -> bool:
            return False if Path(path) == folder and mode & os.W_OK else real(path, mode)

        monkeypatch.setattr(os, "access", access)
    try:
        err = _main_fails([*SMALL, "--sqlite", str(folder / "d.sqlite3")], capsys)
    finally:
        folder.chmod(0o700)
    assert f"--sqlite: directory {folder} is not writable" in err


@pytest.mark.parametrize(("value", "message"), [("", "empty"), (".", "is a directory, not a file")])
def test_an_empty_or_directory_sqlite_path_is_an_error(
    value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--sqlite '' and --sqlite DIR are usage errors."""
    assert message in _main_fails([*SMALL, "--sqlite", value], capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--bogus"],
        ["demo", "--writers", "2", "--processes", "3"],
        ["demo", "--max-retries", "101"],
        ["demo", "--max-retries", "-1"],
    ],
)
def test_a_bad_demo_option_shows_the_demo_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Errors in demo options print `usage: cqrs-resilience demo ...`, not the top level's."""
    err = _main_fails(argv, capsys)
    assert err.startswith("usage: cqrs-resilience demo ")
    assert "cqrs-resilience demo: error:" in err


def test_max_retries_zero_turns_faults_into_visible_failures_exit_3(tmp_path: Path) -> None:
    """With no retries, injected faults reach callers: reported apart from losses, exit 3."""
    argv = [*SMALL, "--updates", "10", "--max-retries", "0", "--transient-rate", "0.5"]
    run = start_demo(argv, tmp_path)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 3, (out, err)
    assert "acknowledged updates present exactly once" in out
    assert "failed visibly (caller got the error)" in out
    (retries,) = [line for line in out.splitlines() if line.startswith("| retries")]
    assert retries.split("|")[2].strip() == "0"


def _report(**problems: list[str]) -> Report:
    options = default_options(writers=1, updates=2, sqlite_path="unused")
    stats = WorkerStats(commands=2, sent={"o": ["t1", "t2"]})
    if "failed" in problems:
        stats.failed_tokens = problems.pop("failed")
        stats.failed = len(stats.failed_tokens)
    return Report(
        options,
        stats,
        elapsed=1.0,
        lost=problems.get("lost", []),
        doubled=problems.get("doubled", []),
    )


@pytest.mark.parametrize(
    ("report", "code"),
    [
        (_report(), 0),
        (_report(lost=["t1"]), 1),
        (_report(doubled=["t1"]), 1),
        (_report(failed=["t2"]), 3),
        (_report(lost=["t1"], failed=["t2"]), 1),
    ],
)
def test_exit_status_says_lost_or_doubled_apart_from_visible_failures(
    report: Report, code: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """1 for a lost or doubled update (whatever else), 3 for visible failures alone, else 0."""
    monkeypatch.setattr(cli, "run_demo", lambda options: report)
    assert cli.main([*SMALL, "--sqlite", str(tmp_path / "d.sqlite3")]) == code


async def test_a_visibly_failed_update_that_is_absent_is_not_lost(tmp_path: Path) -> None:
    """The check counts only acknowledged updates as lost: a failed command's may be missing."""
    options = default_options(writers=1, updates=1, orders=1, sqlite_path=str(tmp_path / "f"))
    await _demo.create_orders(options)
    (order_id,) = options.order_ids()
    stats = WorkerStats(commands=1, failed=1, sent={order_id: ["w0-u0"]}, failed_tokens=["w0-u0"])
    report = Report(options, stats, elapsed=1.0)
    await _demo.verify(options, report)
    assert report.lost == []
    assert report.exactly_once
    assert report.failed_visibly == 1
    assert not report.ok


def test_version_comes_from_the_installed_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the program name and version and exits 0."""
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cqrs-resilience {cli._version()}"


def test_version_falls_back_to_the_package_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without installed metadata (a bare source tree), --version uses __version__."""
    import importlib.metadata

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli._version() == cqrs_resilience.__version__


def test_help_gives_ranges_and_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    """demo --help says each numeric option's range and every exit status."""
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in (
        "--writers N concurrent writers, 1 or more",
        "--updates N commands per writer, 1 or more",
        "--orders N hot orders, 1 or more",
        "0 <= R < 1 (default 0.1)",
        "0 <= R < 1 (default 0.02)",
        "--max-retries N retries of a command after a transient failure, 0 to 100 (default 12)",
        "1 to --writers",
        "any whole number",
        "--keep",
    ):
        assert text in out
    statuses = out.split("exit status:")[1]
    for code in ("0 ", "1 ", "2 ", "3 ", "130 interrupted", "143 interrupted by SIGTERM"):
        assert f" {code}" in statuses
    assert "(129: by SIGHUP)" in statuses


def test_output_uses_singulars_for_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One writer, one command, one order, one process: no "1 writers" anywhere."""
    argv = ["demo", "--writers", "1", "--updates", "1", "--orders", "1"]
    assert cli.main([*argv, "--sqlite", str(tmp_path / "d.sqlite3")]) == 0
    captured = capsys.readouterr()
    assert "1 writer x 1 command on 1 hot order," in captured.out
    assert "1 x 1 in 1 process " in captured.out
    assert "1/1 command (100%)" in captured.err
    assert plural(2, "hot order") == "2 hot orders"
    assert plural(0, "writer") == "0 writers"
