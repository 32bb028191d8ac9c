"""Turns: conflict-resolution rounds for one aggregate run one at a time within a process.

Without turns, N local writers that lost a race re-read, re-merge and race again together:
about N/2 attempts each. Taking turns, each round reads the state the previous round wrote, so
a round fails only against a first attempt or another process. First attempts never wait; the
database still arbitrates.

The turns are the process's, not a behaviour's: a handler built per request (as dependency
injection frameworks do) still takes turns with every other handler of the process. Locks are
per event loop (an asyncio lock belongs to one loop) and live only while someone holds or
waits for them.

Across processes, the store itself keeps the turns: every `ConcurrencyError` the library's
stores raise carries the store as `turns`, and a store's `turn()` takes this process's turn
and then the database's (a PostgreSQL advisory lock; SQLite's writer lock, once a round on the
aggregate lost to another process).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol


class TakesTurns(Protocol):
    """Anything resolution rounds can take turns through: `Turns`, or a store."""

    def turn(self, key: Any, /) -> AbstractAsyncContextManager[Any]:
        """Hold the turn for `key` while the block runs."""
        ...


class Turns:
    """Per-key locks, one set per event loop; pass one as `turns=` to scope turns yourself."""

    def __init__(self) -> None:
        self._loops: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, weakref.WeakValueDictionary[Any, asyncio.Lock]
        ] = weakref.WeakKeyDictionary()

    def turn(self, key: Any) -> AbstractAsyncContextManager[Any]:
        """An async context manager holding the turn for `key` (no turns for None or an
        unhashable key: only the database arbitrates those)."""
        if key is None:
            return contextlib.nullcontext()
        loop = asyncio.get_running_loop()
        locks = self._loops.get(loop)
        if locks is None:
            locks = self._loops[loop] = weakref.WeakValueDictionary()
        try:
            lock = locks.get(key)
        except TypeError:
            return contextlib.nullcontext()
        if lock is None:
            lock = locks[key] = asyncio.Lock()
        return lock

    def held(self, key: Any) -> bool:
        """Whether someone on this event loop holds (or waits for) the turn for `key`."""
        locks = self._loops.get(asyncio.get_running_loop())
        try:
            lock = locks.get(key) if locks is not None else None
        except TypeError:
            return False
        return lock is not None and lock.locked()

    def __repr__(self) -> str:
        held = sum(len(locks) for locks in self._loops.values())
        return f"Turns({held} key(s) in use)"


PROCESS_TURNS = Turns()
"""The turns every conflict behaviour of this process shares unless given its own."""
