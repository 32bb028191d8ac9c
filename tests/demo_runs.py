"""Running the demo command as a process and watching its children (Linux: /proc, pidfds)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def start_demo(args: list[str], tmp_path: Path) -> subprocess.Popen[str]:
    """`python -m cqrs_resilience ...` with this tree first on the path, temp files in tmp_path."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TMPDIR": str(tmp_path),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "cqrs_resilience", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def read_until(
    run: subprocess.Popen[str], wanted: Callable[[str], bool], timeout_s: float = 60
) -> str:
    """The first stderr line `wanted` accepts; the run is killed if none comes in time."""
    assert run.stderr is not None
    watchdog = threading.Timer(timeout_s, run.kill)
    watchdog.start()
    seen = []
    try:
        for line in run.stderr:
            seen.append(line)
            if wanted(line):
                return line
    finally:
        watchdog.cancel()
    pytest.fail(f"the demo ended (or took over {timeout_s} s) before such a line: {seen}")


def children_of(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # it ended meanwhile
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found[int(entry.name)] = command
    return found


def ended(pidfd: int, timeout_s: float) -> bool:
    """Whether the process behind `pidfd` has ended, waiting up to `timeout_s` for it."""
    return bool(select.select([pidfd], [], [], timeout_s)[0])


@contextlib.contextmanager
def watching(pids: list[int]) -> Iterator[dict[int, int]]:
    """A pidfd per process (immune to pid reuse); any still running afterwards is killed."""
    pidfds = {pid: os.pidfd_open(pid) for pid in pids}
    try:
        yield pidfds
    finally:
        for pidfd in pidfds.values():
            if not ended(pidfd, 0):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)


needs_proc = pytest.mark.skipif(
    not hasattr(os, "pidfd_open") or not Path("/proc/self/stat").exists(),
    reason="watches processes through /proc and pidfds (Linux)",
)


@contextlib.contextmanager
def demo_running(args: list[str], tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """`start_demo`, and the demo and its children killed should a check fail before it ends."""
    run = start_demo(args, tmp_path)
    try:
        yield run
    finally:
        if run.poll() is None:
            with watching(list(children_of(run.pid))):
                run.kill()
        run.wait()


def worker_pids(children: dict[int, str]) -> list[int]:
    """The demo's worker processes among its children."""
    return [pid for pid, command in children.items() if "multiprocessing.spawn" in command]
