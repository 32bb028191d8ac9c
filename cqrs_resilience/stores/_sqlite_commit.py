"""Transactions on a SQLite connection, and the one writer thread's queue (group commit).

A repository writes on one thread, and every job that thread runs is a whole transaction:
it begins and ends (commit or rollback) inside that one call, so no await, cancellation or
closed event loop of a caller can leave the connection inside a transaction.

Writes that queue while the thread is busy are committed together when it gets to them: one
transaction, so one lock and one sync to disk for all. Each write runs in a savepoint of its
own and gets its own outcome, told only once the commit is done. A write that fails on its own
(its savepoint rolled back) fails alone. A database error inside one write rolls the shared
transaction back, and every write then runs again in a transaction of its own, so each still
gets its own outcome; an error taking the lock or committing fails every write of the batch
with it, and none of them is stored.

Outcomes cross to each caller's event loop through `call_soon_threadsafe` only, so callers on
any number of loops and threads share the queue. Writes run in the order they were queued:
a write queued after another sees it committed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Any, TypeVar

from .._handoff import Outcome as _Result
from .._handoff import hand_over

T = TypeVar("T")


@contextmanager
def transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """Commit when the block completes, roll back when it raises: nothing half-written.

    Inside a transaction already open (a group commit's) it is a savepoint, committed with
    that transaction.
    """
    if conn.in_transaction:
        conn.execute("SAVEPOINT cqrs_write")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK TO cqrs_write")
            raise
        finally:
            conn.execute("RELEASE cqrs_write")
        return
    conn.execute(begin)
    try:
        yield
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


_Queued = tuple[Callable[[], Any], "asyncio.Future[Any]"]


class WriterClosedError(Exception):
    """The queue was closed: the repository is closing or closed."""


class GroupCommit:
    """The jobs waiting for one writer thread (`executor`), committed together.

    `connect()` (called on the writer thread) gives the connection the jobs run on; each job
    is a function run there that opens its own `transaction()` (a savepoint when batched).
    """

    def __init__(self, executor: Executor, connect: Callable[[], sqlite3.Connection]) -> None:
        self._executor = executor
        self._connect = connect
        self._queued: list[_Queued] = []
        self._lock = threading.Lock()
        self._closed = False

    def add(self, write: Callable[[], T]) -> asyncio.Future[T]:
        """Queue `write`; its outcome (or error) arrives on the calling event loop.
        `WriterClosedError` once `close()` was called."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._closed:
                raise WriterClosedError
            self._queued.append((write, future))
            if len(self._queued) == 1:  # else the commit already queued takes this one too
                self._executor.submit(self._commit)
        return future

    def close(self, last: Callable[[], None]) -> asyncio.Future[None]:
        """Refuse new jobs and queue `last` (closing the connection) after every job queued
        so far; its outcome arrives on the calling event loop."""
        with self._lock:
            self._closed = True
            # Submitted under the lock: no commit can be queued behind it.
            done = self._executor.submit(last)
        return asyncio.wrap_future(done)

    def _commit(self) -> None:
        """On the writer thread: run every queued job, then tell each its outcome on its own
        event loop. Every future gets an outcome, whatever happens here."""
        with self._lock:
            queued, self._queued = self._queued, []
        try:
            results = self._run([write for write, _ in queued])
        except BaseException as exc:  # never leave a caller waiting
            results = [(False, exc)] * len(queued)
        hand_over((future, result) for (_, future), result in zip(queued, results, strict=True))

    def _run(self, writes: list[Callable[[], Any]]) -> list[_Result]:
        conn = self._connect()
        if len(writes) == 1:
            return [_outcome_of(writes[0])]
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:  # the lock was not to be had: every write may retry
            return [(False, exc)] * len(writes)
        try:
            results = []
            for write in writes:
                result = _outcome_of(write)
                if not result[0] and isinstance(result[1], sqlite3.Error):
                    break  # a database error inside one write: run them one by one
                results.append(result)
            else:
                conn.execute("COMMIT")
                return results
        except sqlite3.Error as exc:  # the commit failed: nothing was stored
            return [(False, exc)] * len(writes)
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        return [_outcome_of(write) for write in writes]


def _outcome_of(write: Callable[[], Any]) -> _Result:
    try:
        return True, write()
    except Exception as exc:  # this write's own failure (its transaction rolled back)
        return False, exc
