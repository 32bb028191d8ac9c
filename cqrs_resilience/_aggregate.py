"""Aggregates: the msgspec Structs stores keep, each with an id and a version."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec


class Aggregate(msgspec.Struct, kw_only=True):
    """Base for aggregates: an `id` and the `version` it was read at (0 = never stored)."""

    id: str
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The aggregate's state as plain data, the form merges work on."""
        state: dict[str, Any] = msgspec.to_builtins(self)
        return state


A = TypeVar("A", bound=Aggregate)
