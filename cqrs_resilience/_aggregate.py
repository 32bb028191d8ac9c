"""Aggregates: the msgspec Structs stores keep, each with an id and a version."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from ._stack import with_stack_fallback
from ._walk import too_deep


class Aggregate(msgspec.Struct, kw_only=True):
    """Base for aggregates: an `id` and the `version` it was read at (0 = never stored)."""

    id: str
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The aggregate's state as plain data, the form merges work on; the same from any
        call depth (a deep state is converted on a fresh stack when ours is too deep)."""
        try:
            state: dict[str, Any] = with_stack_fallback(msgspec.to_builtins, self)
        except RecursionError:
            raise too_deep(
                f"aggregate {self.id!r}", self, "it cannot be turned into plain data to merge"
            ) from None
        return state


A = TypeVar("A", bound=Aggregate)
