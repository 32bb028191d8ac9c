"""PostgreSQL connection pools, one per event loop that uses a repository.

psycopg's async pool belongs to the event loop it was opened on: its locks and worker tasks
are that loop's. So a repository given a DSN keeps one pool per event loop (`LoopPools`),
opened on that loop by its first call there, and closed when the loop shuts down: `asyncio.run`
and test runners close every loop's async generators as they end it, and a generator of ours
(`_closing`) then closes the pool on its own loop. `close()` closes this loop's pool at once,
and those of loops still running on other threads on their own loop. A pool passed in stays
the caller's (`GivenPool`): it serves the loop it was first used on, and another loop gets a
`StoreConfigurationError` saying so.

The map from loop to pool is read and written under a thread lock; everything done to a pool
is done on its own loop.

A connection of our pools keeps one cursor for the repository's statements (`cursor_of`): a
new cursor per statement would look up and build the driver's adapters for every parameter
again. The cursor is only ever used by whoever holds its connection, one task at a time, and
goes with the connection when the pool closes it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import types
import weakref
from collections.abc import AsyncGenerator
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

from .._errors import StoreClosedError, StoreConfigurationError
from ._errors import postgres_errors

if TYPE_CHECKING:
    from psycopg import AsyncConnection, AsyncCursor
    from psycopg.rows import TupleRow
    from psycopg_pool import AsyncConnectionPool

    Cursor: TypeAlias = AsyncCursor[TupleRow]
    Pool: TypeAlias = AsyncConnectionPool[Any]

_pool_log = logging.getLogger("psycopg.pool")  # where the pool's own workers log


class LoopPools:
    """A repository's own pools: one per event loop, made from `conninfo` and `options`."""

    def __init__(self, conninfo: str, options: dict[str, Any], target: str) -> None:
        self.conninfo = conninfo
        self.options = options
        self.target = target
        self.closed = False
        self._pools: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[Pool, AsyncGenerator[None, None]]
        ] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def here(self) -> Pool | None:
        """The running loop's pool, if it has one."""
        with self._lock:
            found = self._pools.get(asyncio.get_running_loop())
        return None if found is None else found[0]

    async def open_here(self) -> Pool:
        """The running loop's pool, opened: made now if it has none."""
        loop = asyncio.get_running_loop()
        with self._lock:
            found = self._pools.get(loop)
            closer = None
            if found is None:
                if self.closed:  # closed from another loop meanwhile: open no new pool
                    raise StoreClosedError(f"PostgreSQL {self.target}: the repository is closed")
                pool: Pool = _pool_type()(
                    self.conninfo, connection_class=_connection_type(), **self.options
                )
                closer = _closing(pool)
                found = self._pools[loop] = (pool, closer)
        if closer is not None:
            await anext(closer)  # the loop closes the pool as it shuts its generators down
        with postgres_errors(f"PostgreSQL {self.target}: opening a connection pool"):
            await found[0].open()
        return found[0]

    async def close(self) -> None:
        """Close every pool: the running loop's now, those of loops running elsewhere on their
        own loop; a loop that is not running closes its pool as it shuts down."""
        with self._lock:
            self.closed = True
            pools = list(self._pools.items())
            self._pools.clear()
        here = asyncio.get_running_loop()
        for loop, (pool, closer) in pools:
            if loop is here:
                await _close_now(pool, closer)
            elif loop.is_running():
                closing = asyncio.run_coroutine_threadsafe(_close_now(pool, closer), loop)
                with suppress(Exception):
                    await asyncio.wait_for(asyncio.wrap_future(closing), 10)


class GivenPool:
    """A pool passed in: the caller's, serving the event loop it was first used on."""

    def __init__(self, pool: Pool, target: str) -> None:
        self.pool = pool
        self.target = target
        self._loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._lock = threading.Lock()

    def here(self) -> Pool:
        """The pool, or a `StoreConfigurationError` on any loop but its own."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._loop is None:
                self._loop = weakref.ref(loop)
            serves = self._loop()
        if serves is not loop:
            raise StoreConfigurationError(
                f"PostgreSQL {self.target}: the connection pool given to this repository "
                "serves another event loop (a psycopg pool cannot be shared between loops); "
                "give the repository a DSN instead, and it opens a pool for each event loop"
            )
        return self.pool


@functools.cache
def _pool_type() -> type[Pool]:
    """psycopg_pool's async pool, except that its maintenance workers end when cancelled.

    psycopg_pool (3.3) catches a `CancelledError` met in the middle of a maintenance task (a
    connection being made, say), logs it and waits for the next task: an event loop that
    ends while one is under way (`asyncio.run` cancels every task, then waits for them)
    waits for ever. Here a worker whose task swallowed a cancellation ends after the task.
    Where psycopg_pool's internals are not the ones this was written against, the pool is
    used as it comes."""
    from psycopg_pool import AsyncConnectionPool

    try:
        from psycopg_pool.pool_async import StopWorker
    except ImportError:  # pragma: no cover - another psycopg_pool
        return AsyncConnectionPool
    if not isinstance(getattr(AsyncConnectionPool, "worker", None), types.MethodType):
        return AsyncConnectionPool  # pragma: no cover

    class CancellablePool(AsyncConnectionPool):
        @classmethod
        async def worker(cls, q: Any) -> None:
            me = asyncio.current_task()
            while not isinstance(task := await q.get(), StopWorker):
                try:
                    await task.run()
                except Exception as exc:  # a failed task must not end the worker
                    _pool_log.warning("task run %s failed: %s: %s", task, type(exc).__name__, exc)
                if me is not None and me.cancelling():  # cancelled, and the task swallowed it
                    raise asyncio.CancelledError

    return CancellablePool


def cursor_of(conn: AsyncConnection[Any]) -> Cursor:
    """A tuple-row cursor on `conn`, for the holder of the connection: the one it keeps if it
    is a connection of our pools, else a new one (a pool passed in makes its own kind)."""
    cursor: Cursor | None = getattr(conn, "store_cursor", None)
    if cursor is None:
        from psycopg.rows import tuple_row

        cursor = conn.cursor(row_factory=tuple_row)
        if isinstance(conn, _connection_type()):
            cast("_KeepsCursor", conn).store_cursor = cursor
    return cursor


class _KeepsCursor(Protocol):
    store_cursor: Cursor | None


@functools.cache
def _connection_type() -> type[AsyncConnection[Any]]:
    """psycopg's async connection, with room for the one cursor `cursor_of` keeps on it."""
    from psycopg import AsyncConnection

    class StoreConnection(AsyncConnection[Any]):
        store_cursor: Cursor | None = None

    return StoreConnection


async def _closing(pool: Pool) -> AsyncGenerator[None, None]:
    """Closes `pool` when closed itself: by `close()`, or by its event loop shutting down."""
    try:
        yield
    finally:
        if not pool.closed:
            # The loop is ending. It cancelled its tasks first, the pool's workers among
            # them, which makes `close()` stop before it closes the idle connections: close
            # those first (the replacements `drain()` asks for are never made).
            await pool.drain()
            try:
                await pool.close()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # our caller is cancelled, not just the workers


async def _close_now(pool: Pool, closer: AsyncGenerator[None, None]) -> None:
    """Close `pool` on its own running loop, and the generator that would close it later."""
    await pool.close()
    await closer.aclose()
