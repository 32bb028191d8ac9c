"""Commands in flight in this process: a resend waits for the first send instead of running.

`idempotent()` registers a command (by response store and command id) while it runs. The same
command sent again meanwhile, from any task, event loop or thread of the process, waits for
the first send and gets its outcome: the response, or the exception it raised. If the first
send was cancelled, its waiters are told to start over, and one of them then runs the command.

Each waiter is a future of its own event loop, told its outcome through `call_soon_threadsafe`
(`_handoff`); the registry is a dict under a thread lock. The sender that registered a command
always tells the waiters (from a `finally`), and a waiter waits a bounded time.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from ._handoff import Outcome, hand_over

AGAIN: Any = object()
"""What waiters get (as a result) when the first send was cancelled: start over."""


class _Flight:
    __slots__ = ("fingerprint", "waiters")

    def __init__(self, fingerprint: bytes) -> None:
        self.fingerprint = fingerprint
        self.waiters: list[asyncio.Future[Any]] = []


class InFlight:
    """The commands being sent in this process, keyed by (response store, command id)."""

    def __init__(self) -> None:
        self._flights: dict[tuple[int, str], _Flight] = {}
        self._lock = threading.Lock()

    def join(self, key: tuple[int, str], fingerprint: bytes) -> asyncio.Future[Any] | bool:
        """True: nothing is in flight under `key`, and the caller now is (it must `land()`).
        False: another command is in flight under this id. Otherwise a future, of the
        caller's event loop, that gets the first send's outcome."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                self._flights[key] = _Flight(fingerprint)
                return True
            if flight.fingerprint != fingerprint:
                return False
            waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            flight.waiters.append(waiter)
            return waiter

    def land(self, key: tuple[int, str], outcome: Outcome) -> None:
        """The first send ended with `outcome` ((True, its response), (False, its exception),
        or (True, `AGAIN`) if it was cancelled): tell every waiter, and let the next send of
        the command run."""
        with self._lock:
            flight = self._flights.pop(key)
        hand_over((waiter, outcome) for waiter in flight.waiters)

    def __len__(self) -> int:
        return len(self._flights)


IN_FLIGHT = InFlight()
"""The process's commands in flight (every `idempotent()` shares them)."""
