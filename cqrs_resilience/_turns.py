"""Turns: conflict-resolution rounds for one aggregate run one at a time within a process.

Without turns, N local writers that lost a race re-read, re-merge and race again together:
about N/2 attempts each. Taking turns, each round reads the state the previous round wrote, so
a round fails only against a first attempt or another process. First attempts never wait; the
database still arbitrates.

The turns are the process's, not a behavior's: a handler built per request (as dependency
injection frameworks do) still takes turns with every other handler of the process. Each event
loop has turns of its own (their waiters are futures of that loop, touched only from its
thread); loops on several threads share only the map from loop to turns, under a lock. A
turn lives only while someone holds or waits for it.

Waiters go in the order their *commands* first asked for a turn, not the order they arrived:
a command whose round failed (another round lost, a transient error retried) comes back ahead
of the commands that arrived after it first did. Otherwise every such failure sent it to the
back of a queue of all the aggregate's writers, again and again, and set the tail latency.

Across processes, the store itself keeps the turns: every `ConcurrencyError` the library's
stores raise carries the store as `turns`, and a store's `turn()` takes this process's turn
and then the database's (a PostgreSQL advisory lock; on SQLite a lease row, once a round on the
aggregate lost to another writer: `stores/_sqlite_leases`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import weakref
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from ._idempotency import CURRENT


class TakesTurns(Protocol):
    """Anything resolution rounds can take turns through: `Turns`, or a store."""

    def turn(self, key: Any, /) -> AbstractAsyncContextManager[Any]:
        """Hold the turn for `key` while the block runs."""
        ...


class Turns:
    """Per-key locks, one set per event loop; pass one as `turns=` to scope turns yourself."""

    def __init__(self) -> None:
        self._loops: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, weakref.WeakValueDictionary[Any, _Turn]
        ] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # for `_loops`, which every loop's thread reads

    def turn(self, key: Any) -> AbstractAsyncContextManager[Any]:
        """An async context manager holding the turn for `key` (no turns for None or an
        unhashable key: only the database arbitrates those)."""
        if key is None:
            return contextlib.nullcontext()
        loop = asyncio.get_running_loop()
        with self._lock:
            turns = self._loops.get(loop)
            if turns is None:
                turns = self._loops[loop] = weakref.WeakValueDictionary()
        try:
            turn = turns.get(key)
        except TypeError:
            return contextlib.nullcontext()
        if turn is None:
            turn = turns[key] = _Turn()
        return _Holding(turn, _rank())

    def held(self, key: Any) -> bool:
        """Whether a task on this event loop is running in the turn for `key` (not while the
        turn passes from one holder to the next: a first attempt then may go ahead)."""
        with self._lock:
            turns = self._loops.get(asyncio.get_running_loop())
        try:
            turn = turns.get(key) if turns is not None else None
        except TypeError:
            return False
        return turn is not None and turn.active

    def __repr__(self) -> str:
        with self._lock:
            held = sum(len(turns) for turns in list(self._loops.values()))
        return f"Turns({held} key(s) in use)"


_ARRIVALS = itertools.count()


def _rank() -> int:
    """The current command's place in turn queues: when it first asked for a turn (a call
    outside any command ranks as it arrives)."""
    scope = CURRENT.get()
    if scope is None:
        return next(_ARRIVALS)
    root = scope.root or scope
    if root.turn_rank is None:
        root.turn_rank = next(_ARRIVALS)
    return root.turn_rank


class _Turn:
    """One key's turn: held by one task at a time; waiters go by rank, then arrival. A
    release hands the turn straight to the next waiter, so no other round slips in."""

    __slots__ = ("__weakref__", "_waiters", "active", "held")

    def __init__(self) -> None:
        self.held = False  # someone holds it, or has been handed it
        self.active = False  # its holder is running, not just handed it
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # a heap

    async def acquire(self, rank: int) -> None:
        if not self.held:
            self.held = self.active = True
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, next(_ARRIVALS), future))
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release()  # handed the turn as it was cancelled: pass it on
            else:
                future.cancel()  # skipped when it comes up
            raise
        self.active = True

    def release(self) -> None:
        self.active = False
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self.held = False


class _Holding:
    """`async with` one key's turn, at the current command's rank."""

    __slots__ = ("_rank", "_turn")

    def __init__(self, turn: _Turn, rank: int) -> None:
        self._turn = turn
        self._rank = rank

    async def __aenter__(self) -> None:
        await self._turn.acquire(self._rank)

    async def __aexit__(self, *exc_info: object) -> None:
        self._turn.release()


PROCESS_TURNS = Turns()
"""The turns every conflict behavior of this process shares unless given its own."""
