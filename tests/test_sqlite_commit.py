"""Group commit on one SQLite writer thread: one transaction for the writes queued together."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cqrs_resilience.stores._sqlite_commit import GroupCommit, transaction


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
    commits: GroupCommit[Any] = GroupCommit(executor, connect)
    release = threading.Event()
    executor.submit(release.wait, 30)
    futures = [commits.add(write) for write in writes]
    release.set()
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


async def test_a_database_error_fails_every_write_and_stores_none(writer):
    _, connect = writer
    outcomes = await committed(writer, insert(connect, 1), insert(connect, 1), insert(connect, 2))
    assert all(isinstance(o, sqlite3.IntegrityError) for o in outcomes), outcomes
    assert stored(writer) == []
