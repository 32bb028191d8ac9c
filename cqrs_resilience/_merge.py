"""Merging aggregate states: the strategies behind the MERGE policy, and a three-way merge.

Why it is built the way it is:

- A merge never mutates its inputs and copies only what changes: unchanged subtrees of the
  result *are* the objects of `current` (or `incoming`). Nothing is deep-copied, so merging a
  large state costs little, but a caller must copy before mutating below the top level.
- Subtrees are compared with ``==`` (so, as in Python, ``1 == 1.0 == True``), which CPython
  does in C; the Python code walks only the parts that differ.
- Any depth works. The recursion goes at most `_Run.limit` levels down; deeper subtrees go on
  a work list and are merged later from the top of the stack, and comparisons too deep for
  ``==`` fall back to `_Canon`, which numbers equal values without recursing.
- A cycle never hangs a merge: one the merge would follow, or copy into its result, raises
  ValueError naming its path. A cycle in a part the result drops is not an error.
- A three-way merge counts NaN as equal to NaN (in Python two NaN objects differ), so a side
  that left a NaN alone did not change it. Two-way merges need no such care: replacing a NaN
  with a NaN changes nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, date, datetime
from typing import Any, ClassVar, Final, Protocol, TypeAlias, TypeVar, runtime_checkable

import msgspec

from ._conflict_config import ConflictConfig, OnMergeConflict
from ._errors import ConfigurationError, Conflict, MergeConflictError
from ._walk import entries as _entries
from ._walk import find_cycle as _find_cycle


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


class UnknownStrategyError(ConfigurationError):
    """A merge strategy was asked for by a name no registry entry has."""

    def __init__(self, name: object, registered: Iterable[str]) -> None:
        self.name = name
        self.registered = sorted(registered)
        super().__init__(
            f"unknown merge strategy {name!r} (strategy_name); "
            f"registered names: {', '.join(self.registered)}"
        )

    def __reduce__(self) -> tuple[type[UnknownStrategyError], tuple[object, list[str]]]:
        return type(self), (self.name, self.registered)


# ---------------------------------------------------------------------------------------------
# Shared machinery


class _Missing:
    """Marks a key absent on one side; never leaks out (conflicts report it as None)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Final = _Missing()
_REPEAT: Final = object()  # tags the 2nd, 3rd... list item sharing one identity value
_NUMBERED: Final = object()  # tags list-item keys that are _Canon numbers

_SCALARS: Final = frozenset({str, int, float, bool, type(None)})
_CONTAINERS: Final = (dict, list, tuple)
_EMPTY_DICT: Final[dict[Any, Any]] = {}  # stands in for a base that has no dict at a path
_EMPTY_LIST: Final[list[Any]] = []
_LIMITS: Final = (128, 16, 2)  # recursion depths tried, shallower when the caller's stack is deep
_DEFAULT_CONFIG: Final = ConflictConfig()

_encode: Final = msgspec.msgpack.Encoder().encode
_encode_sorted: Final = msgspec.msgpack.Encoder(order="sorted").encode
_NAN: Final = object()  # what every NaN is keyed and numbered as

_Path: TypeAlias = "tuple[_Path, Any] | None"  # (parent, key) links, built only when needed
_Box = TypeVar("_Box", dict[Any, Any], list[Any])


class _CycleFound(Exception):
    """Internal: a value being compared or keyed contains itself."""


def _check_acyclic(result: dict[Any, Any], unchecked: list[Any]) -> None:
    """Raise ValueError if `result` holds a cycle through one of the `unchecked` values."""
    if not unchecked:
        return
    try:
        _encode(unchecked)  # C speed; it fails on a cycle, but also on depth or odd types
        return
    except Exception:  # so decide in Python, without recursion
        pass
    if _find_cycle(unchecked) is None:
        return
    path = _find_cycle(result)
    if path is not None:
        raise ValueError(
            f"cannot merge: the merged state would contain a cycle at path {path!r} "
            "(a dict or list that contains itself)"
        )


class _Canon:
    """Numbers values so that equal values (by ==) get equal numbers, at any depth.

    Used where CPython's recursive ``==`` raises RecursionError, and to key list items msgspec
    cannot encode. Dicts compare regardless of key order, as ``==`` does.
    """

    __slots__ = ("_by_id", "_leaves", "_next", "_nodes")

    def __init__(self) -> None:
        self._by_id: dict[int, int] = {}
        self._leaves: dict[Any, int] = {}
        self._nodes: dict[tuple[Any, ...], int] = {}
        self._next = 0

    def equal(self, a: Any, b: Any) -> bool:
        if a is b:
            return True
        a_box, b_box = isinstance(a, _CONTAINERS), isinstance(b, _CONTAINERS)
        if a_box and b_box:
            return self.number(a) == self.number(b)
        return False if a_box or b_box else bool(a == b)

    def _intern(self, table: dict[Any, int], key: Any) -> int:
        number = table.get(key)
        if number is None:
            number = table[key] = self._next
            self._next += 1
        return number

    def _leaf(self, value: Any) -> int:
        if type(value) is float and value != value:  # NaN: every NaN object is one value here
            value = _NAN
        try:
            return self._intern(self._leaves, value)
        except TypeError:  # unhashable: a set equals its frozenset; anything else only itself
            if isinstance(value, set):
                return self._intern(self._leaves, frozenset(value))
            return self._intern(self._leaves, ("id", id(value)))  # no leaf is a tuple

    def number(self, value: Any) -> int:
        if not isinstance(value, _CONTAINERS):
            return self._leaf(value)
        known = self._by_id.get(id(value))
        if known is not None:
            return known
        active = {id(value)}
        # frame: node, its entries, the numbers of its children so far, its key in the parent
        stack: list[tuple[Any, Iterator[tuple[Any, Any]], list[Any], Any]] = [
            (value, _entries(value), [], None)
        ]
        while True:
            node, entries, parts, key = stack[-1]
            is_dict = isinstance(node, dict)
            for child_key, child in entries:
                if not isinstance(child, _CONTAINERS):
                    number = self._leaf(child)
                else:
                    found = self._by_id.get(id(child))
                    if found is None:
                        if id(child) in active:
                            raise _CycleFound
                        active.add(id(child))
                        stack.append((child, _entries(child), [], child_key))
                        break
                    number = found
                parts.append((child_key, number) if is_dict else number)
            else:
                stack.pop()
                active.discard(id(node))
                kind = "d" if is_dict else "l" if isinstance(node, list) else "t"
                signature = (kind, frozenset(parts) if is_dict else tuple(parts))
                number = self._by_id[id(node)] = self._intern(self._nodes, signature)
                if not stack:
                    return number
                parent = stack[-1]
                parent[2].append((key, number) if isinstance(parent[0], dict) else number)


class _Run:
    """One merge in progress: its options, the conflicts found so far, the values it kept
    without looking inside (checked for cycles at the end), and the subtrees it put off
    because they lie deeper than `limit`."""

    __slots__ = (
        "append",
        "canon",
        "chain",
        "conflicts",
        "deferred",
        "inputs",
        "key",
        "limit",
        "on_conflict",
        "pending",
    )

    def __init__(
        self,
        inputs: tuple[tuple[str, Any], ...],
        *,
        limit: int = _LIMITS[0],
        key: str | None = None,
        append: bool = False,
        on_conflict: OnMergeConflict = OnMergeConflict.RAISE,
    ) -> None:
        self.inputs = inputs
        self.limit = limit
        self.key = key
        self.append = append
        self.on_conflict = on_conflict
        self.conflicts: list[Conflict] = []
        self.pending: list[Any] = []
        self.canon: _Canon | None = None
        self.deferred: list[tuple[Callable[..., Any], tuple[Any, ...], Any, Any]] = []
        self.chain: Any = None  # (ids of the deferred call's inputs, parent link)

    def defer(self, fn: Callable[..., Any], args: tuple[Any, ...], into: _Box) -> _Box:
        """Merge `args` later, into `into`; the chain of deferrals spots a cycle followed."""
        ident = tuple(id(a) for a in args if isinstance(a, (dict, list)))
        link = self.chain
        while link is not None:
            if link[0] == ident:
                raise self.input_cycle()
            link = link[1]
        self.deferred.append((fn, args, into, (ident, self.chain)))
        return into

    def drain(self) -> None:
        deferred = self.deferred
        done = 0
        while done < len(deferred):
            fn, args, into, self.chain = deferred[done]
            done += 1
            fn(*args, 0, self, into)

    def equal(self, a: Any, b: Any) -> bool:
        """a == b for values too deep for CPython's comparison; later ones skip straight here."""
        if self.canon is None:
            self.canon = _Canon()
        return self.canon.equal(a, b)

    def item_key(self, item: Any) -> Any:
        """What makes two list items duplicates: == if hashable, else equal sorted encodings."""
        kind = type(item)
        if kind in _SCALARS:
            return _NAN if kind is float and item != item else item
        if kind is bytes:
            return (bytes, item)  # bare bytes are the encodings below
        if kind is not dict and kind is not list:
            try:
                hash(item)
                return item
            except (TypeError, RecursionError):
                pass
        try:
            return _encode_sorted(item)  # no wrapper: a million tuples would wake the GC
        except Exception:  # non-str keys, types msgpack lacks, or too deep: number it instead
            if self.canon is None:
                self.canon = _Canon()
            return (_NUMBERED, self.canon.number(item))

    def conflict(self, path: _Path, base: Any, current: Any, incoming: Any) -> Any:
        """Settle a path both sides changed differently; the value to keep (_MISSING: none)."""
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
            path = _find_cycle(value)
            if path is not None:
                return ValueError(
                    f"cannot merge: {name} contains a cycle at path {path!r} "
                    "(a dict or list that contains itself)"
                )
        return ValueError("cannot merge: an input contains a cycle")  # pragma: no cover


def _shown(value: Any) -> Any:
    return None if value is _MISSING else value


def _same(a: Any, b: Any, run: _Run) -> bool:
    """a == b (NaN == NaN for floats), also for values nested too deep for CPython's `==`.

    Containers holding NaN may still compare different here: the merge recurses into dicts
    and keyed lists anyway, where the NaNs meet as floats. Where a difference would become a
    conflict or a deletion, `_same_nan` decides instead.
    """
    if a is b:
        return True
    if run.canon is None:
        try:
            return bool(a == b) or (type(a) is float and type(b) is float and a != a and b != b)
        except RecursionError:
            pass
    return run.equal(a, b)


def _same_nan(a: Any, b: Any, run: _Run) -> bool:
    """`_same`, with NaN equal to NaN inside containers too: for the decisions that drop a
    value (a conflict, a deletion), where a NaN must not count as a change."""
    return _same(a, b, run) or (run.canon is None and _equal_but_nan(a, b))


def _equal_but_nan(a: Any, b: Any) -> bool:
    """Whether values that are not == differ only where both hold a NaN (of any bits)."""
    kind = type(a)
    if kind is float:
        return type(b) is float and a != a and b != b
    if kind not in _CONTAINERS or type(b) is not kind:
        return False
    try:  # C speed first: equal encodings, or no NaN on either side to explain a difference
        left, right = _encode_sorted(a), _encode_sorted(b)
        if left == right:
            return True
        if not (_NAN_BYTES.search(left) and _NAN_BYTES.search(right)):
            return False
    except Exception:  # keys that do not sort, types msgpack lacks, too deep: walk instead
        pass
    return _walk_equal_but_nan(a, b)


# A msgpack float64 whose exponent bits are all ones: NaN or infinity (or bytes that look so).
_NAN_BYTES: Final = re.compile(rb"\xcb[\x7f\xff][\xf0-\xff]")


def _walk_equal_but_nan(a: Any, b: Any) -> bool:
    """Structural equality with NaN == NaN, walking only the pairs == calls different; a
    pair met again (a cycle) adds nothing new."""
    pending = [(a, b)]
    seen: set[tuple[int, int]] = set()
    while pending:
        x, y = pending.pop()
        if x is y:
            continue
        kind = type(x)
        if kind in _CONTAINERS:
            pair = (id(x), id(y))
            if pair in seen:
                continue
            seen.add(pair)
        try:
            if x == y:
                continue
        except RecursionError:
            pass
        if kind is float:
            if type(y) is float and x != x and y != y:
                continue
            return False
        if kind is not type(y) or kind not in _CONTAINERS or len(x) != len(y):
            return False
        if kind is dict:
            if x.keys() != y.keys():
                return False
            pending.extend((x[k], y[k]) for k in x)
        else:
            pending.extend(zip(x, y, strict=True))
    return True


def _execute(
    fn: Callable[..., dict[Any, Any]],
    args: tuple[Any, ...],
    current: dict[str, Any],
    inputs: tuple[tuple[str, Any], ...],
    *,
    key: str | None = None,
    append: bool = False,
    on_conflict: OnMergeConflict = OnMergeConflict.RAISE,
) -> dict[str, Any]:
    for limit in _LIMITS:
        run = _Run(inputs, limit=limit, key=key, append=append, on_conflict=on_conflict)
        try:
            merged = fn(*args, 0, run)
            run.drain()
        except RecursionError:
            if limit == _LIMITS[-1]:
                raise
            continue  # the caller's stack is already deep: try again, recursing less
        except _CycleFound:
            raise run.input_cycle() from None
        if run.conflicts:
            raise MergeConflictError(run.conflicts)
        if merged is current:
            merged = dict(merged)  # the top level is always a new dict
        _check_acyclic(merged, run.pending)
        return merged
    raise AssertionError("unreachable")  # pragma: no cover


def _identities(items: list[Any], key: str) -> tuple[list[Any], dict[Any, int], int]:
    """Each item's identity (its `key` value; repeats numbered), each identity's position,
    and how many items have none (not a dict, no `key`, or an unhashable value)."""
    idents: list[Any] = []
    index: dict[Any, int] = {}
    repeats: dict[Any, int] = {}
    loose = 0
    for pos, item in enumerate(items):
        ident: Any = _MISSING
        if isinstance(item, dict):
            value = item.get(key, _MISSING)
            if value is not _MISSING:
                try:
                    if value in index:  # matched by position among items sharing a value
                        repeat = repeats[value] = repeats.get(value, 0) + 1
                        ident = (_REPEAT, value, repeat)
                    else:
                        ident = value
                    index[ident] = pos
                except TypeError:
                    ident = _MISSING
        if ident is _MISSING:
            loose += 1
        idents.append(ident)
    return idents, index, loose


def _require_dicts(**states: Any) -> None:
    for name, state in states.items():
        if not isinstance(state, dict):
            raise TypeError(f"{name} must be a dict, got {type(state).__name__}")


def _identity_key(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigurationError(
            f"list_identity_key must be a non-empty field name or None, got {value!r}"
        )
    return value


def _on_conflict(value: Any) -> OnMergeConflict:
    try:
        return OnMergeConflict(value)
    except ValueError:
        allowed = ", ".join(member.value for member in OnMergeConflict)
        raise ConfigurationError(f"on_conflict must be one of {allowed}, got {value!r}") from None


# ---------------------------------------------------------------------------------------------
# Two-way deep merge


def _merge2(
    c: dict[Any, Any], i: dict[Any, Any], depth: int, run: _Run, into: dict[Any, Any] | None = None
) -> dict[Any, Any]:
    if depth >= run.limit and into is None:
        return run.defer(_merge2, (c, i), {})
    canon = run.canon
    out = None
    for k, iv in i.items():
        try:
            cv = c[k]
        except KeyError:
            cv = _MISSING
        else:
            if iv is cv:
                if type(iv) not in _SCALARS:
                    run.pending.append(iv)
                continue
            try:
                same = iv == cv if canon is None else canon.equal(iv, cv)
            except RecursionError:
                same = run.equal(iv, cv)
            if same:
                continue
        nv: Any
        if isinstance(iv, dict) and isinstance(cv, dict):
            nv = _merge2(cv, iv, depth + 1, run)
            if nv is cv:
                continue
        elif isinstance(iv, list) and isinstance(cv, list) and (run.key is not None or run.append):
            nv = _merge_list2(cv, iv, depth + 1, run)
            if nv is cv:
                continue
        else:
            nv = iv
            if type(iv) not in _SCALARS:
                run.pending.append(iv)
        if out is None:
            out = dict(c)
        out[k] = nv
    result = c if out is None else out
    if len(result) > len(i):  # current has keys incoming lacks: kept as they are
        run.pending.append(c)
    if into is None:
        return result
    into.update(result)
    return into


def _merge_list2(
    cl: list[Any], il: list[Any], depth: int, run: _Run, into: list[Any] | None = None
) -> list[Any]:
    if depth >= run.limit and into is None:
        return run.defer(_merge_list2, (cl, il), [])
    result = _merge_keyed2(cl, il, depth, run) if run.key is not None else _append_new(cl, il, run)
    if into is None:
        return result
    into[:] = result
    return into


def _append_new(cl: list[Any], il: list[Any], run: _Run) -> list[Any]:
    """Current's items, then incoming's items not already there (keying every item once)."""
    seen = {run.item_key(item) for item in cl}
    out = None
    for item in il:
        k = run.item_key(item)
        if k not in seen:
            seen.add(k)
            if out is None:
                out = list(cl)
            out.append(item)
    return cl if out is None else out


def _merge_keyed2(cl: list[Any], il: list[Any], depth: int, run: _Run) -> list[Any]:
    """Items with the same identity merge in place; new ones are appended."""
    assert run.key is not None
    c_ids, c_index, c_loose = _identities(cl, run.key)
    i_ids = _identities(il, run.key)[0]
    out = None
    seen: set[Any] | None = None  # keys of the items without identity, built on first need
    matched = 0
    for item, ident in zip(il, i_ids, strict=True):
        if ident is _MISSING:
            if seen is None:
                seen = {run.item_key(x) for x, d in zip(cl, c_ids, strict=True) if d is _MISSING}
            k = run.item_key(item)
            if k in seen:
                continue
            seen.add(k)
        else:
            pos = c_index.get(ident)
            if pos is not None:
                matched += 1
                current_item = cl[pos]
                if item is current_item:
                    run.pending.append(item)
                    continue
                if _same(item, current_item, run):
                    continue
                merged = _merge2(current_item, item, depth + 1, run)
                if merged is current_item:
                    continue
                if out is None:
                    out = list(cl)
                out[pos] = merged
                continue
            run.pending.append(item)
        if out is None:
            out = list(cl)
        out.append(item)
    if matched < len(c_index) or (c_loose and seen is None):
        run.pending.append(cl)  # current items incoming did not mention are kept as they are
    return cl if out is None else out


# ---------------------------------------------------------------------------------------------
# Three-way merge


def _merge3(
    b: dict[Any, Any],
    c: dict[Any, Any],
    i: dict[Any, Any],
    path: _Path,
    depth: int,
    run: _Run,
    into: dict[Any, Any] | None = None,
) -> dict[Any, Any]:
    if depth >= run.limit and into is None:
        return run.defer(_merge3, (b, c, i, path), {})
    canon = run.canon
    out = None
    shared = 0  # keys both have; fewer than len(c) means current has keys incoming lacks
    for k, iv in i.items():
        try:
            cv = c[k]
        except KeyError:
            cv = _MISSING
        else:
            shared += 1
            if iv is cv:
                if type(iv) not in _SCALARS:
                    run.pending.append(iv)
                continue
            try:
                same = iv == cv if canon is None else canon.equal(iv, cv)
            except RecursionError:
                same = run.equal(iv, cv)
            if same:  # unchanged, or the same change on both sides
                continue
        bv = b.get(k, _MISSING)
        if _same(iv, bv, run):  # only current changed it (or deleted it)
            if type(cv) not in _SCALARS and cv is not _MISSING:
                run.pending.append(cv)
            continue
        nv: Any
        if _same(cv, bv, run):  # only incoming changed it
            nv = iv
            if type(iv) not in _SCALARS:
                run.pending.append(iv)
        elif isinstance(cv, dict) and isinstance(iv, dict):
            nv = _merge3(
                bv if isinstance(bv, dict) else _EMPTY_DICT, cv, iv, (path, k), depth + 1, run
            )
            if nv is cv:
                continue
        elif run.key is not None and isinstance(cv, list) and isinstance(iv, list):
            base_list = bv if isinstance(bv, list) else _EMPTY_LIST
            nv = _merge3_keyed(base_list, cv, iv, (path, k), depth + 1, run)
            if nv is cv:
                continue
        elif _same_nan(iv, bv, run) or _same_nan(iv, cv, run):  # NaN alone told them apart
            if type(cv) not in _SCALARS and cv is not _MISSING:
                run.pending.append(cv)
            continue
        elif _same_nan(cv, bv, run):
            nv = iv
            if type(iv) not in _SCALARS:
                run.pending.append(iv)
        else:
            nv = run.conflict((path, k), bv, cv, iv)
            if type(nv) not in _SCALARS and nv is not _MISSING:
                run.pending.append(nv)
            if nv is cv:
                continue
        if out is None:
            out = dict(c)
        out[k] = nv
    if shared < len(c):  # keys incoming lacks: deleted by it, or added by current
        for k, cv in c.items():
            if k in i:
                continue
            bv = b.get(k, _MISSING)
            if bv is not _MISSING:
                gone = _same_nan(cv, bv, run)
                keep = _MISSING if gone else run.conflict((path, k), bv, cv, _MISSING)
                if keep is _MISSING:
                    if out is None:
                        out = dict(c)
                    del out[k]
                    continue
            if type(cv) not in _SCALARS:
                run.pending.append(cv)
    result = c if out is None else out
    if into is None:
        return result
    into.update(result)
    return into


def _merge3_keyed(
    bl: list[Any],
    cl: list[Any],
    il: list[Any],
    path: _Path,
    depth: int,
    run: _Run,
    into: list[Any] | None = None,
) -> list[Any]:
    """Three-way per item identity; items without one are added or removed as a set."""
    if depth >= run.limit and into is None:
        return run.defer(_merge3_keyed, (bl, cl, il, path), [])
    assert run.key is not None
    b_ids, b_index, b_loose = _identities(bl, run.key)
    c_ids, c_index, c_loose = _identities(cl, run.key)
    i_ids, i_index, i_loose = _identities(il, run.key)

    def loose_keys(items: list[Any], ids: list[Any], count: int) -> set[Any]:
        if not count:
            return set()
        return {run.item_key(x) for x, d in zip(items, ids, strict=True) if d is _MISSING}

    b_keys, c_keys, i_keys = (
        loose_keys(bl, b_ids, b_loose),
        loose_keys(cl, c_ids, c_loose),
        loose_keys(il, i_ids, i_loose),
    )
    run.pending.append((cl, il))  # whatever is kept comes from these two
    merged: list[Any] = []
    changed = False
    for pos, (item, ident) in enumerate(zip(cl, c_ids, strict=True)):
        if ident is _MISSING:
            k = run.item_key(item)
            if k in b_keys and k not in i_keys:  # incoming removed it
                changed = True
            else:
                merged.append(item)
            continue
        i_pos, b_pos = i_index.get(ident), b_index.get(ident)
        base_item = _MISSING if b_pos is None else bl[b_pos]
        if i_pos is None:
            if b_pos is not None:  # incoming removed it
                gone = _same_nan(item, base_item, run)
                if gone or run.conflict((path, pos), base_item, item, _MISSING) is _MISSING:
                    changed = True
                    continue
            merged.append(item)
            continue
        incoming_item = il[i_pos]
        if _same(item, incoming_item, run) or _same(incoming_item, base_item, run):
            merged.append(item)
        elif _same(item, base_item, run):
            merged.append(incoming_item)
            changed = True
        else:
            base = base_item if isinstance(base_item, dict) else _EMPTY_DICT
            both = _merge3(base, item, incoming_item, (path, pos), depth + 1, run)
            merged.append(both)
            changed = changed or both is not item
    for pos, (item, ident) in enumerate(zip(il, i_ids, strict=True)):
        if ident is _MISSING:
            k = run.item_key(item)
            if k not in b_keys and k not in c_keys:  # incoming added it
                c_keys.add(k)
                merged.append(item)
                changed = True
        elif ident not in c_index:
            b_pos = b_index.get(ident)
            if b_pos is not None:  # current removed it
                base_item = bl[b_pos]
                if _same_nan(item, base_item, run):
                    continue
                if run.conflict((path, pos), base_item, _MISSING, item) is _MISSING:
                    continue
            merged.append(item)
            changed = True
    result = merged if changed else cl
    if into is None:
        return result
    into[:] = result
    return into


def three_way_merge(
    base: dict[str, Any],
    current: dict[str, Any],
    incoming: dict[str, Any],
    *,
    list_identity_key: str | None = None,
    on_conflict: OnMergeConflict | str = OnMergeConflict.RAISE,
) -> dict[str, Any]:
    """Merge the changes `current` and `incoming` each made to `base`.

    A path changed on one side only keeps that side's value (a deletion included); the same
    change on both sides is kept once; dicts merge key by key, and lists of dicts merge item by
    item when `list_identity_key` names the field identifying an item (other lists are single
    values). Paths changed differently on both sides are conflicts: with RAISE they are all
    reported in one MergeConflictError (a side that deleted the value shows None), otherwise
    current's or incoming's value is taken. Conflict paths inside lists use the item's index
    in current, or in incoming for an item current no longer has.
    """
    _require_dicts(base=base, current=current, incoming=incoming)
    return _execute(
        _merge3,
        (base, current, incoming, None),
        current,
        (("base", base), ("current", current), ("incoming", incoming)),
        key=_identity_key(list_identity_key),
        on_conflict=_on_conflict(on_conflict),
    )


# ---------------------------------------------------------------------------------------------
# Strategies


class _Options:
    """Equality, hashing and a repr from a strategy's options, listed in `_fields`."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]]

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Options) or type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        options = (f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({', '.join(options)})"


class DeepMergeStrategy(_Options):
    """Merge nested dicts key by key: incoming's values win, keys only current has stay.

    Lists are replaced by incoming's, unless `append_lists` (incoming's items not already
    present are appended) or `list_identity_key` (dict items with the same value under that key
    are merged in place, keeping current's order; new ones are appended; current's other items
    stay). Repeated identity values pair up by position. Hashable items are compared with ==,
    others by their encoding with sorted keys (so there 1, 1.0 and True differ).
    """

    __slots__ = ("append_lists", "list_identity_key")
    _fields = ("append_lists", "list_identity_key")

    def __init__(self, append_lists: bool = False, list_identity_key: str | None = None) -> None:
        if not isinstance(append_lists, bool):
            raise ConfigurationError(f"append_lists must be a bool, got {append_lists!r}")
        self.append_lists = append_lists
        self.list_identity_key = _identity_key(list_identity_key)

    def merge(self, current: dict[str, Any], incoming: dict[str, Any]) -> dict[str, Any]:
        """Return current with incoming merged in; neither input changes."""
        _require_dicts(current=current, incoming=incoming)
        return _execute(
            _merge2,
            (current, incoming),
            current,
            (("current", current), ("incoming", incoming)),
            key=self.list_identity_key,
            append=self.append_lists,
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


class FieldLevelMergeStrategy(_Options):
    """Take incoming's value, whole, for each allowed top-level field; keep current's for the rest.

    A field is allowed when `include_fields` is None or lists it, and `exclude_fields` does not
    (exclude wins). A field only incoming has is added only if allowed.
    """

    __slots__ = ("exclude_fields", "include_fields")
    _fields = ("include_fields", "exclude_fields")

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
        _require_dicts(current=current, incoming=incoming)
        merged = dict(current)
        for field, value in incoming.items():
            if self.allows(field):
                merged[field] = value
        _check_acyclic(merged, [merged])
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
        _require_dicts(base=base, current=current, incoming=incoming)
        run = _Run(
            (("base", base), ("current", current), ("incoming", incoming)),
            on_conflict=_on_conflict(on_conflict),
        )
        merged = dict(current)
        try:
            for field in {**current, **incoming}:
                if not self.allows(field):
                    continue
                cv, iv = current.get(field, _MISSING), incoming.get(field, _MISSING)
                bv = base.get(field, _MISSING)
                if _same_nan(cv, iv, run) or _same_nan(iv, bv, run):
                    continue
                keep = iv if _same_nan(cv, bv, run) else run.conflict((None, field), bv, cv, iv)
                if keep is _MISSING:
                    merged.pop(field, None)
                else:
                    merged[field] = keep
        except _CycleFound:
            raise run.input_cycle() from None
        if run.conflicts:
            raise MergeConflictError(run.conflicts)
        _check_acyclic(merged, [merged])
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


class TimestampLastWinsStrategy(_Options):
    """The side whose `timestamp_field` is later wins whole.

    ISO-8601 strings (``Z`` or offsets), datetimes and dates compare by the instant they
    denote (naive ones are taken as UTC); numbers are epoch seconds and compare with numbers
    only (a number against a date-time raises ValueError). A side whose timestamp is missing
    or unreadable loses to one that has a valid timestamp; when neither has one, or both denote
    the same instant, incoming wins if `fallback_to_incoming`, else current.
    """

    __slots__ = ("fallback_to_incoming", "timestamp_field")
    _fields = ("timestamp_field", "fallback_to_incoming")

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
        _require_dicts(current=current, incoming=incoming)
        merged = dict(incoming if self.incoming_wins(current, incoming) else current)
        _check_acyclic(merged, [merged])
        return merged


# ---------------------------------------------------------------------------------------------
# Registry

StrategyFactory: TypeAlias = Callable[[], MergeStrategy]
"""A strategy class, or any callable taking no arguments that returns a strategy."""

_BUILTINS: Final[dict[str, Callable[[ConflictConfig], MergeStrategy]]] = {
    "deep": lambda config: DeepMergeStrategy(
        append_lists=config.append_lists, list_identity_key=config.list_identity_key
    ),
    "field": lambda config: FieldLevelMergeStrategy(
        include_fields=config.include_fields, exclude_fields=config.exclude_fields
    ),
    "timestamp": lambda config: TimestampLastWinsStrategy(
        timestamp_field=config.timestamp_field,
        fallback_to_incoming=config.fallback_to_incoming,
    ),
}


class MergeStrategyRegistry:
    """Merge strategies by name, so a ConflictConfig can name the one a command needs.

    Every registry knows the built-ins "deep", "field" and "timestamp", which take their
    options from the ConflictConfig passed to `get`. Registered factories are called with no
    arguments; registering a name again (a built-in's too) replaces it in this registry.
    """

    __slots__ = ("_factories",)

    def __init__(self) -> None:
        self._factories: dict[str, StrategyFactory] = {}

    def register(self, name: str, factory: StrategyFactory) -> None:
        """Make `get(name)` return `factory()`."""
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"strategy name must be a non-empty string, got {name!r}")
        if not callable(factory):
            raise TypeError(
                f"factory for merge strategy {name!r} must be a class or a callable taking "
                f"no arguments, got {factory!r}"
            )
        self._factories[name] = factory

    def get(self, name: str, config: ConflictConfig | None = None) -> MergeStrategy:
        """The strategy registered as `name`, built-ins configured from `config`."""
        factory = self._factories.get(name) if isinstance(name, str) else None
        if factory is not None:
            strategy = factory()
        elif isinstance(name, str) and name in _BUILTINS:
            strategy = _BUILTINS[name](_DEFAULT_CONFIG if config is None else config)
        else:
            raise UnknownStrategyError(name, self.names())
        if not isinstance(strategy, MergeStrategy):
            raise TypeError(
                f"factory for merge strategy {name!r} returned {strategy!r}, "
                "which has no merge(current, incoming) method"
            )
        return strategy

    def names(self) -> list[str]:
        """Every name `get` accepts, sorted."""
        return sorted({*_BUILTINS, *self._factories})

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._factories or name in _BUILTINS)

    def __getitem__(self, name: str) -> MergeStrategy:
        """`registry["deep"]`: `get(name)` with default options."""
        return self.get(name)

    def __repr__(self) -> str:
        return f"MergeStrategyRegistry(names={self.names()!r})"
