"""The command being processed, so stores can record its id beside the write it makes.

A retried command that already committed (a timeout after commit) must not apply twice. The
behaviours put the command's id here; a store's `persist` reads it when not given one, records
it in the same transaction as the write, and answers a repeat with the first outcome.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

current_command_id: ContextVar[str | None] = ContextVar(
    "cqrs_resilience.current_command_id", default=None
)


@contextmanager
def command_scope(command_id: str | None) -> Iterator[None]:
    """Make `command_id` the id stores record for writes made inside the block."""
    token = current_command_id.set(command_id)
    try:
        yield
    finally:
        current_command_id.reset(token)
