"""Tests for cqrs_resilience._merge_engine: any depth, and the cycles a merge walks into."""

from __future__ import annotations

import sys
from typing import Any
from unittest import mock

import msgspec
import pytest
from hypothesis import given, settings

from cqrs_resilience import (
    Conflict,
    DeepMergeStrategy,
    FieldLevelMergeStrategy,
    MergeConflictError,
    three_way_merge,
)
from cqrs_resilience import _merge_engine as engine
from cqrs_resilience._walk import find_cycle
from tests.merge_data import DOCS, bottom, cyclic, nested

# ---------------------------------------------------------------------------------------------
# Any depth


def test_deep_nesting_merges_without_recursion_error() -> None:
    """5,000 levels of nesting merge two-way and three-way."""
    merged = DeepMergeStrategy().merge(nested(5_000, 1), nested(5_000, 2) | {"top": 1})
    assert bottom(merged) == (5_000, {"leaf": 2})
    assert merged["top"] == 1

    merged = three_way_merge(nested(5_000, 0), nested(5_000, 0) | {"c": 1}, nested(5_000, 2))
    assert bottom(merged) == (5_000, {"leaf": 2})
    assert merged["c"] == 1


def test_merge_works_when_the_caller_is_near_the_recursion_limit() -> None:
    """A merge called with little stack left still succeeds (it recurses less)."""
    current, incoming = nested(60, 1), nested(60, 2)
    depth = 0
    frame = sys._getframe()
    while frame.f_back is not None:
        frame, depth = frame.f_back, depth + 1

    def call_at(level: int) -> dict[str, Any]:
        if level > 0:
            return call_at(level - 1)
        return DeepMergeStrategy().merge(current, incoming)

    merged = call_at(sys.getrecursionlimit() - depth - 40)

    assert bottom(merged) == (60, {"leaf": 2})


@settings(max_examples=60, deadline=None)
@given(base=DOCS, current=DOCS, incoming=DOCS)
def test_property_shallow_recursion_gives_the_same_results(
    base: dict[str, Any], current: dict[str, Any], incoming: dict[str, Any]
) -> None:
    """Putting off every level to the work list (recursion depth 1) changes no result."""

    def outcome(fn: Any) -> Any:
        try:
            return fn()
        except MergeConflictError as error:
            return error.conflicts

    runs = [
        lambda: DeepMergeStrategy(append_lists=True).merge(current, incoming),
        lambda: DeepMergeStrategy(list_identity_key="id").merge(current, incoming),
        lambda: three_way_merge(base, current, incoming, list_identity_key="id"),
        lambda: three_way_merge(base, current, incoming, on_conflict="prefer_incoming"),
    ]
    normal = [outcome(run) for run in runs]
    with mock.patch.object(engine, "LIMITS", (1,)):
        shallow = [outcome(run) for run in runs]
    for a, b in zip(normal, shallow, strict=True):
        if isinstance(a, list) and a and isinstance(a[0], Conflict):
            assert sorted(map(repr, a)) == sorted(map(repr, b))
        else:
            assert a == b


# ---------------------------------------------------------------------------------------------
# Cycles: an error where the merge walks into one; carried along untouched elsewhere


def loop(tag: int) -> dict[str, Any]:
    """{"x": tag, "s": <itself>}."""
    doc: dict[str, Any] = {"x": tag}
    doc["s"] = doc
    return doc


def keyed_loop(tag: int) -> dict[str, Any]:
    """{"items": [{"id": 1, "x": tag, "items": <the same list>}]}: a cycle through a list."""
    items: list[Any] = []
    items.append({"id": 1, "x": tag, "items": items})
    return {"items": items}


def test_cycles_followed_in_lockstep_raise_instead_of_looping() -> None:
    """Two distinct cyclic states walked together raise ValueError, never hang."""
    first: dict[str, Any] = {}
    first["s"] = first
    second: dict[str, Any] = {}
    second["s"] = second

    with pytest.raises(ValueError, match="cycle"):
        DeepMergeStrategy().merge(first, second)
    with pytest.raises(ValueError, match="cycle"):
        three_way_merge(first, second, {"s": {"s": {"x": 1}}})
    with pytest.raises(ValueError, match="cycle"):
        DeepMergeStrategy(append_lists=True).merge({"l": []}, {"l": [first]})


def test_cycles_that_differ_at_every_level_raise_instead_of_looping() -> None:
    """Cyclic states that differ before their cycle closes, walked together, raise ValueError."""
    with pytest.raises(ValueError, match="current contains a cycle at path \\('s',\\)"):
        DeepMergeStrategy().merge(loop(1), loop(2))
    with pytest.raises(ValueError, match="cycle"):
        three_way_merge(loop(0), loop(1), loop(2))


def test_cycles_followed_through_identity_keyed_lists_raise() -> None:
    """Item by item merges that walk two cyclic lists together raise ValueError."""
    with pytest.raises(ValueError, match="cycle"):
        DeepMergeStrategy(list_identity_key="id").merge(keyed_loop(1), keyed_loop(2))
    with pytest.raises(ValueError, match="cycle"):
        three_way_merge(keyed_loop(0), keyed_loop(1), keyed_loop(2), list_identity_key="id")


def test_a_value_containing_itself_that_must_be_compared_raises() -> None:
    """Comparing (or keying, to append) a value that contains itself raises ValueError."""
    doc = cyclic()
    with pytest.raises(ValueError, match="incoming contains a cycle"):
        DeepMergeStrategy(append_lists=True).merge({"l": [1]}, {"l": [doc]})
    with pytest.raises(ValueError, match="current contains a cycle"):
        three_way_merge({}, {"a": doc}, {"a": cyclic()})


@pytest.mark.parametrize(
    "make_args",
    [
        lambda d: (d, d),
        lambda d: ({}, d),
        lambda d: (d, {"name": "y"}),
        lambda d: (d, {"child": {"value": 2}}),
        lambda d: ({"a": [1]}, {"a": [d]}),
    ],
)
def test_a_cycle_the_deep_merge_only_carries_along_is_not_inspected(make_args: Any) -> None:
    """A cyclic value the merge keeps or takes whole passes into the result, not looked inside."""
    current, incoming = make_args(cyclic())

    merged = DeepMergeStrategy().merge(current, incoming)

    assert find_cycle(merged) is not None
    assert all(merged[k] is v for k, v in incoming.items() if k not in current)


def test_three_way_merges_carry_a_cyclic_one_sided_change_whole() -> None:
    """A cyclic value one side added or changed is taken whole, not inspected."""
    doc = cyclic()

    assert three_way_merge({}, {}, {"new": doc})["new"] is doc
    assert three_way_merge({"a": 1}, {"a": doc}, {"a": 1, "b": 2})["a"] is doc
    assert FieldLevelMergeStrategy().merge3({}, {}, {"new": doc})["new"] is doc


def test_a_cycle_the_result_drops_is_not_an_error() -> None:
    """Replacing a cyclic value with a plain one merges normally."""
    assert DeepMergeStrategy().merge({"child": cyclic()}, {"child": 1}) == {"child": 1}


def braided(tag: int, period: int) -> dict[str, Any]:
    """A ring of `period` dicts, each {"x": tag, "a": next, "b": next}: 2**n paths n deep."""
    ring: list[dict[str, Any]] = [{"x": tag} for _ in range(period)]
    for node, after in zip(ring, ring[1:] + ring[:1], strict=True):
        node["a"] = node["b"] = after
    return ring[0]


@pytest.mark.parametrize("period", [1, 3, 300])
def test_a_cycle_followed_along_branching_paths_raises_at_once(period: int) -> None:
    """Cycles walked along many paths raise ValueError at once, longer than the recursion too."""
    with pytest.raises(ValueError, match="current contains a cycle"):
        DeepMergeStrategy().merge(braided(1, period), braided(2, period))
    with pytest.raises(ValueError, match="cycle"):
        three_way_merge(braided(0, period), braided(1, period), braided(2, period))


def shared_chain(tag: int, depth: int) -> dict[str, Any]:
    """{"x": tag, "a": node, "b": node} where node is the same dict, `depth` levels down."""
    node: dict[str, Any] = {"x": tag}
    for _ in range(depth):
        node = {"x": tag, "a": node, "b": node}
    return node


@pytest.mark.parametrize("depth", [200, 5_000])
def test_a_deep_subtree_shared_within_both_states_is_merged_once(depth: int) -> None:
    """A deep dict reachable along 2**depth paths is merged once and shared, two- and three-way."""
    current, incoming = shared_chain(1, depth), shared_chain(2, depth)

    for merged in (
        DeepMergeStrategy().merge(current, incoming),
        three_way_merge(shared_chain(0, depth), current, incoming, on_conflict="prefer_incoming"),
    ):
        levels = 0
        while "a" in merged:
            assert merged["a"] is merged["b"]
            assert merged["x"] == 2
            merged, levels = merged["a"], levels + 1
        assert (levels, merged) == (depth, {"x": 2})


def test_states_sharing_a_deep_subtree_merge_as_their_copies_do() -> None:
    """States sharing a deep dict merge as copies do; a conflict all three share is listed once."""
    shared_c, shared_i = nested(300, 1), nested(300, 2)
    current, incoming = {"x": shared_c, "y": shared_c}, {"x": shared_i, "y": shared_i}

    def copied(state: dict[str, Any]) -> dict[str, Any]:
        return msgspec.json.decode(msgspec.json.encode(state))  # type: ignore[no-any-return]

    merged = DeepMergeStrategy().merge(current, incoming)

    assert merged == DeepMergeStrategy().merge(copied(current), copied(incoming))
    assert merged["x"] is merged["y"]
    path = ("a",) * 300 + ("leaf",)
    with pytest.raises(MergeConflictError) as caught:
        three_way_merge({"x": nested(300, 0), "y": nested(300, 0)}, current, incoming)
    assert [conflict.path for conflict in caught.value.conflicts] == [("x", *path), ("y", *path)]
    base = nested(300, 0)  # shared by all three: merged once
    with pytest.raises(MergeConflictError) as caught:
        three_way_merge({"x": base, "y": base}, current, incoming)
    assert [conflict.path for conflict in caught.value.conflicts] == [("x", *path)]
