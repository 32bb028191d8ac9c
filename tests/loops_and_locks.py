"""Event loops in threads of their own, interruptions at a counted step, and another
process's hold on a database's write lock.

The store model tests (`tests/test_store_model.py`) drive repositories the way applications
do: from an event loop that keeps running between calls, from a second loop in another thread,
and from a fresh loop that is closed afterwards, while another connection takes the database's
write lock now and then. Everything here is bounded: a call that outlives its bound is reported
as a hang (`Hang`) instead of blocking the test run, and `close()` always returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeAlias, TypeVar

T = TypeVar("T")


class Hang(AssertionError):
    """A call waited longer than the bound it was given."""


class LoopThread:
    """An event loop running in a daemon thread, as an application's loop runs.

    `run(coro, what, bound)` runs a coroutine on it from any other thread and returns its
    result (or raises its exception); past `bound` seconds the coroutine is cancelled and
    `Hang` is raised. `close()` cancels what is left, stops the loop and joins the thread,
    giving up (and leaving a daemon thread) if the loop itself is stuck.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], what: str, bound: float) -> T:
        [result] = run_together([(self, coro)], what, bound)
        return result

    def start(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[_Outcome]:
        """Start `coro` on this loop; its future holds its outcome (never an exception, so
        a coroutine abandoned after a hang leaves no "exception never retrieved" behind)."""
        return asyncio.run_coroutine_threadsafe(_outcome(coro), self.loop)

    def close(self, bound: float) -> None:
        if self.loop.is_closed():
            return

        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=bound / 2)
            await self.loop.shutdown_asyncgens()
            await self.loop.shutdown_default_executor()

        try:
            if self._thread.is_alive():
                self.run(cancel_the_rest(), "closing the loop", bound)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(bound)
            if not self._thread.is_alive():
                self.loop.close()


_Outcome: TypeAlias = tuple[bool, Any]  # (True, its result) or (False, the exception it raised)


async def _outcome(coro: Coroutine[Any, Any, Any]) -> _Outcome:
    try:
        return True, await coro
    except BaseException as exc:  # handed to the caller, cancellation included
        return False, exc


def run_together(
    runs: Sequence[tuple[LoopThread, Coroutine[Any, Any, Any]]], what: str, bound: float
) -> list[Any]:
    """Coroutines started at once, each on its loop; their results in order, or the first
    exception one raised once all ended; `Hang` if they did not all end within `bound`."""
    futures = [loop.start(coro) for loop, coro in runs]
    _, pending = concurrent.futures.wait(futures, timeout=bound)
    if pending:
        for future in pending:
            future.cancel()
        raise Hang(f"{what} took longer than {bound} s")
    outcomes = [future.result() for future in futures]
    for ok, value in outcomes:
        if not ok:
            raise value
    return [value for _, value in outcomes]


class Interruption:
    """Interrupts a task a counted number of event-loop steps after a point, the same way on
    every run.

    A store works on threads (SQLite) or a server (PostgreSQL) while its caller awaits; how
    far that work got when a loop step ends is a matter of timing. So from the point on,
    every loop step lasts `pace_s` (the loop thread sleeps in each): the store's threads
    finish what one step handed them before the next, each await takes the same number of
    steps on every run, and the interruption lands on the same await each time an example is
    replayed, which Hypothesis needs to shrink a failure. Steps are counted with
    `call_soon`, one loop iteration each; pacing stops at the interruption.
    """

    def __init__(self, interrupt: Callable[[], object], pace_s: float) -> None:
        self._interrupt = interrupt
        self._pace_s = pace_s
        self._pacing: asyncio.Task[None] | None = None

    def after(self, steps: int) -> None:
        """Interrupt `steps` loop steps from now (0: in the very next one)."""
        if self._pacing is None:
            self._pacing = asyncio.ensure_future(self._pace())
        loop = asyncio.get_running_loop()

        def tick(left: int) -> None:
            if left:
                loop.call_soon(tick, left - 1)
            else:
                self.stop()
                self._interrupt()

        loop.call_soon(tick, steps)

    def stop(self) -> None:
        if self._pacing is not None:
            self._pacing.cancel()

    async def _pace(self) -> None:
        while True:
            time.sleep(self._pace_s)  # noqa: ASYNC251 (blocks the loop on purpose)
            await asyncio.sleep(0)


def run_on_fresh_loop(coro: Coroutine[Any, Any, T], what: str, bound: float) -> T:
    """`coro` on a new event loop in a new thread, closed afterwards (as `asyncio.run` does)."""
    fresh = LoopThread("a fresh event loop")
    try:
        return fresh.run(coro, what, bound)
    finally:
        fresh.close(bound)


class WriteLockHolder:
    """Another process's connection that takes the database's write lock and holds it a while.

    SQLite: `BEGIN IMMEDIATE` on a raw `sqlite3` connection; a repository's writes then wait
    for its `busy_timeout` and fail. PostgreSQL: `LOCK TABLE aggregate_versions IN EXCLUSIVE
    MODE` on a raw psycopg connection (`dsn` carries the search path); writes wait, reads do
    not. The connection lives on a thread of its own. `take(hold_s)` returns whether the lock
    was taken (another writer may hold it); the lock is released by `release()` or after
    `hold_s` seconds, whichever comes first.
    """

    def __init__(self, kind: str, target: str, bound: float) -> None:
        self.kind = kind
        self.target = target
        self.bound = bound
        self.held = False
        self._requests: queue.Queue[tuple[str, float]] = queue.Queue()
        self._replies: queue.Queue[bool | BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="write lock holder", daemon=True)
        self._thread.start()

    def take(self, hold_s: float) -> bool:
        self.held = self._ask("take", hold_s)
        return self.held

    def release(self) -> None:
        self._ask("release", 0.0)
        self.held = False

    def close(self) -> None:
        if self._thread.is_alive():
            self._requests.put(("close", 0.0))
            self._thread.join(self.bound)
        self.held = False

    def _ask(self, request: str, hold_s: float) -> bool:
        self._requests.put((request, hold_s))
        try:
            reply = self._replies.get(timeout=self.bound)
        except queue.Empty:
            raise Hang(
                f"the other connection did not {request} the lock within {self.bound} s"
            ) from None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def _serve(self) -> None:
        conn: Any = None
        held_until: float | None = None
        try:
            conn = self._connect()
            while True:
                wait = None if held_until is None else max(held_until - time.monotonic(), 0.0)
                try:
                    request, hold_s = self._requests.get(timeout=wait)
                except queue.Empty:  # held long enough
                    conn.rollback()
                    held_until = None
                    continue
                if request == "close":
                    return
                try:
                    if held_until is not None:  # releasing, or taking it again
                        conn.rollback()
                        held_until = None
                    taken = request == "take" and self._lock(conn)
                    if taken:
                        held_until = time.monotonic() + hold_s
                    self._replies.put(taken)
                except Exception as exc:
                    self._replies.put(exc)
        except BaseException as exc:
            self._replies.put(exc)
        finally:
            if conn is not None:
                conn.close()

    def _connect(self) -> Any:
        if self.kind == "sqlite":
            # Never waits: if someone else writes, the lock is simply not taken.
            return sqlite3.connect(self.target, timeout=0, isolation_level=None)
        import psycopg

        return psycopg.connect(self.target, connect_timeout=10)

    def _lock(self, conn: Any) -> bool:
        if self.kind == "sqlite":
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                return False
            return True
        import psycopg

        try:
            conn.execute("SET LOCAL lock_timeout = '1s'")
            conn.execute("LOCK TABLE aggregate_versions IN EXCLUSIVE MODE")
        except psycopg.errors.LockNotAvailable:
            conn.rollback()
            return False
        return True
