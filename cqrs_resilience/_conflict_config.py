"""How a command wants its optimistic-concurrency conflicts settled."""

from __future__ import annotations

import enum
from collections.abc import Set as AbstractSet
from typing import TypeVar

import msgspec

from ._checks import MORE_CALLS
from ._errors import ConfigurationError
from ._merge_engine import OnMergeConflict


class ConflictResolutionPolicy(enum.StrEnum):
    """What to do when a command loses an optimistic-concurrency race."""

    FIRST_WINS = "first_wins"
    """The earlier write stands; the conflict propagates to the caller."""
    LAST_WINS = "last_wins"
    """The command's state is laid over the latest state and the command runs again."""
    MERGE = "merge"
    """The command's state is merged into the latest state and the command runs again."""
    RUN_AGAIN = "run_again"
    """The command runs again, unchanged, and its handler reads the latest state itself:
    for delta commands ("add this item"). Nothing is read, merged or rebuilt for it."""


E = TypeVar("E", bound=enum.Enum)


def _coerce(config: ConflictConfig, name: str, kind: type[E]) -> None:
    """Accept an enum member, its value or its name (any case); name the field if none fits."""
    value = getattr(config, name)
    for member in kind:
        if (
            value is member
            or value == member.value
            or (isinstance(value, str) and value.upper() == member.name)
        ):
            msgspec.structs.force_setattr(config, name, member)
            return
    allowed = ", ".join(member.name for member in kind)
    raise ConfigurationError(f"{name} must be one of {allowed}, got {value!r}")


class ConflictConfig(msgspec.Struct, kw_only=True, frozen=True):
    """Conflict-resolution settings; travels with a `ConflictResilient` command.

    `max_attempts` counts as a retry policy's `max_retries` does: at most N more calls after
    the first, each after resolving the conflict; `max_attempts=0` turns resolution off (the
    conflict propagates). From a command, `max_attempts` is bounded by the behavior's cap and
    `protected_fields` can only add to the behavior's.

    Field-name sets accept any set or list of names and are stored as frozensets, so a config
    stays hashable and safe to share.
    """

    policy: ConflictResolutionPolicy = ConflictResolutionPolicy.FIRST_WINS
    """What a conflict does: propagate (`FIRST_WINS`, the default), run the command again on
    the latest state with the command's state laid over it (`LAST_WINS`) or merged into it
    (`MERGE`), or run the command again unchanged (`RUN_AGAIN`: its handler reads the latest
    state itself, no hooks needed; `protected_fields` is moot, nothing is merged)."""
    strategy_name: str = "deep"
    """The merge strategy `MERGE` uses, by its name in the registry: "deep", "field",
    "timestamp", or one you registered. With a base state (`fetch_base_state`) the merge is
    three-way instead."""
    append_lists: bool = False
    """"deep": append the command's new list items instead of replacing the list."""
    list_identity_key: str | None = None
    """"deep" and three-way merges: lists of dicts are matched item by item on this key
    (e.g. "sku"); without it a list is one value."""
    include_fields: AbstractSet[str] | None = None
    """"field": the top-level fields the command's value wins for (None: every field)."""
    exclude_fields: AbstractSet[str] | None = None
    """"field": the top-level fields that keep the stored value (beats `include_fields`)."""
    timestamp_field: str = "modified_at"
    """"timestamp": the field whose later instant wins the whole state."""
    fallback_to_incoming: bool = True
    """"timestamp": when neither side has a valid timestamp, or both denote the same
    instant, the command's state wins (False: the stored one)."""
    max_attempts: int = 3
    """Resolution attempts: at most N more calls after the first, each after resolving the
    conflict (3: at most 4 calls in all); 0 turns resolution off."""
    protected_fields: AbstractSet[str] = frozenset({"id", "version"})
    """Fields always taken from the latest state, never from the command."""
    on_conflict: OnMergeConflict = OnMergeConflict.RAISE
    """What a three-way merge does with a field both sides changed differently: raise
    `MergeConflictError` (the default: nothing lost silently), or prefer one side."""

    def __post_init__(self) -> None:
        # Coerce the friendly spellings users write (sets, lists, strings) into the real types.
        for name in ("include_fields", "exclude_fields", "protected_fields"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, frozenset):
                if isinstance(value, str):
                    raise ConfigurationError(f"{name} must be a set of field names, not a string")
                msgspec.structs.force_setattr(self, name, frozenset(value))
        _coerce(self, "policy", ConflictResolutionPolicy)
        _coerce(self, "on_conflict", OnMergeConflict)
        if not isinstance(self.strategy_name, str) or not self.strategy_name:
            raise ConfigurationError(
                f"strategy_name must be a non-empty string, got {self.strategy_name!r}"
            )
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ConfigurationError(
                f"max_attempts must be an int ({MORE_CALLS}), got {self.max_attempts!r}"
            )
        if self.max_attempts < 0:
            raise ConfigurationError(
                f"max_attempts must be >= 0 ({MORE_CALLS}), got {self.max_attempts}"
            )
