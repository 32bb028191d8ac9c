"""`bench_peers.py --profile`: where a command's time goes, ours against the floor, per row.

Each side runs each row three more times, each run measuring one thing, so that no counter
slows the others' figures:

1. **timed**: wall time per command, and CPU per command (`time.process_time`: every thread
   of the process; `time.thread_time`: the event loop's thread alone; PostgreSQL: its client
   backends' CPU from /proc, when the server runs on this machine).
2. **counted**: what a command asks of the database and of threads. SQLite: every statement
   each connection runs, by thread, with the time its `execute` took (a connection factory
   that times `execute`; COMMIT's time is the sync to disk). PostgreSQL: libpq's trace of
   every connection (`PGconn.trace`), read back as round trips (a request up to its
   ReadyForQuery) with the client's time from the request to the answer, labelled with their
   statement. Both: pool checkouts (`getconn`), jobs handed to threads
   (`ThreadPoolExecutor.submit`) and hand-backs to the event loop (`call_soon_threadsafe`).
3. **profiled**: cProfile on the event loop's thread and on the side's writer thread
   (SQLite), by own time per command; with the counts of encodes, decodes and digests.

Only the timed part of each run counts (the warm-up does not): counters are read at its
start and end, trace lines by their timestamps.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import ctypes
import gc
import os
import pstats
import re
import sqlite3
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
from _peers_common import Database, PostgresDatabase, Side, SQLiteDatabase

TOP_FUNCTIONS = 18


class Window(msgspec.Struct):
    """The timed part of a run, and what it did."""

    commands: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    loop_cpu_s: float = 0.0
    started_at: float = 0.0  # time.time(), to pick trace lines
    ended_at: float = 0.0
    server_cpu_s: float | None = None  # PostgreSQL's client backends, when on this machine


Hook = Callable[[], Any]


async def _run(
    db: Database,
    side: Side,
    plan: Sequence[Sequence[Any]],
    warm: Sequence[Sequence[Any]],
    at_start: Callable[[Any], Any] | None = None,
    at_end: Callable[[Any], Any] | None = None,
) -> Window:
    """The plan's commands, timed as `bench_peers` times them; `at_start(writer)` and
    `at_end(writer)` run (and are awaited if they return awaitables) around the timed part."""
    writer = await side.open(db, len(plan))
    window = Window()

    async def task(commands: Sequence[Any]) -> None:
        for c in commands:
            await writer.add(c.order_id, c.item, c.command_id)

    try:
        await asyncio.gather(*(task(commands) for commands in warm))
        if at_start is not None and asyncio.iscoroutine(started := at_start(writer)):
            await started
        window.started_at = time.time()
        cpu, loop_cpu, wall = time.process_time(), time.thread_time(), time.perf_counter()
        await asyncio.gather(*(task(commands) for commands in plan))
        window.wall_s = time.perf_counter() - wall
        window.loop_cpu_s = time.thread_time() - loop_cpu
        window.cpu_s = time.process_time() - cpu
        window.ended_at = time.time()
        if at_end is not None and asyncio.iscoroutine(ended := at_end(writer)):
            await ended
    finally:
        await writer.close()
    window.commands = sum(len(commands) for commands in plan)
    return window


class ServerCPU:
    """CPU time of the PostgreSQL server's client backends between `start` and `stop`, read
    from /proc (a server on this machine); None for SQLite or when /proc does not show it."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.pids: list[int] = []
        self.began = 0.0
        self.used_s: float | None = None

    async def start(self, writer: Any) -> None:
        if not isinstance(self.db, PostgresDatabase):
            return
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.db.dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid()"
            )
            self.pids = [row[0] for row in await cur.fetchall()]
        self.began = _cpu_of(self.pids) or 0.0

    async def stop(self, writer: Any) -> None:
        ended = _cpu_of(self.pids)
        if self.pids and ended is not None:
            self.used_s = ended - self.began


def _cpu_of(pids: list[int]) -> float | None:
    """User + system seconds of the processes `pids` (those still alive)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / ticks if pids else None


# --- counting ------------------------------------------------------------------------------


class Counts:
    """Calls of the counted functions, and statements by (thread, statement)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.statements: Counter[tuple[str, str]] = Counter()
        self.statement_s: defaultdict[tuple[str, str], float] = defaultdict(float)
        self.on = False
        self._lock = threading.Lock()

    def call(self, name: str) -> None:
        if self.on:
            with self._lock:
                self.calls[name] += 1

    def statement(self, sql: str, took_s: float) -> None:
        if self.on:
            key = (_thread_kind(), _label(sql))
            with self._lock:
                self.statements[key] += 1
                self.statement_s[key] += took_s


def _thread_kind() -> str:
    name = threading.current_thread().name
    if name == "MainThread":
        return "event loop"
    return re.sub(r"_\d+$", "", name)


_SPACES = re.compile(r"\s+")


def _label(sql: str) -> str:
    """A statement as a short label: its first words (and its table)."""
    text = _SPACES.sub(" ", sql).strip()
    text = re.sub(r"%\(\w+\)s|\$\d+|(?<![:\w]):\w+|\?|%s", "?", text)
    return text[:90]


class TimedConnection(sqlite3.Connection):
    """A sqlite3 connection that reports each `execute` and its time."""

    counts: Counts | None = None

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        began = time.perf_counter()
        try:
            return super().execute(sql, parameters)
        finally:
            if self.counts is not None:
                self.counts.statement(sql, time.perf_counter() - began)


@contextlib.contextmanager
def counting(counts: Counts, trace_dir: str) -> Iterator[list[str]]:
    """Count while the block runs: sqlite3 connections made are timed, psycopg connections
    made are traced (the trace files' paths are yielded), pool checkouts, thread jobs and
    hand-backs counted."""
    import psycopg
    from psycopg_pool import AsyncConnectionPool

    traces: list[str] = []
    original_connect = sqlite3.connect
    original_pg_connect = psycopg.AsyncConnection.connect.__func__  # type: ignore[attr-defined]
    original_getconn = AsyncConnectionPool.getconn
    original_submit = ThreadPoolExecutor.submit
    original_threadsafe = asyncio.BaseEventLoop.call_soon_threadsafe
    TimedConnection.counts = counts

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        kwargs["factory"] = TimedConnection
        conn: sqlite3.Connection = original_connect(*args, **kwargs)
        return conn

    async def pg_connect(cls: Any, *args: Any, **kwargs: Any) -> Any:
        conn = await original_pg_connect(cls, *args, **kwargs)
        path = os.path.join(trace_dir, f"conn-{len(traces)}.trace")
        traces.append(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        conn.pgconn.trace(fd)  # libpq writes every message there, stamped
        return conn

    async def getconn(self: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        counts.call("pool checkouts")
        return await original_getconn(self, timeout)

    def submit(self: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        counts.call("jobs handed to threads")
        return original_submit(self, fn, *args, **kwargs)

    def threadsafe(self: Any, callback: Any, *args: Any, context: Any = None) -> Any:
        counts.call("hand-backs to the loop")
        return original_threadsafe(self, callback, *args, context=context)

    sqlite3.connect = connect  # type: ignore[assignment]
    psycopg.AsyncConnection.connect = classmethod(pg_connect)  # type: ignore[assignment,method-assign]
    AsyncConnectionPool.getconn = getconn  # type: ignore[method-assign]
    ThreadPoolExecutor.submit = submit  # type: ignore[method-assign]
    asyncio.BaseEventLoop.call_soon_threadsafe = threadsafe  # type: ignore[assignment,method-assign]
    try:
        yield traces
    finally:
        sqlite3.connect = original_connect
        psycopg.AsyncConnection.connect = classmethod(original_pg_connect)  # type: ignore[assignment,method-assign]
        AsyncConnectionPool.getconn = original_getconn  # type: ignore[method-assign]
        ThreadPoolExecutor.submit = original_submit  # type: ignore[method-assign]
        asyncio.BaseEventLoop.call_soon_threadsafe = original_threadsafe  # type: ignore[method-assign]
        TimedConnection.counts = None


def _flush_c_streams() -> None:
    """libpq writes its trace through C stdio, buffered: flush every stream."""
    ctypes.CDLL(None).fflush(None)


_MESSAGE_START = re.compile(r"\n(?=\d{4}-\d\d-\d\d )")
_TRACE_LINE = re.compile(r"^(\S+ \S+)\t([FB])\t\d+\t(\w+)\t?(.*)$", re.DOTALL)
_PARSE = re.compile(r'^"([^"]*)" "(.*)" \d+', re.DOTALL)
_BIND = re.compile(r'^"[^"]*" "([^"]*)"')
_QUERY = re.compile(r'^"(.*)"$')


def round_trips(paths: list[str], window: Window) -> tuple[Counter[str], dict[str, float]]:
    """Round trips in the window from libpq traces: count and client seconds by statement."""
    from datetime import datetime

    counts: Counter[str] = Counter()
    seconds: defaultdict[str, float] = defaultdict(float)
    for path in paths:
        prepared: dict[str, str] = {}
        sent_at: float | None = None
        label = ""
        with open(path, errors="replace") as trace:
            # A message per line, but a statement's text keeps its own line breaks.
            messages = _MESSAGE_START.split(trace.read())
            for message in messages:
                match = _TRACE_LINE.match(message.rstrip("\n"))
                if match is None:
                    continue
                stamp, side, kind, rest = match.groups()
                rest = rest.strip()
                at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()
                if side == "F":
                    if sent_at is None:
                        sent_at, label = at, ""
                    if kind == "Parse" and (parsed := _PARSE.match(rest)):
                        name, sql = parsed.groups()
                        if name:
                            prepared[name] = sql
                        label = label or (_label(sql) if not name else f"(prepare) {_label(sql)}")
                    elif kind == "Bind" and (bound := _BIND.match(rest)) and not label:
                        label = _label(prepared.get(bound.group(1), "?"))
                    elif kind == "Query" and (query := _QUERY.match(rest)):
                        label = _label(query.group(1))
                elif kind == "ReadyForQuery" and sent_at is not None:
                    if window.started_at <= sent_at <= window.ended_at:
                        counts[label] += 1
                        seconds[label] += at - sent_at
                    sent_at = None
    return counts, seconds


# --- profiling ----------------------------------------------------------------------------


def _writer_executor(writer: Any) -> ThreadPoolExecutor | None:
    """The thread a side's SQLite writes run on, if it has one of its own."""
    repository = getattr(writer, "repository", None)
    found = getattr(repository, "_executor", None) or getattr(writer, "_executor", None)
    return found if isinstance(found, ThreadPoolExecutor) else None


class Profiles:
    def __init__(self) -> None:
        self.loop = cProfile.Profile()
        self.writer = cProfile.Profile()
        self.executor: ThreadPoolExecutor | None = None

    async def start(self, writer: Any) -> None:
        self.executor = _writer_executor(writer)
        if self.executor is not None:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.writer.enable)
        self.loop.enable()

    async def stop(self, writer: Any) -> None:
        self.loop.disable()
        if self.executor is not None:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.writer.disable)


_COUNTED_CALLS = {
    "encodes (msgpack)": "<method 'encode' of 'msgspec.msgpack.Encoder' objects>",
    "decodes (msgpack)": "<method 'decode' of 'msgspec.msgpack.Decoder' objects>",
    "encodes (JSON)": "<method 'encode' of 'msgspec.json.Encoder' objects>",
    "decodes (JSON)": "<method 'decode' of 'msgspec.json.Decoder' objects>",
    "digests (blake2b)": "<method 'digest' of '_blake2.blake2b' objects>",
}


def _stats(profile: cProfile.Profile) -> dict[tuple[str, int, str], tuple[int, float]]:
    """(file, line, function) -> (calls, own seconds)."""
    raw: dict[Any, Any] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    return {key: (value[1], value[2]) for key, value in raw.items()}


def _where(key: tuple[str, int, str]) -> str:
    file, line, function = key
    if file == "~":
        return function
    for marker in ("site-packages/", "cqrs_resilience/", "benchmarks/", "lib/python3"):
        if marker in file:
            file = file[file.index(marker) :].removeprefix("site-packages/")
            break
    return f"{file}:{line}({function})"


# --- report -----------------------------------------------------------------------------------


class SideProfile(msgspec.Struct):
    window: Window
    calls: dict[str, float]  # per command
    statements: list[tuple[str, str, float, float]]  # thread, statement, per command, µs each
    top: list[tuple[str, str, float, float]]  # thread, where, calls per command, µs per command
    groups: dict[str, float]  # "thread: what" -> own µs per command


def profile_side(db: Database, side: Side, plan: Any, warm: Any) -> SideProfile:
    def fresh() -> None:
        asyncio.run(db.restore(side))
        gc.collect()

    fresh()
    server = ServerCPU(db)
    window = asyncio.run(_run(db, side, plan, warm, server.start, server.stop))
    window.server_cpu_s = server.used_s
    per = 1 / window.commands

    fresh()
    counts = Counts()
    with tempfile.TemporaryDirectory() as trace_dir, counting(counts, trace_dir) as traces:

        def on(writer: Any) -> None:
            counts.on = True

        def off(writer: Any) -> None:
            counts.on = False
            _flush_c_streams()

        counted = asyncio.run(_run(db, side, plan, warm, on, off))
        _flush_c_streams()
        trips, trip_s = round_trips(traces, counted)
    calls = {name: n * per for name, n in counts.calls.items()}
    statements = [
        (thread, sql, n * per, counts.statement_s[(thread, sql)] / n * 1e6)
        for (thread, sql), n in counts.statements.most_common()
    ]
    if isinstance(db, PostgresDatabase):
        calls["round trips"] = sum(trips.values()) * per
        statements = [
            ("round trip", sql, n * per, trip_s[sql] / n * 1e6) for sql, n in trips.most_common()
        ]
    else:
        calls["statements"] = sum(counts.statements.values()) * per

    fresh()
    profiles = Profiles()
    asyncio.run(_run(db, side, plan, warm, profiles.start, profiles.stop))
    top: list[tuple[str, str, float, float]] = []
    groups: defaultdict[str, float] = defaultdict(float)
    threads = [("event loop", profiles.loop)]
    if profiles.executor is not None:
        threads.append(("writer", profiles.writer))
    for thread, profile in threads:
        stats = _stats(profile)
        for name, function in _COUNTED_CALLS.items():
            n = sum(c for k, (c, _) in stats.items() if k[2] == function)
            if n:
                calls[f"{name}, {thread}"] = n * per
        ranked = sorted(stats.items(), key=lambda kv: kv[1][1], reverse=True)
        for key, (n, own_s) in ranked[:TOP_FUNCTIONS]:
            top.append((thread, _where(key), n * per, own_s * per * 1e6))
        for key, (_, own_s) in stats.items():
            groups[f"{thread}: {_group(key)}"] += own_s * per * 1e6
    return SideProfile(window=window, calls=calls, statements=statements, top=top, groups=groups)


# Own time, grouped by what it was spent on: the first rule that matches a function names it.
_GROUPS = (
    ("waiting (epoll, queue get: idle)", ("<method 'poll' of", "<method 'get' of '_queue")),
    ("msgspec encode/decode", ("msgspec.",)),
    ("digests", ("_blake2", "hashlib")),
    ("sqlite3 (statements, commit)", ("sqlite3.",)),
    ("psycopg (statements, adaptation)", ("psycopg/",)),
    ("psycopg_pool (checkouts)", ("psycopg_pool/",)),
    ("cqrs_resilience/stores", ("cqrs_resilience/stores/",)),
    ("cqrs_resilience (behaviours, write path)", ("cqrs_resilience/",)),
    ("the side's own code (benchmarks/)", ("benchmarks/",)),
    (
        "asyncio, threads, selectors",
        ("asyncio/", "concurrent/", "threading", "selectors", "socket"),
    ),
)


def _group(key: tuple[str, int, str]) -> str:
    where = f"{key[0]} {key[2]}"
    for name, markers in _GROUPS:
        if any(marker in where for marker in markers):
            return name
    return "other"


def profile_rows(db: Database, sides: Sequence[Side], rows: Sequence[tuple[Any, Any, Any]]) -> None:
    """Print, per (row, plan, warm-up plan), ours against the floor: the timed figures, the
    counts, the statements and the functions that took the most time."""
    print(f"\n## {db.name}: where a command's time goes (load {_load()})")
    for row, plan, warm in rows:
        found = {side.name: profile_side(db, side, plan, warm) for side in sides}
        print(f"\n### {db.name}, {row.label} ({row.commands:,} commands)\n")
        names = list(found)
        print(f"| per command | {' | '.join(names)} |\n|---|{'---:|' * len(names)}")
        windows = [found[n].window for n in names]
        for label, field in (
            ("wall (µs)", "wall_s"),
            ("CPU, all our threads (µs)", "cpu_s"),
            ("CPU, event loop thread (µs)", "loop_cpu_s"),
        ):
            cells = [f"{getattr(w, field) / w.commands * 1e6:,.0f}" for w in windows]
            print(f"| {label} | {' | '.join(cells)} |")
        if all(w.server_cpu_s is not None for w in windows):
            cells = [f"{(w.server_cpu_s or 0) / w.commands * 1e6:,.0f}" for w in windows]
            print(f"| CPU, PostgreSQL's backends (µs) | {' | '.join(cells)} |")
        keys = sorted({k for n in names for k in found[n].calls})
        for key in keys:
            cells = [f"{found[n].calls.get(key, 0):.2f}" for n in names]
            print(f"| {key} | {' | '.join(cells)} |")
        for name in names:
            what = "round trips" if isinstance(db, PostgresDatabase) else "statements"
            print(f"\n{name}: {what} per command (µs each: {_timed(db)})\n")
            print("| thread | statement | per command | µs each |\n|---|---|---:|---:|")
            for thread, sql, n, us in found[name].statements:
                if n >= 0.005:
                    print(f"| {thread} | `{sql}` | {n:.2f} | {us:,.0f} |")
        print("\nOwn time by what it was spent on (cProfile, so inflated; µs per command)\n")
        print(f"| thread: spent on | {' | '.join(names)} |\n|---|{'---:|' * len(names)}")
        for group in sorted({g for n in names for g in found[n].groups}):
            cells = [f"{found[n].groups.get(group, 0):,.0f}" for n in names]
            print(f"| {group} | {' | '.join(cells)} |")
        for name in names:
            print(f"\n{name}: functions by own time (cProfile; µs per command)\n")
            print("| thread | function | calls per command | own µs per command |")
            print("|---|---|---:|---:|")
            for thread, where, n, us in found[name].top:
                if us >= 1:
                    print(f"| {thread} | `{where}` | {n:.2f} | {us:,.1f} |")


def _timed(db: Database) -> str:
    if isinstance(db, SQLiteDatabase):
        return "the `execute` call, on the thread that ran it"
    return "the client's, from sending the request to ReadyForQuery"


def _load() -> str:
    return ", ".join(f"{n:.2f}" for n in os.getloadavg())
