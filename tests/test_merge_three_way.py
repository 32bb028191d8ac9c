"""Tests for cqrs_resilience._merge_three_way: three_way_merge."""

from __future__ import annotations

import copy
from typing import Any
from unittest import mock

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cqrs_resilience import (
    ConfigurationError,
    Conflict,
    DeepMergeStrategy,
    MergeConflictError,
    OnMergeConflict,
    _merge_three_way,
    three_way_merge,
)
from tests.merge_data import DOCS, TREE_DOCS, nan, nested, revised


def test_three_way_keeps_one_sided_changes_including_deletions() -> None:
    """A path changed on one side only takes that side's value; deletions included."""
    base = {"a": 1, "b": 1, "c": 1, "d": 1, "n": {"x": 1, "y": 1}}
    current = {"a": 2, "b": 1, "d": 1, "n": {"x": 1, "y": 1}, "cur": True}
    incoming = {"a": 1, "b": 3, "c": 1, "n": {"x": 1}, "inc": True}

    assert three_way_merge(base, current, incoming) == {
        "a": 2,
        "b": 3,
        "n": {"x": 1},
        "cur": True,
        "inc": True,
    }


def test_three_way_accepts_the_same_change_on_both_sides() -> None:
    """Both sides making the same change (or the same deletion) is no conflict."""
    base = {"a": 1, "b": {"x": 1}, "gone": 1}
    current = {"a": 2, "b": {"x": 2}, "new": [1]}
    incoming = {"a": 2, "b": {"x": 2}, "new": [1]}

    assert three_way_merge(base, current, incoming) == {"a": 2, "b": {"x": 2}, "new": [1]}


def test_three_way_reports_every_conflicting_path() -> None:
    """Different changes to the same paths raise one error listing all of them."""
    base = {"a": 1, "n": {"x": 1, "y": 1}, "l": [1], "ok": 1}
    current = {"a": 2, "n": {"x": 2, "y": 2}, "l": [2], "ok": 2}
    incoming = {"a": 3, "n": {"x": 3, "y": 1}, "l": [3], "ok": 1}

    with pytest.raises(MergeConflictError) as caught:
        three_way_merge(base, current, incoming)

    assert caught.value.conflicts == [
        Conflict(("a",), 1, 2, 3),
        Conflict(("n", "x"), 1, 2, 3),
        Conflict(("l",), [1], [2], [3]),
    ]
    assert "n/x" in str(caught.value)


def test_three_way_deletion_against_change_is_a_conflict_shown_as_none() -> None:
    """A value deleted on one side and changed on the other conflicts; the deletion is None."""
    base = {"a": 1, "b": {"x": 1}}
    current = {"b": {"x": 2}}
    incoming = {"a": 5}

    with pytest.raises(MergeConflictError) as caught:
        three_way_merge(base, current, incoming)

    assert caught.value.conflicts == [
        Conflict(("a",), 1, None, 5),
        Conflict(("b",), {"x": 1}, {"x": 2}, None),
    ]


@pytest.mark.parametrize(
    ("on_conflict", "expected"),
    [
        (OnMergeConflict.PREFER_CURRENT, {"a": 2, "n": {"x": 2, "y": 9}, "b": {"x": 2}}),
        ("prefer_incoming", {"a": 3, "n": {"x": 3, "y": 9}, "c": 5}),
    ],
)
def test_three_way_preferences_settle_conflicts(
    on_conflict: OnMergeConflict | str, expected: dict[str, Any]
) -> None:
    """PREFER_CURRENT / PREFER_INCOMING take that side's value (or deletion) at each conflict."""
    base = {"a": 1, "n": {"x": 1, "y": 1}, "b": {"x": 1}, "c": 1}
    current = {"a": 2, "n": {"x": 2, "y": 9}, "b": {"x": 2}}
    incoming = {"a": 3, "n": {"x": 3, "y": 1}, "c": 5}

    assert three_way_merge(base, current, incoming, on_conflict=on_conflict) == expected


def test_three_way_rejects_an_unknown_on_conflict() -> None:
    """An unknown on_conflict raises ConfigurationError naming the allowed values."""
    with pytest.raises(ConfigurationError, match="prefer_current"):
        three_way_merge({}, {}, {}, on_conflict="prefer_nobody")


def test_three_way_identity_keyed_items_add_delete_and_change() -> None:
    """Items are matched by id: added, deleted and changed items from both sides combine."""
    base = {"items": [{"id": 1, "q": 1}, {"id": 2, "q": 1}, {"id": 3, "q": 1}, {"id": 4, "q": 1}]}
    current = {"items": [{"id": 4, "q": 1}, {"id": 1, "q": 5}, {"id": 3, "q": 1}, {"id": 7}]}
    incoming = {
        "items": [{"id": 1, "q": 1, "n": "x"}, {"id": 2, "q": 1}, {"id": 4, "q": 2}, {"id": 8}]
    }

    merged = three_way_merge(base, current, incoming, list_identity_key="id")

    # 2 was deleted by current, 3 by incoming; 1 merges both edits; 4 takes incoming's edit;
    # current's order first, then incoming's new item.
    assert merged == {
        "items": [{"id": 4, "q": 2}, {"id": 1, "q": 5, "n": "x"}, {"id": 7}, {"id": 8}]
    }


def test_three_way_identity_keyed_conflicts_name_the_item_index() -> None:
    """Conflicts inside or about an item report its index (current's, else incoming's)."""
    base = {"items": [{"id": 1, "q": 1}, {"id": 2, "q": 1}]}
    current = {"items": [{"id": 1, "q": 2}]}
    incoming = {"items": [{"id": 1, "q": 3}, {"id": 2, "q": 9}]}

    with pytest.raises(MergeConflictError) as caught:
        DeepMergeStrategy(list_identity_key="id").merge3(base, current, incoming)

    assert caught.value.conflicts == [
        Conflict(("items", 0, "q"), 1, 2, 3),
        Conflict(("items", 1), {"id": 2, "q": 1}, None, {"id": 2, "q": 9}),
    ]


def test_three_way_identity_keyed_item_deleted_on_one_side_and_changed_on_the_other() -> None:
    """An item incoming deleted but current changed is a conflict; unchanged, it is deleted."""
    base = {"items": [{"id": 1, "q": 1}, {"id": 2, "q": 1}, {"id": 3, "q": 1}]}
    current = {"items": [{"id": 1, "q": 2}, {"id": 2, "q": 1}, {"id": 3, "q": 1}]}
    incoming = {"items": [{"id": 3, "q": 7}]}

    with pytest.raises(MergeConflictError) as caught:
        three_way_merge(base, current, incoming, list_identity_key="id")

    assert caught.value.conflicts == [
        Conflict(("items", 0), {"id": 1, "q": 1}, {"id": 1, "q": 2}, None)
    ]
    settled = three_way_merge(
        base, current, incoming, list_identity_key="id", on_conflict="prefer_incoming"
    )
    assert settled == {"items": [{"id": 3, "q": 7}]}


def test_three_way_items_without_identity_are_added_and_removed_as_a_set() -> None:
    """In an identity-keyed list, items lacking the key follow additions and removals."""
    base = {"l": [{"id": 1}, "old", "both"]}
    current = {"l": [{"id": 1}, "old", "both", "cur"]}
    incoming = {"l": [{"id": 1, "x": 1}, "both", "inc", "cur"]}

    merged = three_way_merge(base, current, incoming, list_identity_key="id")

    assert merged == {"l": [{"id": 1, "x": 1}, "both", "cur", "inc"]}


def test_three_way_conflict_on_lists_of_dicts_hints_at_list_identity_key() -> None:
    """Lists of dicts changed on both sides without a list_identity_key: the error says how
    to merge them item by item; with the key they merge, and other conflicts get no hint."""
    base = {"items": [{"id": 1, "qty": 1}]}
    current = {"items": [{"id": 1, "qty": 2}]}
    incoming = {"items": [{"id": 1, "qty": 1}, {"id": 2, "qty": 1}]}
    with pytest.raises(MergeConflictError, match=r"list_identity_key=\.\.\.") as caught:
        three_way_merge(base, current, incoming)
    assert [c.path for c in caught.value.conflicts] == [("items",)]
    assert str(caught.value).startswith("1 conflicting change(s) at: items; lists of dicts")
    merged = three_way_merge(base, current, incoming, list_identity_key="id")
    assert merged == {"items": [{"id": 1, "qty": 2}, {"id": 2, "qty": 1}]}
    with pytest.raises(MergeConflictError) as plain:
        three_way_merge({"tags": ["a"]}, {"tags": ["b"]}, {"tags": ["c"]})
    assert "list_identity_key" not in str(plain.value)


def test_three_way_takes_a_one_sided_list_change_whole() -> None:
    """If only one side touched an identity-keyed list, that side's list (and order) wins."""
    base = {"items": [{"id": 1}, {"id": 2}]}
    incoming = {"items": [{"id": 2}, {"id": 1, "x": 1}]}

    assert three_way_merge(base, base, incoming, list_identity_key="id") == incoming


def test_three_way_new_dicts_on_both_sides_merge_against_an_empty_base() -> None:
    """A dict added on both sides merges key by key; only differing keys conflict."""
    merged = three_way_merge({}, {"n": {"a": 1, "s": 0}}, {"n": {"b": 2, "s": 0}})

    assert merged == {"n": {"a": 1, "s": 0, "b": 2}}


def test_three_way_merge_leaves_inputs_alone_and_shares_unchanged_parts() -> None:
    """The inputs are untouched; subtrees only current changed are current's objects."""
    base = {"a": {"x": 1}, "b": {"y": 1}}
    current = {"a": {"x": 2}, "b": {"y": 1}}
    incoming = {"a": {"x": 1}, "b": {"y": 3}}
    before = copy.deepcopy((base, current, incoming))

    merged = three_way_merge(base, current, incoming)

    assert merged == {"a": {"x": 2}, "b": {"y": 3}}
    assert merged["a"] is current["a"]
    assert (base, current, incoming) == before


def test_deep_nesting_conflict_is_reported_with_its_full_path() -> None:
    """A conflict 5,000 levels down is reported with all 5,001 keys of its path."""
    with pytest.raises(MergeConflictError) as caught:
        three_way_merge(nested(5_000, 0), nested(5_000, 1), nested(5_000, 2))

    (conflict,) = caught.value.conflicts
    assert conflict.path == ("a",) * 5_000 + ("leaf",)
    assert (conflict.base, conflict.current, conflict.incoming) == (0, 1, 2)


# ---------------------------------------------------------------------------------------------
# NaN: a side that left a NaN alone did not change it


@pytest.mark.parametrize(
    "on_conflict",
    [OnMergeConflict.RAISE, OnMergeConflict.PREFER_CURRENT, OnMergeConflict.PREFER_INCOMING],
)
@pytest.mark.parametrize(
    ("base", "current", "incoming", "expected"),
    [
        ({"s": nan()}, {"s": nan()}, {"s": 5}, {"s": 5}),
        ({"s": [1, nan()]}, {"s": [1, nan()]}, {"s": [2]}, {"s": [2]}),
        ({"s": {"a": nan(), "b": 1}}, {"s": {"a": nan(), "b": 1}}, {"s": 7}, {"s": 7}),
        ({"s": (nan(), 1)}, {"s": (nan(), 1)}, {"s": None}, {"s": None}),
        ({"s": 1, "t": nan()}, {"s": 2, "t": nan()}, {"s": 1, "t": nan()}, {"s": 2}),
    ],
)
def test_an_unchanged_nan_is_no_change(
    base: dict[str, Any],
    current: dict[str, Any],
    incoming: dict[str, Any],
    expected: dict[str, Any],
    on_conflict: OnMergeConflict,
) -> None:
    """NaN equals NaN when deciding what a side changed, inside lists and dicts too."""
    merged = three_way_merge(base, current, incoming, on_conflict=on_conflict)
    for key, value in expected.items():
        assert merged[key] == value
    assert set(merged) == set(expected) | {"t"} & set(base)


def test_the_same_nan_change_on_both_sides_is_no_conflict() -> None:
    """Both sides set a value to NaN (different objects): one change, not a conflict."""
    merged = three_way_merge(
        {"s": 1, "l": [1]}, {"s": nan(), "l": [nan()]}, {"s": nan(), "l": [nan()]}
    )
    assert merged["s"] != merged["s"] and merged["l"][0] != merged["l"][0]


def test_keyed_list_items_with_nan_are_unchanged_items() -> None:
    """An item that holds a NaN and was not touched does not conflict with a change to it."""
    base = {"items": [{"id": 1, "w": nan(), "n": 0}]}
    current = {"items": [{"id": 1, "w": nan(), "n": 0}]}
    incoming = {"items": [{"id": 1, "w": nan(), "n": 5}]}
    merged = three_way_merge(base, current, incoming, list_identity_key="id")
    assert merged["items"][0]["n"] == 5


_plain = st.recursive(
    st.none() | st.integers(-5, 5) | st.text(max_size=3) | st.floats(allow_nan=True),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=12,
)


def _fresh(value: Any) -> Any:
    """The same value with every float a new object (NaNs included), as a decode gives it."""
    if isinstance(value, float):
        return float(repr(value)) if value == value else nan()
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fresh(v) for v in value]
    return value


@settings(max_examples=200, deadline=None)
@given(
    base=st.dictionaries(st.text(max_size=3), _plain, max_size=5),
    incoming=st.dictionaries(st.text(max_size=3), _plain, max_size=5),
)
def test_a_side_equal_to_base_never_conflicts(
    base: dict[str, Any], incoming: dict[str, Any]
) -> None:
    """A current equal to base (re-decoded, NaNs too) takes all of incoming, never conflicting."""
    current = _fresh(base)
    for on_conflict in OnMergeConflict:
        merged = three_way_merge(base, current, incoming, on_conflict=on_conflict)
        assert msgspec.msgpack.encode(_fresh(merged), order="sorted") == msgspec.msgpack.encode(
            _fresh(incoming), order="sorted"
        )


# ---------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=80, deadline=None)
@given(base=DOCS, change=DOCS, key=st.sampled_from([None, "id"]))
def test_property_one_sided_changes_win_whole(
    base: dict[str, Any], change: dict[str, Any], key: str | None
) -> None:
    """three_way_merge(base, base, x) == x and three_way_merge(base, x, base) == x."""
    assert three_way_merge(base, base, change, list_identity_key=key) == change
    assert three_way_merge(base, change, base, list_identity_key=key) == change
    assert three_way_merge(base, copy.deepcopy(base), change, list_identity_key=key) == change


def leaf_paths(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            paths.extend(leaf_paths(v, (*prefix, k)))
        else:
            paths.append((*prefix, k))
    return paths


def edited(doc: dict[str, Any], edits: list[tuple[tuple[str, ...], str]]) -> dict[str, Any]:
    """A copy of `doc` with each leaf path set to a new value, or deleted for "del"."""
    out = copy.deepcopy(doc)
    for path, value in edits:
        node = out
        for k in path[:-1]:
            node = node[k]
        if value == "del":
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return out


@settings(max_examples=100, deadline=None)
@given(base=DOCS, data=st.data())
def test_property_disjoint_changes_from_both_sides_all_survive(
    base: dict[str, Any], data: st.DataObject
) -> None:
    """Edits (changes, deletions, additions) to different paths all appear in the result."""
    paths = leaf_paths(base)
    sides = data.draw(
        st.lists(st.sampled_from([0, 1, 2]), min_size=len(paths), max_size=len(paths))
    )
    kinds = data.draw(
        st.lists(st.sampled_from(["del", "set"]), min_size=len(paths), max_size=len(paths))
    )
    edits: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
    for path, side, kind in zip(paths, sides, kinds, strict=True):
        edits[side].append((path, "del" if kind == "del" else f"side{side}"))
    current_edits = [*edits[1], (("added_by_current",), "c")]
    incoming_edits = [*edits[2], (("added_by_incoming",), "i")]

    merged = three_way_merge(base, edited(base, current_edits), edited(base, incoming_edits))

    assert merged == edited(base, current_edits + incoming_edits)


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.integers(0, 9), unique=True, max_size=8),
    data=st.data(),
)
def test_property_identity_keyed_disjoint_item_edits_all_survive(
    ids: list[int], data: st.DataObject
) -> None:
    """Item edits, deletions and additions to different ids on each side all survive."""
    base = {"items": [{"id": i, "v": 0} for i in ids]}
    sides = data.draw(st.lists(st.sampled_from([0, 1, 2]), min_size=len(ids), max_size=len(ids)))
    deletes = data.draw(st.lists(st.booleans(), min_size=len(ids), max_size=len(ids)))

    def side_items(side: int) -> list[dict[str, Any]]:
        items = []
        for i, s, delete in zip(ids, sides, deletes, strict=True):
            if s != side:
                items.append({"id": i, "v": 0})
            elif not delete:
                items.append({"id": i, "v": side})
        return [*items, {"id": 100 + side}]

    merged = three_way_merge(
        base, {"items": side_items(1)}, {"items": side_items(2)}, list_identity_key="id"
    )

    expected = [
        {"id": i, "v": s if s else 0}
        for i, s, delete in zip(ids, sides, deletes, strict=True)
        if not (s and delete)
    ]
    assert merged == {"items": [*expected, {"id": 101}, {"id": 102}]}


_ABSENT = object()


def reference(
    b: dict[str, Any], c: dict[str, Any], i: dict[str, Any], prefer: str, path: tuple[Any, ...] = ()
) -> tuple[dict[str, Any], list[Conflict]]:
    """The textbook recursive three-way merge of dicts and scalars: its result, and the
    conflicts, settled by taking `prefer`'s side ("current" or "incoming")."""
    merged: dict[str, Any] = {}
    conflicts: list[Conflict] = []
    for k in {**b, **c, **i}:
        bv, cv, iv = (side.get(k, _ABSENT) for side in (b, c, i))
        if cv == iv or iv == bv:
            value = cv
        elif cv == bv:
            value = iv
        elif isinstance(cv, dict) and isinstance(iv, dict):
            value, inner = reference(bv if isinstance(bv, dict) else {}, cv, iv, prefer, (*path, k))
            conflicts += inner
        else:
            shown = [None if v is _ABSENT else v for v in (bv, cv, iv)]
            conflicts.append(Conflict((*path, k), *shown))
            value = iv if prefer == "incoming" else cv
        if value is not _ABSENT:
            merged[k] = value
    return merged, conflicts


@settings(max_examples=300, deadline=None)
@given(base=TREE_DOCS, data=st.data())
def test_property_three_way_merge_is_the_textbook_recursive_merge(
    base: dict[str, Any], data: st.DataObject
) -> None:
    """On dicts and scalars, three_way_merge results and conflicts are the textbook merge's."""
    current, incoming = data.draw(revised(base)), data.draw(revised(base))
    expected, conflicts = reference(base, current, incoming, "current")

    if conflicts:
        with pytest.raises(MergeConflictError) as caught:
            three_way_merge(base, current, incoming)
        assert sorted(map(repr, caught.value.conflicts)) == sorted(map(repr, conflicts))
    else:
        assert three_way_merge(base, current, incoming) == expected
    for prefer in ("current", "incoming"):
        settled = three_way_merge(base, current, incoming, on_conflict=f"prefer_{prefer}")
        assert settled == reference(base, current, incoming, prefer)[0]


_ITEMS = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"id": st.sampled_from(["a", "b", "c", "d", "e"]), "n": st.integers(0, 2)}
        ),
        st.fixed_dictionaries({"n": st.integers(0, 2)}),  # no identity: matched as a value
        st.integers(0, 2),
        st.fixed_dictionaries({"id": st.just(["unhashable"])}),
    ),
    max_size=5,
)


@settings(max_examples=400, deadline=None)
@given(
    base=_ITEMS,
    current_tail=_ITEMS,
    incoming_tail=_ITEMS,
    how=st.sampled_from(list(OnMergeConflict)),
)
def test_property_appends_to_a_shared_base_merge_as_the_item_by_item_merge(
    base: list[Any],
    current_tail: list[Any],
    incoming_tail: list[Any],
    how: OnMergeConflict,
) -> None:
    """Both sides appending (the common case) skips the shared base items; the result, and
    every conflict with its path, is what the merge of every item gives."""
    states = [
        {"items": copy.deepcopy(items)}
        for items in (base, base + current_tail, base + incoming_tail)
    ]

    def merged() -> Any:
        try:
            return three_way_merge(*states, list_identity_key="id", on_conflict=how)
        except MergeConflictError as error:
            return sorted(map(repr, error.conflicts))

    fast = merged()
    with mock.patch.object(_merge_three_way, "_shared_start", return_value=0):
        assert fast == merged()


def test_appends_to_a_long_list_skip_its_shared_items() -> None:
    base = [{"id": f"i{n}", "qty": n} for n in range(1000)]
    current = [*copy.deepcopy(base), {"id": "c", "qty": 1}]
    incoming = [*copy.deepcopy(base), {"id": "n", "qty": 2}]
    assert _merge_three_way._shared_start(base, current, incoming, "id") == 1000
    merged = three_way_merge(
        {"items": base}, {"items": current}, {"items": incoming}, list_identity_key="id"
    )
    assert merged["items"] == [*base, {"id": "c", "qty": 1}, {"id": "n", "qty": 2}]
    assert merged["items"][0] is current[0]  # current's items kept, not copied
