"""Recursive work that must not depend on how deep the caller's stack is.

msgspec encodes and decodes recursively, within Python's recursion limit, so a value nested
a few hundred levels deep (a state, a command decoded from JSON) that encodes from a shallow
stack fails from a deep one. `with_stack_fallback` runs such work again on a dedicated thread
whose stack is nearly empty, shallower than any caller's, so its result is the same from any
call depth; what fails there too (a cycle, nesting near the recursion limit) raises
`RecursionError` for the caller to turn into a clear refusal.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_THREAD_NAME = "cqrs-fresh-stack"
_fresh: ThreadPoolExecutor | None = None
_fresh_lock = threading.Lock()


def on_fresh_stack(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a thread whose stack is nearly empty: for work too deep for ours.

    Blocks the caller, which is fine on this rare path: the work is CPU-bound and short.
    """
    global _fresh
    with _fresh_lock:
        if _fresh is None:
            _fresh = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_THREAD_NAME)
    return _fresh.submit(fn, *args).result()


def with_stack_fallback(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, or on a fresh stack if it ran out of ours; `RecursionError` if both did."""
    try:
        return fn(*args)
    except RecursionError:
        if threading.current_thread().name.startswith(_THREAD_NAME):
            raise
    return on_fresh_stack(fn, *args)
