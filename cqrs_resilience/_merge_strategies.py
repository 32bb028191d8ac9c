"""The merge strategies behind the MERGE policy, and the protocols a custom one satisfies.

`DeepMergeStrategy` merges nested dicts (`_merge_two_way`, and `_merge_three_way` given a
base); `FieldLevelMergeStrategy` and `TimestampLastWinsStrategy` work on top-level fields and
return shallow results whose values are the inputs' own objects, not looked inside.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Any, ClassVar, Protocol, runtime_checkable

from ._errors import ConfigurationError
from ._merge_engine import (
    MISSING,
    OnMergeConflict,
    Run,
    checked_identity_key,
    checked_on_conflict,
    execute,
    require_dicts,
)
from ._merge_three_way import three_way_merge
from ._merge_two_way import deep_merge


@runtime_checkable
class MergeStrategy(Protocol):
    """Anything that merges an aggregate's latest state with the state a command wants."""

    def merge(self, current: dict[str, Any], incoming: dict[str, Any]) -> dict[str, Any]:
        """Return the merged state, leaving `current` and `incoming` unchanged."""
        ...


IMergeStrategy = MergeStrategy
"""The reference's name for `MergeStrategy`; user strategies may subclass either."""


@runtime_checkable
class ThreeWayMergeStrategy(MergeStrategy, Protocol):
    """A strategy that can also merge against the state a command was issued on (`base`)."""

    def merge3(
        self,
        base: dict[str, Any],
        current: dict[str, Any],
        incoming: dict[str, Any],
        *,
        on_conflict: OnMergeConflict = OnMergeConflict.RAISE,
    ) -> dict[str, Any]:
        """Keep every one-sided change; settle or report paths both sides changed."""
        ...


class BuiltinStrategy:
    """A built-in strategy: equality, hashing and a repr from its options."""

    __slots__ = ()
    option_names: ClassVar[tuple[str, ...]]
    """Its constructor's arguments, named as the `ConflictConfig` fields the registry reads."""

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.option_names)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BuiltinStrategy) or type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        shown = (f"{name}={getattr(self, name)!r}" for name in self.option_names)
        return f"{type(self).__name__}({', '.join(shown)})"


class DeepMergeStrategy(BuiltinStrategy):
    """Merge nested dicts key by key: incoming's values win, keys only current has stay.

    Lists are replaced by incoming's, unless `append_lists` (incoming's items not already
    present are appended) or `list_identity_key` (dict items with the same value under that key
    are merged in place, keeping current's order; new ones are appended; current's other items
    stay). Repeated identity values pair up by position. Hashable items are compared with ==,
    others by their encoding with sorted keys (so there 1, 1.0 and True differ).
    """

    __slots__ = ("append_lists", "list_identity_key")
    option_names = ("append_lists", "list_identity_key")

    def __init__(self, append_lists: bool = False, list_identity_key: str | None = None) -> None:
        if not isinstance(append_lists, bool):
            raise ConfigurationError(f"append_lists must be a bool, got {append_lists!r}")
        self.append_lists = append_lists
        self.list_identity_key = checked_identity_key(list_identity_key)

    def merge(self, current: dict[str, Any], incoming: dict[str, Any]) -> dict[str, Any]:
        """Return current with incoming merged in; neither input changes."""
        require_dicts(current=current, incoming=incoming)
        return deep_merge(
            current,
            incoming,
            append_lists=self.append_lists,
            list_identity_key=self.list_identity_key,
        )

    def merge3(
        self,
        base: dict[str, Any],
        current: dict[str, Any],
        incoming: dict[str, Any],
        *,
        on_conflict: OnMergeConflict | str = OnMergeConflict.RAISE,
    ) -> dict[str, Any]:
        """`three_way_merge` with this strategy's `list_identity_key`."""
        return three_way_merge(
            base,
            current,
            incoming,
            list_identity_key=self.list_identity_key,
            on_conflict=on_conflict,
        )


def _field_names(name: str, fields: Iterable[str] | None) -> frozenset[str] | None:
    if fields is None:
        return None
    if isinstance(fields, str) or not isinstance(fields, Iterable):
        raise ConfigurationError(f"{name} must be a collection of field names, got {fields!r}")
    names = frozenset(fields)
    wrong = [field for field in names if not isinstance(field, str)]
    if wrong:
        raise ConfigurationError(f"{name} must hold field names (str), got {wrong[0]!r}")
    return names


class FieldLevelMergeStrategy(BuiltinStrategy):
    """Take incoming's value, whole, for each allowed top-level field; keep current's for the rest.

    A field is allowed when `include_fields` is None or lists it, and `exclude_fields` does not
    (exclude wins). A field only incoming has is added only if allowed.
    """

    __slots__ = ("exclude_fields", "include_fields")
    option_names = ("include_fields", "exclude_fields")

    def __init__(
        self,
        include_fields: Iterable[str] | None = None,
        exclude_fields: Iterable[str] | None = None,
    ) -> None:
        self.include_fields = _field_names("include_fields", include_fields)
        self.exclude_fields = _field_names("exclude_fields", exclude_fields)

    def allows(self, field: str) -> bool:
        """Whether incoming may set `field`."""
        return (self.include_fields is None or field in self.include_fields) and (
            self.exclude_fields is None or field not in self.exclude_fields
        )

    def merge(self, current: dict[str, Any], incoming: dict[str, Any]) -> dict[str, Any]:
        """Return current with incoming's allowed fields laid over it; neither input changes."""
        require_dicts(current=current, incoming=incoming)
        merged = dict(current)
        for field, value in incoming.items():
            if self.allows(field):
                merged[field] = value
        return merged

    def merge3(
        self,
        base: dict[str, Any],
        current: dict[str, Any],
        incoming: dict[str, Any],
        *,
        on_conflict: OnMergeConflict | str = OnMergeConflict.RAISE,
    ) -> dict[str, Any]:
        """Three-way per top-level field, values compared whole; only allowed fields may take
        incoming's change (or deletion). Conflicts as in `three_way_merge`."""
        require_dicts(base=base, current=current, incoming=incoming)
        return execute(
            self._merge3,
            (base, current, incoming),
            current,
            (("base", base), ("current", current), ("incoming", incoming)),
            on_conflict=checked_on_conflict(on_conflict),
        )

    def _merge3(
        self, b: dict[str, Any], c: dict[str, Any], i: dict[str, Any], _depth: int, run: Run
    ) -> dict[str, Any]:
        merged = dict(c)
        for field in {**c, **i}:
            if not self.allows(field):
                continue
            cv, iv, bv = c.get(field, MISSING), i.get(field, MISSING), b.get(field, MISSING)
            if run.same_nan(cv, iv) or run.same_nan(iv, bv):
                continue
            keep = iv if run.same_nan(cv, bv) else run.conflict((None, field), bv, cv, iv)
            if keep is MISSING:
                merged.pop(field, None)
            else:
                merged[field] = keep
        return merged


def _instant(value: Any) -> datetime | int | float | None:
    """The moment a timestamp denotes (aware datetime, or epoch seconds); None if it is none."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    return None


class TimestampLastWinsStrategy(BuiltinStrategy):
    """The side whose `timestamp_field` is later wins whole.

    ISO-8601 strings (``Z`` or offsets), datetimes and dates compare by the instant they
    denote (naive ones are taken as UTC); numbers are epoch seconds and compare with numbers
    only (a number against a date-time raises ValueError). A side whose timestamp is missing
    or unreadable loses to one that has a valid timestamp; when neither has one, or both denote
    the same instant, incoming wins if `fallback_to_incoming`, else current.
    """

    __slots__ = ("fallback_to_incoming", "timestamp_field")
    option_names = ("timestamp_field", "fallback_to_incoming")

    def __init__(
        self, timestamp_field: str = "modified_at", fallback_to_incoming: bool = True
    ) -> None:
        if not isinstance(timestamp_field, str) or not timestamp_field:
            raise ConfigurationError(
                f"timestamp_field must be a non-empty field name, got {timestamp_field!r}"
            )
        if not isinstance(fallback_to_incoming, bool):
            raise ConfigurationError(
                f"fallback_to_incoming must be a bool, got {fallback_to_incoming!r}"
            )
        self.timestamp_field = timestamp_field
        self.fallback_to_incoming = fallback_to_incoming

    def incoming_wins(self, current: dict[str, Any], incoming: dict[str, Any]) -> bool:
        """Whether incoming's timestamp is the later one (ties and gaps: the fallback rule)."""
        field = self.timestamp_field
        cur, inc = _instant(current.get(field)), _instant(incoming.get(field))
        if cur is None or inc is None:
            return inc is not None or (cur is None and self.fallback_to_incoming)
        if isinstance(cur, datetime) and isinstance(inc, datetime):
            order = (inc > cur) - (inc < cur)
        elif isinstance(cur, datetime) or isinstance(inc, datetime):
            raise ValueError(
                f"cannot compare {field!r} timestamps {current[field]!r} (current) and "
                f"{incoming[field]!r} (incoming): one is a date-time, the other a number of "
                "epoch seconds"
            )
        else:
            order = (inc > cur) - (inc < cur)
        return self.fallback_to_incoming if order == 0 else order > 0

    def merge(self, current: dict[str, Any], incoming: dict[str, Any]) -> dict[str, Any]:
        """Return a shallow copy of the later side; neither input changes."""
        require_dicts(current=current, incoming=incoming)
        return dict(incoming if self.incoming_wins(current, incoming) else current)
