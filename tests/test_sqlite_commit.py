"""Group commit on one SQLite writer thread: one transaction for the writes queued together,
each with its own outcome, and never a transaction left open."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cqrs_resilience.stores._sqlite_commit import GroupCommit, WriterClosedError, transaction
from tests.conftest_stores import thread_blocked


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[tuple[ThreadPoolExecutor, Callable[[], sqlite3.Connection]]]:
    """A writer thread and the one connection it uses, to a table `t` of unique keys."""
    path = tmp_path / "db"
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    setup.close()
    executor = ThreadPoolExecutor(max_workers=1)
    held: list[sqlite3.Connection] = []

    def connect() -> sqlite3.Connection:
        if not held:
            held.append(sqlite3.connect(path, isolation_level=None))
        return held[0]

    yield executor, connect
    executor.submit(lambda: [c.close() for c in held]).result()
    executor.shutdown()


def insert(
    connect: Callable[[], sqlite3.Connection], k: int, then: Exception | None = None
) -> Callable[[], int]:
    def write() -> int:
        conn = connect()
        with transaction(conn):
            conn.execute("INSERT INTO t VALUES (?)", (k,))
            if then is not None:
                raise then
        return k

    return write


async def committed(writer: Any, *writes: Callable[[], Any]) -> list[Any]:
    """Queue `writes` while the writer thread is busy, so they commit together."""
    executor, connect = writer
    commits = GroupCommit(executor, connect)
    with thread_blocked(executor):
        futures = [commits.add(write) for write in writes]
    return await asyncio.gather(*futures, return_exceptions=True)


def stored(writer: Any) -> list[int]:
    executor, connect = writer
    rows = executor.submit(lambda: connect().execute("SELECT k FROM t ORDER BY k").fetchall())
    return [k for (k,) in rows.result()]


async def test_a_write_that_fails_on_its_own_rolls_back_alone(writer):
    _, connect = writer
    outcomes = await committed(
        writer, insert(connect, 1), insert(connect, 2, ValueError("no")), insert(connect, 3)
    )
    assert outcomes[0] == 1 and outcomes[2] == 3
    assert isinstance(outcomes[1], ValueError)
    assert stored(writer) == [1, 3]


async def test_a_database_error_in_one_write_fails_that_write_alone(writer):
    """A write the database refuses (a constraint) fails alone: the commit is rolled back and
    every write runs again on its own, so the others are stored with their own outcomes."""
    _, connect = writer
    outcomes = await committed(writer, insert(connect, 1), insert(connect, 1), insert(connect, 2))
    assert outcomes[0] == 1 and outcomes[2] == 2
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    assert stored(writer) == [1, 2]


async def test_a_write_the_driver_cannot_bind_fails_alone(writer):
    """One write with a parameter the driver cannot bind (a UUID) among ten valid ones: the
    ten are stored, the one fails with the driver's error."""
    _, connect = writer

    def unbindable() -> None:
        with transaction(connect()):
            connect().execute("INSERT INTO t VALUES (?)", (uuid.uuid4(),))

    writes = [insert(connect, k) for k in range(10)]
    outcomes = await committed(writer, *writes[:5], unbindable, *writes[5:])
    assert outcomes[:5] + outcomes[6:] == list(range(10))
    assert isinstance(outcomes[5], sqlite3.Error)
    assert stored(writer) == list(range(10))


async def test_when_the_lock_cannot_be_had_every_write_fails_and_none_is_stored(tmp_path):
    """Another connection holds the write lock past the timeout: every write of the batch
    fails with the lock error (each can be retried), and nothing is stored."""
    path = tmp_path / "db"
    with closing(sqlite3.connect(path, isolation_level=None)) as setup:
        setup.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    executor = ThreadPoolExecutor(max_workers=1)
    conn = executor.submit(sqlite3.connect, path, timeout=0.01, isolation_level=None).result()
    with closing(sqlite3.connect(path, isolation_level=None)) as blocker:
        blocker.execute("BEGIN IMMEDIATE")
        outcomes = await committed(
            (executor, lambda: conn), *(insert(lambda: conn, k) for k in (1, 2))
        )
        blocker.execute("ROLLBACK")
    assert all(isinstance(o, sqlite3.OperationalError) for o in outcomes), outcomes
    assert executor.submit(lambda: conn.in_transaction).result() is False
    assert executor.submit(lambda: conn.execute("SELECT k FROM t").fetchall()).result() == []
    executor.submit(conn.close).result()
    executor.shutdown()


async def test_close_runs_after_every_queued_job_and_refuses_later_ones(writer):
    """`close(last)` runs `last` after every job queued before it, and a job queued after is
    refused at once (`WriterClosedError`), never run on a closed connection."""
    executor, connect = writer
    commits = GroupCommit(executor, connect)
    order: list[str] = []
    with thread_blocked(executor):
        queued = [commits.add(insert(connect, k)) for k in (1, 2)]
        closing_down = commits.close(lambda: order.append("last"))
        with pytest.raises(WriterClosedError):
            commits.add(insert(connect, 3))
    assert await asyncio.gather(*queued) == [1, 2]
    await closing_down
    assert order == ["last"]
    assert stored(writer) == [1, 2]


def test_outcomes_reach_each_writers_own_loop_even_when_another_loop_closed(writer):
    """Writes queued from two event loops commit together; one loop is closed before the
    commit: the other still gets its outcome, and the commit is not disturbed."""
    executor, connect = writer
    commits = GroupCommit(executor, connect)
    with thread_blocked(executor):

        async def queue_and_leave() -> None:
            commits.add(insert(connect, 1))  # its loop ends before the outcome comes

        asyncio.run(queue_and_leave())
        got: list[int] = []

        def other_thread() -> None:
            async def wait() -> None:
                future = commits.add(insert(connect, 2))
                queued.set()
                got.append(await asyncio.wait_for(future, 20))

            asyncio.run(wait())

        queued = threading.Event()
        thread = threading.Thread(target=other_thread)
        thread.start()
        assert queued.wait(20)
    thread.join(20)
    assert got == [2]
    assert stored(writer) == [1, 2]


# --- a model of the queue ----------------------------------------------------------------------


class GroupCommitModel(RuleBasedStateMachine):
    """Jobs queued while the writer thread is busy (each fine, failing on its own, refused by
    the database, or cancelled by its caller), then run: what is stored is exactly the jobs
    that succeeded, each caller that still waits gets its own outcome, and the connection is
    never left inside a transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        path = Path(self.dir.name) / "db"
        with closing(sqlite3.connect(path, isolation_level=None)) as setup:
            setup.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.conn = self.executor.submit(sqlite3.connect, path, isolation_level=None).result()
        self.loop = asyncio.new_event_loop()
        self.commits = GroupCommit(self.executor, lambda: self.conn)
        self.release: threading.Event | None = None
        self.pending: list[tuple[asyncio.Future[Any], str, int]] = []
        self.stored: set[int] = set()
        self.next_key = 0

    def _hold(self) -> None:
        if self.release is None:
            self.release = threading.Event()
            self.executor.submit(self.release.wait, 30)

    @rule(kind=st.sampled_from(["ok", "own failure", "duplicate", "unbindable"]), data=st.data())
    def queue(self, kind: str, data: st.DataObject) -> None:
        self._hold()
        self.next_key += 1
        key = self.next_key
        taken = sorted(self.stored | {k for _, kind_, k in self.pending if kind_ == "ok"})
        if kind == "duplicate" and taken:  # the database refuses a second row with a key
            key = data.draw(st.sampled_from(taken))
        conn = lambda: self.conn  # noqa: E731

        def job() -> int:
            with transaction(conn()):
                value: Any = uuid.uuid4() if kind == "unbindable" else key
                conn().execute("INSERT INTO t VALUES (?)", (value,))
                if kind == "own failure":
                    raise ValueError("the write's own failure")
            return key

        async def add() -> asyncio.Future[int]:
            return self.commits.add(job)

        future = self.loop.run_until_complete(add())
        self.pending.append((future, kind, key))

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def cancel_one(self, data: st.DataObject) -> None:
        future, _, _ = data.draw(st.sampled_from(self.pending))
        future.cancel()

    @precondition(lambda self: self.release is not None)
    @rule()
    def run(self) -> None:
        assert self.release is not None
        self.release.set()
        self.release = None
        self.executor.submit(lambda: None).result()  # every queued commit ran
        outcomes: list[Any] = []

        async def settle() -> None:
            for future, _, _ in self.pending:
                try:
                    outcomes.append(await asyncio.wait_for(asyncio.shield(future), 20))
                except BaseException as exc:
                    outcomes.append(exc)

        self.loop.run_until_complete(settle())
        in_model = set()
        for (future, kind, key), outcome in zip(self.pending, outcomes, strict=True):
            inserts = kind in ("ok", "duplicate")
            succeeds = inserts and key not in self.stored and key not in in_model
            if succeeds:
                in_model.add(key)
            if future.cancelled():
                continue
            if succeeds:
                assert outcome == key
            else:
                assert isinstance(outcome, Exception), (kind, outcome)
        self.stored |= in_model
        self.pending = []

    @invariant()
    def the_connection_is_never_left_in_a_transaction(self) -> None:
        if self.release is None:
            assert self.executor.submit(lambda: self.conn.in_transaction).result() is False
            rows = self.executor.submit(lambda: self.conn.execute("SELECT k FROM t").fetchall())
            assert {k for (k,) in rows.result()} == self.stored

    def teardown(self) -> None:
        if self.release is not None:
            self.release.set()
        self.executor.submit(self.conn.close).result()
        self.executor.shutdown()
        self.loop.close()
        self.dir.cleanup()


TestGroupCommitModel = GroupCommitModel.TestCase
TestGroupCommitModel.settings = settings(
    max_examples=40, stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
)
