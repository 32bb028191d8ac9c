"""Transactions on a SQLite connection, and group commit for one writer thread.

A repository writes on one thread. Writes that queue while that thread is busy are committed
together when it gets to them: one transaction, so one lock and one sync to disk for all. Each
write runs in a savepoint of its own and gets its own outcome, told only once the commit is
done; a database error fails every write of the commit, and none of them is stored.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager, suppress
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@contextmanager
def transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """Commit when the block completes, roll back when it raises: nothing half-written.

    Inside a transaction already open (a resolution turn's, a group commit's) it is a
    savepoint, committed with that transaction.
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


_Queued = tuple[Callable[[], T], "asyncio.Future[T]"]
_Result = tuple[bool, Any]  # (True, outcome) or (False, the exception)


class GroupCommit(Generic[T]):
    """The writes waiting for one writer thread (`executor`), committed together.

    `connect()` (called on the writer thread) gives the connection the writes run on; each
    write is a function run there, inside the commit's transaction, that opens its own
    `transaction()` (a savepoint).
    """

    def __init__(self, executor: Executor, connect: Callable[[], sqlite3.Connection]) -> None:
        self._executor = executor
        self._connect = connect
        self._queued: list[_Queued[T]] = []
        self._lock = threading.Lock()

    def add(self, write: Callable[[], T]) -> asyncio.Future[T]:
        """Queue `write`; its outcome (or error) arrives on the calling event loop."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._queued.append((write, future))
            first = len(self._queued) == 1
        if first:  # else the commit already queued takes this write too
            self._executor.submit(self._commit)
        return future

    def _commit(self) -> None:
        """On the writer thread: run every queued write in one transaction, then tell each
        its outcome on its own loop."""
        with self._lock:
            queued, self._queued = self._queued, []
        results: list[_Result] = []
        try:
            conn = self._connect()
            if len(queued) == 1:
                results.append(_outcome_of(queued[0][0]))
            else:
                with transaction(conn):
                    for write, _ in queued:
                        results.append(_outcome_of(write))
                        if isinstance(results[-1][1], sqlite3.Error):
                            raise results[-1][1]  # a database error: nothing commits
        except BaseException as exc:  # nothing committed: every write fails with the error
            results = [(False, exc)] * len(queued)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[T], _Result]]] = {}
        for (_, future), result in zip(queued, results, strict=True):
            by_loop.setdefault(future.get_loop(), []).append((future, result))
        for loop, outcomes in by_loop.items():
            with suppress(RuntimeError):  # a closed loop: nobody waits for these outcomes
                loop.call_soon_threadsafe(_deliver, outcomes)


def _outcome_of(write: Callable[[], Any]) -> _Result:
    try:
        return True, write()
    except Exception as exc:  # this write's own failure (a savepoint rolled back)
        return False, exc


def _deliver(outcomes: list[tuple[asyncio.Future[Any], _Result]]) -> None:
    """Hand each waiting write its outcome (on its event loop)."""
    for future, (ok, value) in outcomes:
        if future.done():  # its caller was cancelled
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
