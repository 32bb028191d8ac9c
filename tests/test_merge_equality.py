"""Tests for cqrs_resilience._merge_equality: == at any depth, list-item keys, NaN rules."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings

from cqrs_resilience._merge_equality import Canon, CycleFound, Equality, equal_but_nan
from tests.merge_data import VALUES, cyclic, nan, nested


@settings(max_examples=100, deadline=None)
@given(a=VALUES, b=VALUES)
def test_property_iterative_equality_agrees_with_python(a: Any, b: Any) -> None:
    """The depth-proof comparison used for very deep values agrees with ==."""
    canon = Canon()

    assert canon.equal(a, b) == (a == b)
    assert canon.equal(a, copy.deepcopy(a))


def test_values_deeper_than_the_recursion_limit_compare() -> None:
    """Values nested 5,000 deep compare equal or different, NaN leaves included."""
    one, other_one, two = nested(5_000, 1), nested(5_000, 1), nested(5_000, 2)
    equality = Equality()  # numbers values by id: one per merge, whose values stay alive

    assert equality.same(one, other_one)
    assert not equality.same(one, two)
    assert Equality().same_nan(nested(5_000, nan()), nested(5_000, nan()))


def test_same_takes_nan_as_nan_for_floats_and_same_nan_inside_containers_too() -> None:
    """same: NaN equals NaN as a bare float only; same_nan: inside lists and dicts as well."""
    equality = Equality()

    assert equality.same(nan(), nan())
    assert not equality.same([nan()], [nan()])
    assert equality.same_nan([1, {"a": nan()}], [1, {"a": nan()}])
    assert not equality.same_nan([1, {"a": nan()}], [2, {"a": nan()}])


def test_equal_but_nan_walks_what_msgpack_cannot_encode() -> None:
    """Unsortable keys, types msgpack lacks and cycles are walked, NaN equal to NaN, no looping."""
    thing = object()

    assert equal_but_nan({1: nan(), "a": [thing]}, {1: nan(), "a": [thing]})
    assert not equal_but_nan({1: nan(), "a": [thing]}, {1: nan(), "a": [object()]})
    assert equal_but_nan(cyclic(), cyclic())


def test_list_items_key_alike_exactly_when_they_are_duplicates() -> None:
    """item_key: NaNs key alike, dicts alike up to key order, bytes never like a str."""
    equality = Equality()

    assert equality.item_key(nan()) == equality.item_key(nan())
    assert equality.item_key({"a": 1, "b": [2]}) == equality.item_key({"b": [2], "a": 1})
    assert equality.item_key({1: "a", "b": 2}) == equality.item_key({"b": 2, 1: "a"})
    assert equality.item_key({"a": 1}) != equality.item_key({"a": 2})
    assert equality.item_key(b"x") != equality.item_key("x")


def test_numbering_a_value_that_contains_itself_raises_cycle_found() -> None:
    """Canon stops at a cycle instead of looping."""
    with pytest.raises(CycleFound):
        Canon().number(cyclic())
