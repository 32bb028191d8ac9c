"""Outcomes handed from any thread to futures of any event loop.

A future belongs to the loop that made it and may only be completed there. So a thread (a
store's writer, a command finishing on another loop) hands outcomes over with
`call_soon_threadsafe`, one call per loop; a future already done (its waiter was cancelled)
is skipped, and a loop that closed meanwhile is passed over: nobody waits there any more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from contextlib import suppress
from typing import Any

Outcome = tuple[bool, Any]  # (True, result) or (False, the exception)


def hand_over(outcomes: Iterable[tuple[asyncio.Future[Any], Outcome]]) -> None:
    """Complete each future with its outcome, on its own event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Outcome]]] = {}
    for future, outcome in outcomes:
        by_loop.setdefault(future.get_loop(), []).append((future, outcome))
    for loop, handed in by_loop.items():
        with suppress(RuntimeError):  # a closed loop: nobody waits for these
            loop.call_soon_threadsafe(_complete, handed)


def _complete(handed: list[tuple[asyncio.Future[Any], Outcome]]) -> None:
    for future, (ok, value) in handed:
        if future.done():  # its waiter was cancelled
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
