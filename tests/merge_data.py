"""States for the merge tests: deep and cyclic ones, and hypothesis strategies for documents."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

from cqrs_resilience import (
    DeepMergeStrategy,
    FieldLevelMergeStrategy,
    MergeStrategy,
    TimestampLastWinsStrategy,
)


def nested(depth: int, leaf: Any) -> dict[str, Any]:
    """{"a": {"a": ... {"leaf": leaf}}} with `depth` levels of "a"."""
    doc: dict[str, Any] = {"leaf": leaf}
    for _ in range(depth):
        doc = {"a": doc}
    return doc


def bottom(doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """How many "a" levels `doc` has, and the dict at the bottom (no recursion)."""
    depth = 0
    while "a" in doc:
        doc, depth = doc["a"], depth + 1
    return depth, doc


def cyclic() -> dict[str, Any]:
    """{"name": "x", "child": {"value": 1, "parent": <itself>}}."""
    doc: dict[str, Any] = {"name": "x", "child": {"value": 1}}
    doc["child"]["parent"] = doc
    return doc


def nan() -> float:
    """A fresh NaN object each call, as decoding a stored state gives."""
    return float("nan")


ALL_STRATEGIES: list[MergeStrategy] = [
    DeepMergeStrategy(),
    DeepMergeStrategy(append_lists=True),
    DeepMergeStrategy(list_identity_key="a"),
    FieldLevelMergeStrategy(),
    FieldLevelMergeStrategy(include_fields={"a", "b"}, exclude_fields={"b"}),
    TimestampLastWinsStrategy(),
]

KEYS = st.sampled_from(["a", "b", "c", "id", "modified_at"])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text("xyz", max_size=2)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=12,
)
DOCS = st.dictionaries(KEYS, VALUES, max_size=5)
"""Documents of scalars, lists and dicts; no NaN."""

TREES = st.recursive(SCALARS, lambda inner: st.dictionaries(KEYS, inner, max_size=3), max_leaves=10)
TREE_DOCS = st.dictionaries(KEYS, TREES, max_size=5)
"""Documents of scalars and dicts only: no lists, no NaN."""


@st.composite
def revised(draw: st.DrawFn, doc: dict[str, Any], values: st.SearchStrategy[Any] = TREES) -> Any:
    """A separately built version of `doc`: each key kept, deleted, replaced with one of
    `values` or (a dict) edited the same way below; sometimes a key added."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        action = draw(st.sampled_from(["keep", "keep", "delete", "replace", "edit"]))
        if action == "keep":
            out[key] = copy.deepcopy(value)
        elif action == "replace":
            out[key] = draw(values)
        elif action == "edit":
            out[key] = draw(revised(value, values)) if isinstance(value, dict) else draw(values)
    for key, value in draw(st.dictionaries(KEYS, values, max_size=1)).items():
        out.setdefault(key, value)
    return out
