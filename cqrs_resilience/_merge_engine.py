"""The engine every deep merge runs on: one `Run` per merge, at any depth, costing what changed.

Why it is built the way it is:

- A merge never mutates its inputs and copies only what changes: unchanged subtrees of the
  result *are* the objects of `current` (or `incoming`). Nothing is deep-copied, so merging a
  small change into a large state costs the change, but a caller must copy before mutating
  below the top level.
- The merge walks only where the inputs differ (``==`` in C finds it) and carries everything
  else along without looking inside.
- Any depth works. The recursion goes at most `Run.limit` levels down; deeper subtrees go on a
  work list and are merged later from the top of the stack (`Run.defer`), and comparisons too
  deep for ``==`` fall back to a depth-proof one (`_merge_equality`).
- Cycles are guarded where the merge walks, and only there: a value that contains itself, met
  while comparing or keying list items, raises ValueError naming the input and the path where
  the cycle closes; so do two states walked together round a cycle, which the merge notices
  when the chain of work it put off leads back to the same inputs. Never a RecursionError or a
  hang. A value the merge only carries along (unchanged, or taken whole from one side) is not
  inspected: a cycle there passes into the result as it was, and a store refuses the state.
- Inputs met twice where the recursion stops, without a cycle, share a subtree (states built
  in Python can; decoded ones cannot). The merge then starts again putting off every level,
  so each shared subtree is merged once and its result shared (its conflicts are reported at
  the first path met), and costs what the inputs hold, not every path to it. Sharing shallower
  than the limit is merged once per path, as ``==`` compares it once per path.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Final, TypeAlias, TypeVar

from ._errors import ConfigurationError, Conflict, MergeConflictError
from ._merge_equality import CycleFound, Equality
from ._walk import find_cycle


class OnMergeConflict(enum.StrEnum):
    """What a three-way merge does with a path both sides changed differently."""

    RAISE = "raise"
    """Raise MergeConflictError listing every conflicting path (the default: nothing lost)."""
    PREFER_CURRENT = "prefer_current"
    """Keep the value already stored."""
    PREFER_INCOMING = "prefer_incoming"
    """Take the command's value."""


class _Missing:
    """Marks a key absent on one side; never leaks out (conflicts report it as None)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Final = _Missing()
_REPEAT: Final = object()  # tags the 2nd, 3rd... list item sharing one identity value

LIMITS: Final = (128, 16, 2)  # recursion depths tried, shallower when the caller's stack is deep

Path: TypeAlias = "tuple[Path, Any] | None"  # (parent, key) links, built only when needed
Box = TypeVar("Box", dict[Any, Any], list[Any])


class _SharedSubtree(Exception):
    """Internal: the same inputs were met twice at the depth limit; merge again, sharing."""


class Run(Equality):
    """One merge in progress: its options, the conflicts found so far, and the subtrees it put
    off because they lie deeper than `limit`."""

    __slots__ = (
        "append",
        "chain",
        "conflicts",
        "deferred",
        "inputs",
        "key",
        "limit",
        "on_conflict",
        "put_off",
        "share",
    )

    def __init__(
        self,
        inputs: tuple[tuple[str, Any], ...],
        *,
        limit: int = LIMITS[0],
        share: bool = False,
        key: str | None = None,
        append: bool = False,
        on_conflict: OnMergeConflict = OnMergeConflict.RAISE,
    ) -> None:
        super().__init__()
        self.inputs = inputs
        self.limit = limit
        self.share = share
        self.key = key
        self.append = append
        self.on_conflict = on_conflict
        self.conflicts: list[Conflict] = []
        self.deferred: list[tuple[Callable[..., Any], tuple[Any, ...], Any, Any]] = []
        self.put_off: dict[tuple[int, ...], Any] = {}  # ids of deferred inputs: their `into`
        self.chain: Any = None  # (ids of the deferred call's inputs, parent link)

    def defer(self, fn: Callable[..., Any], args: tuple[Any, ...], into: Box) -> Box:
        """Merge `args` later, into `into`. Inputs put off before are a cycle followed if the
        chain of deferrals leads back to them (ValueError), else a subtree the inputs share:
        with `share` its merge is shared too, without, the merge starts again with `share`."""
        ident = tuple(id(a) for a in args if isinstance(a, (dict, list)))
        earlier: Box | None = self.put_off.get(ident)
        if earlier is not None:
            link = self.chain
            while link is not None:
                if link[0] == ident:
                    raise self.input_cycle()
                link = link[1]
            if not self.share:
                raise _SharedSubtree
            return earlier
        self.put_off[ident] = into
        self.deferred.append((fn, args, into, (ident, self.chain)))
        return into

    def drain(self) -> None:
        """Make the merges put off, from the top of the stack, each into the `into` that stood
        in for it; those put off meanwhile join the end of the list."""
        deferred = self.deferred
        done = 0
        while done < len(deferred):
            fn, args, into, self.chain = deferred[done]
            done += 1
            result = fn(*args, 0, self)
            if isinstance(into, dict):
                into.update(result)
            else:
                into[:] = result

    def conflict(self, path: Path, base: Any, current: Any, incoming: Any) -> Any:
        """Settle a path both sides changed differently; the value to keep (MISSING: none)."""
        if self.on_conflict is OnMergeConflict.PREFER_INCOMING:
            return incoming
        if self.on_conflict is OnMergeConflict.RAISE:
            keys: list[Any] = []
            while path is not None:
                path, key = path
                keys.append(key)
            keys.reverse()
            self.conflicts.append(Conflict(tuple(keys), *map(_shown, (base, current, incoming))))
        return current

    def input_cycle(self) -> ValueError:
        for name, value in self.inputs:
            path = find_cycle(value)
            if path is not None:
                return ValueError(
                    f"cannot merge: {name} contains a cycle at path {path!r} "
                    "(a dict or list that contains itself)"
                )
        return ValueError("cannot merge: an input contains a cycle")  # pragma: no cover


def _shown(value: Any) -> Any:
    return None if value is MISSING else value


def execute(
    fn: Callable[..., dict[Any, Any]],
    args: tuple[Any, ...],
    current: dict[str, Any],
    inputs: tuple[tuple[str, Any], ...],
    *,
    key: str | None = None,
    append: bool = False,
    on_conflict: OnMergeConflict = OnMergeConflict.RAISE,
) -> dict[str, Any]:
    """`fn(*args, depth, run)` and the work it put off; conflicts raised, the top level new.

    Inputs that share a subtree deeper than the limit (or hold a cycle the merge follows) meet
    it again there; so that such a merge costs what the inputs hold, not every path to it, it
    starts again putting off every level, and merges each shared subtree once (`Run.defer`).
    """

    def attempt(limit: int, share: bool = False) -> dict[str, Any]:
        run = Run(inputs, limit=limit, share=share, key=key, append=append, on_conflict=on_conflict)
        try:
            merged = fn(*args, 0, run)
            run.drain()
        except CycleFound:
            raise run.input_cycle() from None
        if run.conflicts:
            raise _conflict_error(run.conflicts, key)
        return dict(merged) if merged is current else merged  # the top level is always new

    for limit in LIMITS:
        try:
            return attempt(limit)
        except RecursionError:
            if limit == LIMITS[-1]:
                raise
            # the caller's stack is already deep: try again, recursing less
        except _SharedSubtree:
            break
    return attempt(1, share=True)


LIST_IDENTITY_HINT: Final = (
    "lists of dicts merge item by item only with list_identity_key=... (the field that "
    "identifies an item, e.g. 'id'); without it each list is one value"
)


def _conflict_error(conflicts: list[Conflict], key: str | None) -> MergeConflictError:
    """The error for `conflicts`, with a hint when a list of dicts conflicted whole for want
    of a `list_identity_key` (built on the error path only)."""
    error = MergeConflictError(conflicts)
    if key is None and any(_holds_dicts(c.current) and _holds_dicts(c.incoming) for c in conflicts):
        error = MergeConflictError(conflicts, f"{error}; {LIST_IDENTITY_HINT}")
    return error


def _holds_dicts(value: Any) -> bool:
    return isinstance(value, list) and any(isinstance(item, dict) for item in value)


def identities(items: list[Any], key: str) -> tuple[list[Any], dict[Any, int], int]:
    """Each item's identity (its `key` value; repeats numbered), each identity's position,
    and how many items have none (not a dict, no `key`, or an unhashable value)."""
    idents: list[Any] = []
    index: dict[Any, int] = {}
    repeats: dict[Any, int] = {}
    loose = 0
    for pos, item in enumerate(items):
        ident: Any = MISSING
        if isinstance(item, dict):
            value = item.get(key, MISSING)
            if value is not MISSING:
                try:
                    if value in index:  # matched by position among items sharing a value
                        repeat = repeats[value] = repeats.get(value, 0) + 1
                        ident = (_REPEAT, value, repeat)
                    else:
                        ident = value
                    index[ident] = pos
                except TypeError:
                    ident = MISSING
        if ident is MISSING:
            loose += 1
        idents.append(ident)
    return idents, index, loose


def require_dicts(**states: Any) -> None:
    for name, state in states.items():
        if not isinstance(state, dict):
            raise TypeError(f"{name} must be a dict, got {type(state).__name__}")


def checked_identity_key(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigurationError(
            f"list_identity_key must be a non-empty field name or None, got {value!r}"
        )
    return value


def checked_on_conflict(value: Any) -> OnMergeConflict:
    try:
        return OnMergeConflict(value)
    except ValueError:
        allowed = ", ".join(member.value for member in OnMergeConflict)
        raise ConfigurationError(f"on_conflict must be one of {allowed}, got {value!r}") from None
