"""A throwaway PostgreSQL server, for the demo and the tests: `with PostgresServer() as dsn:`.

It is made with the system's `initdb`/`pg_ctl` (or the binaries of the `pgserver` wheel) in a
temporary directory, listens on a free loopback port and trusts local connections. PostgreSQL
refuses to run as root, so as root the server runs as the `postgres` user (or `nobody`). A
small watchdog process holds a pipe to us: when we close it, or die (even by SIGKILL), it
stops the server and deletes the directory, so no server outlives the process that made it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

_BIN_GLOBS = (
    "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu (apt-get install postgresql)
    "/usr/pgsql-*/bin",  # RHEL, Fedora (PGDG)
    "/usr/local/pgsql/bin",  # built from source
    "/opt/homebrew/opt/postgresql*/bin",
)
_START_ATTEMPTS = 3
_INITDB_OPTIONS = ("-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
_SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    # A throwaway server: durability is worth nothing, speed is.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "deadlock_timeout": "100ms",
}


class PostgresUnavailableError(RuntimeError):
    """No PostgreSQL server could be found or started; the message says why."""


def find_bin_dir() -> Path:
    """The directory holding `initdb`, `pg_ctl` and `postgres`: PATH first, then known places."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path))

    for pattern in _BIN_GLOBS:
        candidates += [Path(p) for p in sorted(glob.glob(pattern), key=version, reverse=True)]
    # Last resort: the binaries the `pgserver` wheel ships (in the dev extra), so the test
    # command works on a machine with nothing but Python and pip.
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "pginstall" / "bin")
    for directory in candidates:
        if all((directory / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return directory
    raise PostgresUnavailableError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH, in "
        f"{', '.join(_BIN_GLOBS)} or in the pgserver package; install the PostgreSQL "
        "server (apt-get install postgresql, brew install postgresql) or pip install pgserver"
    )


class PostgresServer:
    """A throwaway PostgreSQL cluster; `start()` returns its DSN, `stop()` removes it."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        self.bin_dir = bin_dir or find_bin_dir()
        self.dsn: str | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        self._user = _unprivileged_user() if is_root else None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> str:
        """Create and start the cluster; the DSN connects as superuser `postgres`."""
        # As root, under /tmp: the server's user must be able to reach the directory.
        base = "/tmp" if self._user is not None and os.path.isdir("/tmp") else None
        root = Path(tempfile.mkdtemp(prefix="cqrs-pg-", dir=base))
        data, log = root / "data", root / "server.log"
        if self._user is not None:
            os.chown(root, self._user.pw_uid, self._user.pw_gid)
        self._watchdog = self._start_watchdog(root, data)
        try:
            self._run("initdb", "-D", data, *_INITDB_OPTIONS, cwd=root)
            settings = " ".join(f"-c {k}={v}" for k, v in _SERVER_SETTINGS.items())
            error = ""
            for _ in range(_START_ATTEMPTS):  # another process may take the port we picked
                port = _free_port()
                options = f"-p {port} -k {root} {settings}"
                pg_ctl = ["-D", data, "-l", log, "-w", "-t", "30", "-o", options, "start"]
                started = self._run("pg_ctl", *pg_ctl, cwd=root, check=False)
                if started.returncode == 0:
                    self.dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
                    return self.dsn
                error = _tail(log) or started.stdout.decode(errors="replace")
            raise PostgresUnavailableError(f"pg_ctl could not start PostgreSQL:\n{error}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server and delete its directory (the watchdog does both). Idempotent."""
        watchdog, self._watchdog = self._watchdog, None
        self.dsn = None
        if watchdog is None:
            return
        assert watchdog.stdin is not None
        watchdog.stdin.close()
        try:
            watchdog.wait(timeout=60)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            raise

    def _run(
        self, tool: str, *args: object, cwd: Path, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        command = [str(self.bin_dir / tool), *map(str, args)]
        uid, gid = (self._user.pw_uid, self._user.pw_gid) if self._user else (None, None)
        result = subprocess.run(
            command,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
            user=uid,
            group=gid,
            extra_groups=None if uid is None else [],
        )
        if check and result.returncode != 0:
            output = result.stdout.decode(errors="replace")
            raise PostgresUnavailableError(f"{tool} failed ({result.returncode}):\n{output}")
        return result

    def _start_watchdog(self, root: Path, data: Path) -> subprocess.Popen[bytes]:
        # Its own session: a Ctrl-C meant for pytest must not kill it before it cleans up.
        user = None if self._user is None else (self._user.pw_uid, self._user.pw_gid)
        pg_ctl = str(self.bin_dir / "pg_ctl")
        return subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, pg_ctl, str(data), str(root), repr(user)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


_WATCHDOG = """
import ast, os, shutil, subprocess, sys
pg_ctl, data, root, user = sys.argv[1], sys.argv[2], sys.argv[3], ast.literal_eval(sys.argv[4])
sys.stdin.buffer.read()  # returns when the test process closes the pipe or dies
as_user = {} if user is None else {"user": user[0], "group": user[1], "extra_groups": []}
if os.path.exists(os.path.join(data, "postmaster.pid")):
    for mode in ("fast", "immediate"):
        stop = [pg_ctl, "-D", data, "-m", mode, "-w", "-t", "20", "stop"]
        if subprocess.run(stop, cwd=root, capture_output=True, **as_user).returncode == 0:
            break
shutil.rmtree(root, ignore_errors=True)
"""


def _unprivileged_user() -> Any:
    import pwd  # Unix only, and only needed as root

    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailableError(
        "running as root and neither user 'postgres' nor 'nobody' exists"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
