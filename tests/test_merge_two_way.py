"""Tests for cqrs_resilience._merge_two_way: the deep merge behind DeepMergeStrategy."""

from __future__ import annotations

import copy
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cqrs_resilience import DeepMergeStrategy
from tests.merge_data import DOCS, VALUES, nan, revised


def test_deep_merge_recurses_keeps_current_only_keys_and_lets_incoming_win() -> None:
    """Dicts merge recursively: current-only keys stay, incoming's keys are added or win."""
    current = {"a": 1, "n": {"x": 1, "y": {"p": 1, "q": 2}}, "keep": True}
    incoming = {"a": 2, "n": {"y": {"q": 3}, "z": 4}, "new": "v"}

    assert DeepMergeStrategy().merge(current, incoming) == {
        "a": 2,
        "n": {"x": 1, "y": {"p": 1, "q": 3}, "z": 4},
        "keep": True,
        "new": "v",
    }


def test_deep_merge_value_replaces_dict_and_dict_replaces_value() -> None:
    """Where only one side holds a dict, incoming's value wins whole."""
    merged = DeepMergeStrategy().merge({"a": {"x": 1}, "b": 5}, {"a": 7, "b": {"y": 2}})

    assert merged == {"a": 7, "b": {"y": 2}}


def test_deep_merge_replaces_lists_by_default() -> None:
    """Without append_lists or an identity key, incoming's list replaces current's."""
    merged = DeepMergeStrategy().merge({"l": [1, 2, 3]}, {"l": [3, 4]})

    assert merged == {"l": [3, 4]}


def test_deep_merge_append_lists_appends_only_new_items() -> None:
    """append_lists appends incoming items not already present, unhashable ones too, once."""
    current = {"l": [1, {"k": [1, 2]}, "s"]}
    incoming = {"l": [{"k": [1, 2]}, 2, 1, {"k": [2, 1]}, 2]}

    merged = DeepMergeStrategy(append_lists=True).merge(current, incoming)

    assert merged == {"l": [1, {"k": [1, 2]}, "s", 2, {"k": [2, 1]}]}


def test_deep_merge_append_lists_ignores_key_order_of_dict_items() -> None:
    """Dict items equal up to key order count as already present."""
    merged = DeepMergeStrategy(append_lists=True).merge(
        {"l": [{"a": 1, "b": 2}]}, {"l": [{"b": 2, "a": 1}]}
    )

    assert merged == {"l": [{"a": 1, "b": 2}]}


def test_append_lists_treat_nan_items_as_present() -> None:
    """Appending incoming's new items: a NaN already there is not appended again."""
    merged = DeepMergeStrategy(append_lists=True).merge({"l": [nan(), 1]}, {"l": [nan(), 2]})
    assert len(merged["l"]) == 3 and merged["l"][1:] == [1, 2]


def test_deep_merge_identity_key_merges_items_in_place_and_appends_new() -> None:
    """Same-id items merge in place in current's order, new ones append, others stay."""
    current = {"items": [{"id": 1, "qty": 1, "meta": {"a": 1}}, {"id": 2, "qty": 2}]}
    incoming = {"items": [{"id": 3, "qty": 3}, {"id": 1, "meta": {"b": 2}}]}

    merged = DeepMergeStrategy(list_identity_key="id").merge(current, incoming)

    assert merged == {
        "items": [
            {"id": 1, "qty": 1, "meta": {"a": 1, "b": 2}},
            {"id": 2, "qty": 2},
            {"id": 3, "qty": 3},
        ]
    }


def test_deep_merge_identity_key_pairs_repeated_ids_by_position() -> None:
    """Items sharing an id value pair up in order, so merging a list with itself is a no-op."""
    items = [{"id": 1, "v": "a"}, {"id": 1, "v": "b"}, {"id": 2, "v": "c"}]
    strategy = DeepMergeStrategy(list_identity_key="id")

    assert strategy.merge({"l": items}, {"l": copy.deepcopy(items)}) == {"l": items}
    merged = strategy.merge({"l": items}, {"l": [{"id": 1, "v": "A"}, {"id": 1, "v": "B"}]})
    assert merged == {"l": [{"id": 1, "v": "A"}, {"id": 1, "v": "B"}, {"id": 2, "v": "c"}]}


def test_deep_merge_identity_key_dedupes_items_without_identity() -> None:
    """In an identity-keyed list, items without the key are appended only if not present."""
    current = {"l": [{"id": 1}, "x", {"other": 1}]}
    incoming = {"l": ["x", {"other": 1}, {"other": 2}, {"id": [1]}]}

    merged = DeepMergeStrategy(list_identity_key="id").merge(current, incoming)

    assert merged == {"l": [{"id": 1}, "x", {"other": 1}, {"other": 2}, {"id": [1]}]}


def test_deep_merge_shares_unchanged_subtrees_and_returns_a_new_top_level() -> None:
    """Only changed paths are copied: untouched and equal subtrees are current's objects."""
    current: dict[str, Any] = {
        "same": {"deep": [1, 2]},
        "kept": {"k": 1},
        "changed": {"x": 1, "y": {"z": 1}},
    }
    incoming = {"same": {"deep": [1, 2]}, "changed": {"x": 2, "y": {"z": 1}}}

    merged = DeepMergeStrategy().merge(current, incoming)

    assert merged is not current
    assert merged["same"] is current["same"]
    assert merged["kept"] is current["kept"]
    assert merged["changed"] is not current["changed"]
    assert merged["changed"]["y"] is current["changed"]["y"]
    assert merged == {
        "same": {"deep": [1, 2]},
        "kept": {"k": 1},
        "changed": {"x": 2, "y": {"z": 1}},
    }


def test_deep_merge_of_equal_documents_returns_a_copy_sharing_everything() -> None:
    """Merging a state with an equal copy changes nothing and copies nothing below the top."""
    current = {"a": {"b": [1, {"c": 2}]}, "d": 1}

    merged = DeepMergeStrategy(list_identity_key="c").merge(current, copy.deepcopy(current))

    assert merged == current
    assert merged is not current
    assert merged["a"] is current["a"]


def test_million_item_list_appends_in_linear_time() -> None:
    """append_lists over a million items runs in linear time (seconds, not hours)."""
    n = 1_000_000
    current = {"xs": list(range(n))}
    incoming = {"xs": list(range(n // 2, n + n // 2))}

    start = time.perf_counter()
    merged = DeepMergeStrategy(append_lists=True).merge(current, incoming)
    elapsed = time.perf_counter() - start

    assert merged["xs"] == list(range(n + n // 2))
    assert len(current["xs"]) == n
    assert elapsed < 10


def test_million_item_list_of_dicts_appends_in_linear_time() -> None:
    """append_lists keys a quarter-million unhashable dict items without a quadratic scan."""
    n = 250_000
    current = {"xs": [{"v": i} for i in range(n)]}
    incoming = {"xs": [{"v": i} for i in range(n // 2, n + n // 2)]}

    start = time.perf_counter()
    merged = DeepMergeStrategy(append_lists=True).merge(current, incoming)
    elapsed = time.perf_counter() - start

    assert merged["xs"] == [{"v": i} for i in range(n + n // 2)]
    assert elapsed < 10


def test_million_item_identity_keyed_list_merges_in_linear_time() -> None:
    """A million identity-keyed items merge by id in seconds at most."""
    n = 1_000_000
    current = {"xs": [{"id": i, "v": 0} for i in range(n)]}
    incoming = {"xs": [{"id": i, "v": int(i % 100_000 == 0)} for i in range(n // 2, n + 10)]}

    start = time.perf_counter()
    merged = DeepMergeStrategy(list_identity_key="id").merge(current, incoming)
    elapsed = time.perf_counter() - start

    xs = merged["xs"]
    assert len(xs) == n + 10
    assert xs[0] is current["xs"][0]
    assert xs[600_000] == {"id": 600_000, "v": 1}
    assert xs[-1] == {"id": n + 9, "v": 0}
    assert elapsed < 10


def test_deep_nesting_inside_identity_keyed_lists() -> None:
    """Identity-keyed lists nested 2,000 deep merge item by item at every level."""

    def tree(depth: int, leaf: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"leaf": leaf}
        for _ in range(depth):
            doc = {"kids": [{"id": 1, **doc}]}
        return doc

    current, incoming = tree(2_000, "c"), tree(2_000, "i")
    incoming["kids"][0]["kids"].append({"id": 2})

    merged = DeepMergeStrategy(list_identity_key="id").merge(current, incoming)

    node, depth = merged, 0
    while "kids" in node:
        node, depth = node["kids"][0], depth + 1
    assert (depth, node["leaf"]) == (2_000, "i")
    assert merged["kids"][0]["kids"][1] == {"id": 2}


def plain(cur: dict[str, Any], inc: dict[str, Any]) -> dict[str, Any]:
    """The plain recursive merge: incoming wins, dicts merge, unchanged subtrees shared."""
    out = dict(cur)
    for k, v in inc.items():
        out[k] = plain(cur[k], v) if isinstance(v, dict) and isinstance(cur.get(k), dict) else v
    return out


@settings(max_examples=200, deadline=None)
@given(current=DOCS, data=st.data())
def test_property_deep_merge_is_the_plain_recursive_merge(
    current: dict[str, Any], data: st.DataObject
) -> None:
    """Without list options the deep merge is the plain recursive merge, sharing current's rest."""
    incoming = data.draw(DOCS | revised(current, VALUES))

    merged = DeepMergeStrategy().merge(current, incoming)

    assert merged == plain(current, incoming)
    assert all(merged[k] is current[k] for k in current if k not in incoming)
