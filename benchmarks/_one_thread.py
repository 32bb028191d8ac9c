"""One sqlite3 connection on one thread of its own, for the hand-written SQLite sides.

Each call is one job on that thread (one thread hop), which gets the connection first, so
the connection never leaves its thread and a job holds any transaction it opens whole.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class OneThread:
    """`connect()`'s connection, used on one thread only: `run(fn, ...)` is `fn(conn, ...)`
    there."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._connect = connect
        self._conn: sqlite3.Connection | None = None  # the thread's only

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._opened)

    async def run(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        def job() -> T:
            assert self._conn is not None, "open() first"
            return fn(self._conn, *args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(self._executor, job)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._closed)
        self._executor.shutdown()

    def _opened(self) -> None:
        self._conn = self._connect()

    def _closed(self) -> None:
        if self._conn is not None:
            self._conn.close()


async def until_applied(attempt: Callable[[], Any], side: str, order_id: str, most: int) -> int:
    """Call `attempt()` until it returns True (applied); how many calls it took."""
    attempts = 0
    while True:
        attempts += 1
        if await attempt():
            return attempts
        if attempts >= most:
            raise RuntimeError(f"{side}: {order_id} still conflicting after {attempts}")
