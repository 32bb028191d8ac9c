"""How merges compare values: ``==`` at any depth, list items as keys, and the NaN rules.

- Values are compared with ``==`` (so, as in Python, ``1 == 1.0 == True``), which CPython does
  in C. Where ``==`` is too deep for CPython's recursion, `Canon` numbers values so that equal
  values get equal numbers, without recursing; a merge that needed it once keeps using it.
- In Python two NaN objects differ, so a three-way merge would see a side that left a NaN
  alone as having changed it. `Equality.same` counts NaN equal to NaN as a bare float only;
  `Equality.same_nan` also inside containers, and merges ask it only where a difference would
  drop a value (a conflict or a deletion), so the common comparisons stay in C.
- A value that contains itself, met while comparing or keying, raises `CycleFound`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Final

import msgspec

from ._walk import CONTAINERS
from ._walk import entries as _entries

_SCALARS: Final = frozenset({str, int, float, bool, type(None)})

_NAN: Final = object()  # what every NaN is keyed and numbered as
_NUMBERED: Final = object()  # tags list-item keys that are Canon numbers
_encode_sorted: Final = msgspec.msgpack.Encoder(order="sorted").encode
# A msgpack float64 whose exponent bits are all ones: NaN or infinity (or bytes that look so).
_NAN_BYTES: Final = re.compile(rb"\xcb[\x7f\xff][\xf0-\xff]")


class CycleFound(Exception):
    """Internal: a value being compared or keyed contains itself."""


class Canon:
    """Numbers values so that equal values (by ==) get equal numbers, at any depth.

    Used where CPython's recursive ``==`` raises RecursionError, and to key list items msgspec
    cannot encode. Dicts compare regardless of key order, as ``==`` does. Containers are
    remembered by id, so one Canon serves one merge, whose values all stay alive meanwhile.
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
        a_box, b_box = isinstance(a, CONTAINERS), isinstance(b, CONTAINERS)
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
        if not isinstance(value, CONTAINERS):
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
                if not isinstance(child, CONTAINERS):
                    number = self._leaf(child)
                else:
                    found = self._by_id.get(id(child))
                    if found is None:
                        if id(child) in active:
                            raise CycleFound
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


class Equality:
    """The comparisons of one merge. Once one was too deep for ``==``, all later ones go
    straight to the depth-proof `canon` (None until then)."""

    __slots__ = ("canon",)

    def __init__(self) -> None:
        self.canon: Canon | None = None

    def equal(self, a: Any, b: Any) -> bool:
        """a == b for values too deep for CPython's comparison."""
        if self.canon is None:
            self.canon = Canon()
        return self.canon.equal(a, b)

    def same(self, a: Any, b: Any) -> bool:
        """a == b (NaN == NaN for floats), also for values nested too deep for CPython's `==`.

        Containers holding NaN may still compare different here: the merge recurses into dicts
        and keyed lists anyway, where the NaNs meet as floats. Where a difference would become a
        conflict or a deletion, `same_nan` decides instead.
        """
        if a is b:
            return True
        if self.canon is None:
            try:
                return bool(a == b) or (type(a) is float and type(b) is float and a != a and b != b)
            except RecursionError:
                pass
        return self.equal(a, b)

    def same_nan(self, a: Any, b: Any) -> bool:
        """`same`, with NaN equal to NaN inside containers too: for the decisions that drop a
        value (a conflict, a deletion), where a NaN must not count as a change."""
        return self.same(a, b) or (self.canon is None and equal_but_nan(a, b))

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
                self.canon = Canon()
            return (_NUMBERED, self.canon.number(item))


def equal_but_nan(a: Any, b: Any) -> bool:
    """Whether values that are not == differ only where both hold a NaN (of any bits)."""
    kind = type(a)
    if kind is float:
        return type(b) is float and a != a and b != b
    if kind not in CONTAINERS or type(b) is not kind:
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
        if kind in CONTAINERS:
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
        if kind is not type(y) or kind not in CONTAINERS or len(x) != len(y):
            return False
        if kind is dict:
            if x.keys() != y.keys():
                return False
            pending.extend((x[k], y[k]) for k in x)
        else:
            pending.extend(zip(x, y, strict=True))
    return True
