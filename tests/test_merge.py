"""Tests for cqrs_resilience._merge: merge strategies, three-way merge, the registry."""

from __future__ import annotations

import contextlib
import copy
import pickle
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from unittest import mock

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cqrs_resilience import (
    ConfigurationError,
    Conflict,
    ConflictConfig,
    ConflictResolutionPolicy,
    DeepMergeStrategy,
    FieldLevelMergeStrategy,
    IMergeStrategy,
    MergeConflictError,
    MergeStrategy,
    MergeStrategyRegistry,
    OnMergeConflict,
    ThreeWayMergeStrategy,
    TimestampLastWinsStrategy,
    UnknownStrategyError,
    _merge,
    three_way_merge,
)

# ---------------------------------------------------------------------------------------------
# helpers


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
    doc: dict[str, Any] = {"name": "x", "child": {"value": 1}}
    doc["child"]["parent"] = doc
    return doc


ALL_STRATEGIES: list[MergeStrategy] = [
    DeepMergeStrategy(),
    DeepMergeStrategy(append_lists=True),
    DeepMergeStrategy(list_identity_key="a"),
    FieldLevelMergeStrategy(),
    FieldLevelMergeStrategy(include_fields={"a", "b"}, exclude_fields={"b"}),
    TimestampLastWinsStrategy(),
]

# ---------------------------------------------------------------------------------------------
# The reference's examples


def test_reference_deep_merge_example() -> None:
    """DeepMergeStrategy gives exactly the reference's documented result."""
    strategy = DeepMergeStrategy(append_lists=True, list_identity_key="id")
    current = {"items": [{"id": 1, "qty": 2}], "status": "pending"}
    incoming = {"items": [{"id": 1, "qty": 3}], "notes": "Updated"}

    assert strategy.merge(current, incoming) == {
        "items": [{"id": 1, "qty": 3}],
        "status": "pending",
        "notes": "Updated",
    }


def test_reference_field_level_example() -> None:
    """FieldLevelMergeStrategy gives exactly the reference's documented result."""
    strategy = FieldLevelMergeStrategy(
        include_fields={"status", "notes"}, exclude_fields={"created_at"}
    )
    current = {"status": "pending", "notes": "Old", "created_at": "2024-01-01"}
    incoming = {"status": "shipped", "notes": "New", "created_at": "2024-01-02"}

    assert strategy.merge(current, incoming) == {
        "status": "shipped",
        "notes": "New",
        "created_at": "2024-01-01",
    }


def test_reference_timestamp_example() -> None:
    """TimestampLastWinsStrategy returns the later side, as the reference documents."""
    strategy = TimestampLastWinsStrategy(timestamp_field="modified_at", fallback_to_incoming=True)
    current = {"status": "pending", "modified_at": "2024-01-01T10:00:00Z"}
    incoming = {"status": "shipped", "modified_at": "2024-01-01T11:00:00Z"}

    assert strategy.merge(current, incoming) == {
        "status": "shipped",
        "modified_at": "2024-01-01T11:00:00Z",
    }


class CustomOrderMergeStrategy(IMergeStrategy):
    """Custom merge logic for orders (the reference's Example 4, verbatim)."""

    def merge(self, current: dict, incoming: dict) -> dict:  # type: ignore[type-arg]
        merged = current.copy()
        merged["created_at"] = current.get("created_at")
        current_items = {item["product_id"]: item for item in current.get("items", [])}
        for item in incoming.get("items", []):
            current_items[item["product_id"]] = item
        merged["items"] = list(current_items.values())
        merged["status"] = incoming.get("status", current.get("status"))
        return merged


def test_reference_example4_custom_strategy_from_registry() -> None:
    """A subclass of IMergeStrategy registers as a class and is built by the registry."""
    registry = MergeStrategyRegistry()
    registry.register("custom_order", CustomOrderMergeStrategy)
    config = ConflictConfig(policy=ConflictResolutionPolicy.MERGE, strategy_name="custom_order")

    strategy = registry.get(config.strategy_name, config)

    assert isinstance(strategy, CustomOrderMergeStrategy)
    assert isinstance(strategy, MergeStrategy)
    merged = strategy.merge(
        {"created_at": "d0", "status": "new", "items": [{"product_id": "p1", "qty": 1}]},
        {"created_at": "d1", "status": "paid", "items": [{"product_id": "p2", "qty": 2}]},
    )
    assert merged == {
        "created_at": "d0",
        "status": "paid",
        "items": [{"product_id": "p1", "qty": 1}, {"product_id": "p2", "qty": 2}],
    }


# ---------------------------------------------------------------------------------------------
# DeepMergeStrategy


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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"append_lists": "yes"}, "append_lists"),
        ({"list_identity_key": ""}, "list_identity_key"),
        ({"list_identity_key": 3}, "list_identity_key"),
    ],
)
def test_deep_merge_rejects_bad_options(kwargs: dict[str, Any], message: str) -> None:
    """Invalid DeepMergeStrategy options raise ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match=message):
        DeepMergeStrategy(**kwargs)


@pytest.mark.parametrize("strategy", ALL_STRATEGIES, ids=repr)
def test_every_strategy_rejects_a_state_that_is_not_a_dict(strategy: MergeStrategy) -> None:
    """A non-dict state raises TypeError naming the argument."""
    with pytest.raises(TypeError, match="incoming must be a dict"):
        strategy.merge({}, [])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# FieldLevelMergeStrategy


def test_field_level_takes_every_incoming_field_when_include_is_none() -> None:
    """With no include_fields every top-level field takes incoming's value whole."""
    merged = FieldLevelMergeStrategy().merge(
        {"a": {"x": 1, "y": 2}, "b": 1}, {"a": {"x": 3}, "c": 2}
    )

    assert merged == {"a": {"x": 3}, "b": 1, "c": 2}


def test_field_level_exclude_beats_include_and_disallowed_new_fields_are_not_added() -> None:
    """Exclude beats include, and a disallowed field only incoming has is not added."""
    strategy = FieldLevelMergeStrategy(include_fields=["a", "b"], exclude_fields=("b",))

    merged = strategy.merge({"a": 1, "b": 1, "c": 1}, {"a": 2, "b": 2, "c": 2, "d": 2})

    assert merged == {"a": 2, "b": 1, "c": 1}


def test_field_level_stores_frozensets_from_any_iterable() -> None:
    """include_fields and exclude_fields accept any iterable and are stored as frozensets."""
    strategy = FieldLevelMergeStrategy(include_fields=(f for f in "ab"), exclude_fields=["c"])

    assert strategy.include_fields == frozenset({"a", "b"})
    assert strategy.exclude_fields == frozenset({"c"})


@pytest.mark.parametrize("fields", ["status", [1], 5])
def test_field_level_rejects_a_bare_string_or_non_names(fields: Any) -> None:
    """A bare string (or non-string names) is a mistake, not a set of field names."""
    with pytest.raises(ConfigurationError, match="include_fields"):
        FieldLevelMergeStrategy(include_fields=fields)


def test_field_level_merge3_takes_only_allowed_incoming_changes() -> None:
    """merge3 lets only allowed fields take incoming's change or deletion."""
    strategy = FieldLevelMergeStrategy(exclude_fields={"locked"})
    base = {"status": "new", "locked": 1, "note": "n", "gone": 1, "mine": 1}
    current = {"status": "new", "locked": 1, "note": "n", "gone": 1, "mine": 2}
    incoming = {"status": "paid", "locked": 2, "note": "n", "mine": 1, "added": 3}

    merged = strategy.merge3(base, current, incoming)

    assert merged == {"status": "paid", "locked": 1, "note": "n", "mine": 2, "added": 3}


def test_field_level_merge3_reports_fields_both_sides_changed() -> None:
    """A field both sides changed differently is a conflict unless a preference settles it."""
    strategy = FieldLevelMergeStrategy()
    base, current, incoming = {"s": 1, "t": 1}, {"s": 2, "t": 1}, {"s": 3}

    with pytest.raises(MergeConflictError) as caught:
        strategy.merge3(base, current, incoming)

    assert caught.value.conflicts == [Conflict(("s",), 1, 2, 3)]
    prefer_incoming = OnMergeConflict.PREFER_INCOMING
    assert strategy.merge3(base, current, incoming, on_conflict=prefer_incoming) == {"s": 3}
    assert strategy.merge3(base, current, incoming, on_conflict="prefer_current") == {"s": 2}


# ---------------------------------------------------------------------------------------------
# TimestampLastWinsStrategy


def pick(current_ts: Any, incoming_ts: Any, *, fallback: bool = True) -> str:
    """Which side wins, as "current" or "incoming"."""
    strategy = TimestampLastWinsStrategy(fallback_to_incoming=fallback)
    current = {"side": "current", "modified_at": current_ts}
    incoming = {"side": "incoming", "modified_at": incoming_ts}
    return str(strategy.merge(current, incoming)["side"])


@pytest.mark.parametrize(
    ("current_ts", "incoming_ts", "winner"),
    [
        # the same instant written with Z and with +02:00: a tie, so the fallback decides
        ("2024-01-01T10:00:00Z", "2024-01-01T12:00:00+02:00", "incoming"),
        # looks later as text, but 11:30+02:00 is 09:30Z
        ("2024-01-01T10:00:00Z", "2024-01-01T11:30:00+02:00", "current"),
        ("2024-01-01T11:30:00+02:00", "2024-01-01T10:00:00Z", "incoming"),
        ("2024-01-01T10:00:00", "2024-01-01T10:00:01Z", "incoming"),  # naive is UTC
        ("2024-01-01T10:00:00.5Z", "2024-01-01T10:00:00.25Z", "current"),
        (datetime(2024, 1, 1, 10, tzinfo=UTC), datetime(2024, 1, 1, 9), "current"),
        (
            datetime(2024, 1, 1, 10, tzinfo=timezone(timedelta(hours=-5))),
            "2024-01-01T14:00:00Z",
            "current",
        ),
        (1_700_000_000, 1_700_000_000.5, "incoming"),
        (1_700_000_001, 1_700_000_000.5, "current"),
        (10**400, 10**400 + 1, "incoming"),  # ints compare exactly, however large
    ],
)
def test_timestamp_compares_the_instants_denoted(
    current_ts: Any, incoming_ts: Any, winner: str
) -> None:
    """Strings, datetimes and numbers compare by instant: Z and offsets, naive as UTC."""
    assert pick(current_ts, incoming_ts) == winner


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run with a local time zone far from UTC, so "naive means local" would show."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset is not available on this platform")
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")  # UTC+14
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("far_from_utc")
def test_timestamp_naive_values_are_utc_whatever_the_local_zone() -> None:
    """Naive strings and datetimes mean UTC, not the machine's local time."""
    assert pick("2024-01-01T10:00:00", "2024-01-01T10:00:00Z", fallback=False) == "current"
    assert pick(datetime(2024, 1, 1, 10), "2024-01-01T09:59:59Z") == "current"
    assert pick("2024-01-01T10:00:00", "2024-01-01T00:00:01-10:00") == "incoming"


@pytest.mark.parametrize(
    ("current_ts", "incoming_ts"),
    [
        ("2024-01-01T10:00:00Z", "2024-01-01T12:00:00+02:00"),
        (datetime(2024, 1, 1, 10), datetime(2024, 1, 1, 10, tzinfo=UTC)),
        (5, 5.0),
        (None, None),
        ("garbage", None),
    ],
)
def test_timestamp_ties_and_double_gaps_follow_the_fallback(
    current_ts: Any, incoming_ts: Any
) -> None:
    """Equal instants, or no usable timestamp on either side, follow fallback_to_incoming."""
    assert pick(current_ts, incoming_ts, fallback=True) == "incoming"
    assert pick(current_ts, incoming_ts, fallback=False) == "current"


@pytest.mark.parametrize(
    ("current_ts", "incoming_ts", "winner"),
    [
        (None, "2000-01-01T00:00:00Z", "incoming"),
        ("2000-01-01T00:00:00Z", None, "current"),
        ("not a date", 0, "incoming"),
        (True, "2000-01-01", "incoming"),
        (float("nan"), 1.0, "incoming"),
    ],
)
def test_timestamp_a_valid_timestamp_beats_a_missing_or_unreadable_one(
    current_ts: Any, incoming_ts: Any, winner: str
) -> None:
    """The side with a valid timestamp wins over one without, whatever the fallback."""
    assert pick(current_ts, incoming_ts, fallback=False) == winner
    assert pick(current_ts, incoming_ts, fallback=True) == winner


def test_timestamp_missing_field_counts_as_no_timestamp() -> None:
    """A state without the field loses to one that has it."""
    strategy = TimestampLastWinsStrategy(timestamp_field="ts", fallback_to_incoming=True)

    assert strategy.merge({"ts": 1, "s": "c"}, {"s": "i"}) == {"ts": 1, "s": "c"}


@pytest.mark.parametrize(
    ("current_ts", "incoming_ts"),
    [(1_700_000_000, "2024-01-01T10:00:00Z"), (datetime(2024, 1, 1, tzinfo=UTC), 5)],
)
def test_timestamp_number_against_date_time_raises(current_ts: Any, incoming_ts: Any) -> None:
    """Epoch seconds and date-times do not compare: ValueError naming the field."""
    with pytest.raises(ValueError, match="'modified_at'"):
        pick(current_ts, incoming_ts)


def test_timestamp_returns_a_shallow_copy_of_the_winner() -> None:
    """The winner comes back whole, as a new top-level dict sharing its values."""
    incoming = {"modified_at": 2, "nested": {"x": 1}}

    merged = TimestampLastWinsStrategy().merge({"modified_at": 1}, incoming)

    assert merged == incoming
    assert merged is not incoming
    assert merged["nested"] is incoming["nested"]


def test_timestamp_rejects_bad_options() -> None:
    """An empty field name or a non-bool fallback raises ConfigurationError."""
    with pytest.raises(ConfigurationError, match="timestamp_field"):
        TimestampLastWinsStrategy(timestamp_field="")
    with pytest.raises(ConfigurationError, match="fallback_to_incoming"):
        TimestampLastWinsStrategy(fallback_to_incoming=None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Registry


def test_strategies_compare_and_show_by_their_options() -> None:
    """Strategies with the same options are equal (and hash alike); repr shows the options."""
    assert FieldLevelMergeStrategy(["a"]) == FieldLevelMergeStrategy({"a"})
    assert hash(FieldLevelMergeStrategy(["a"])) == hash(FieldLevelMergeStrategy({"a"}))
    assert DeepMergeStrategy() != DeepMergeStrategy(append_lists=True)
    assert DeepMergeStrategy() != FieldLevelMergeStrategy()
    assert repr(TimestampLastWinsStrategy("ts", False)) == (
        "TimestampLastWinsStrategy(timestamp_field='ts', fallback_to_incoming=False)"
    )


def test_fresh_registry_knows_the_builtins() -> None:
    """A new registry lists and builds "deep", "field" and "timestamp" with defaults."""
    registry = MergeStrategyRegistry()

    assert registry.names() == ["deep", "field", "timestamp"]
    assert "deep" in registry
    assert "nope" not in registry
    assert registry.get("deep") == DeepMergeStrategy()
    assert registry.get("field") == FieldLevelMergeStrategy()
    assert registry.get("timestamp") == TimestampLastWinsStrategy()


def test_builtins_take_their_options_from_the_config() -> None:
    """Each built-in reads its options from the ConflictConfig given to get()."""
    registry = MergeStrategyRegistry()
    config = ConflictConfig(
        append_lists=True,
        list_identity_key="sku",
        include_fields=frozenset({"a", "b"}),
        exclude_fields=frozenset({"b"}),
        timestamp_field="ts",
        fallback_to_incoming=False,
    )

    assert registry.get("deep", config) == DeepMergeStrategy(True, "sku")
    assert registry.get("field", config) == FieldLevelMergeStrategy({"a", "b"}, {"b"})
    assert registry.get("timestamp", config) == TimestampLastWinsStrategy("ts", False)


def test_unknown_name_raises_an_error_listing_every_registered_name() -> None:
    """An unknown name raises UnknownStrategyError, a ConfigurationError, naming them all."""
    registry = MergeStrategyRegistry()
    registry.register("custom", DeepMergeStrategy)

    with pytest.raises(UnknownStrategyError) as caught:
        registry.get("missing")

    message = str(caught.value)
    assert isinstance(caught.value, ConfigurationError)
    assert isinstance(caught.value, ValueError)
    assert "'missing'" in message
    assert all(name in message for name in ("custom", "deep", "field", "timestamp"))
    assert caught.value.registered == ["custom", "deep", "field", "timestamp"]
    copied = pickle.loads(pickle.dumps(caught.value))
    assert str(copied) == message


def test_custom_factory_is_called_with_no_arguments_on_each_get() -> None:
    """A registered factory is called with no arguments, even when a config is given."""
    factory = mock.Mock(return_value=DeepMergeStrategy())
    registry = MergeStrategyRegistry()
    registry.register("mine", factory)

    registry.get("mine", ConflictConfig(append_lists=True))
    registry.get("mine")

    assert factory.call_args_list == [mock.call(), mock.call()]


def test_registering_again_replaces_even_a_builtin() -> None:
    """A name registered twice maps to the last factory; a registry's own "deep" wins."""
    registry = MergeStrategyRegistry()
    registry.register("x", FieldLevelMergeStrategy)
    registry.register("x", TimestampLastWinsStrategy)
    registry.register("deep", lambda: DeepMergeStrategy(append_lists=True))

    assert isinstance(registry.get("x"), TimestampLastWinsStrategy)
    assert registry.get("deep", ConflictConfig()) == DeepMergeStrategy(append_lists=True)
    assert MergeStrategyRegistry().get("deep") == DeepMergeStrategy()  # others unaffected
    assert registry.names() == ["deep", "field", "timestamp", "x"]


def test_register_validates_name_and_factory() -> None:
    """register needs a non-empty str name and a callable factory."""
    registry = MergeStrategyRegistry()

    with pytest.raises(ConfigurationError, match="name"):
        registry.register("", DeepMergeStrategy)
    with pytest.raises(ConfigurationError, match="name"):
        registry.register(3, DeepMergeStrategy)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        registry.register("x", DeepMergeStrategy())  # type: ignore[arg-type]


def test_get_rejects_a_factory_result_without_merge() -> None:
    """A factory that returns something without merge() is reported at get()."""
    registry = MergeStrategyRegistry()
    registry.register("bad", object)  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="'bad'"):
        registry.get("bad")


def test_builtin_strategies_offer_three_way_merges() -> None:
    """Deep and field-level strategies satisfy ThreeWayMergeStrategy; timestamp does not."""
    assert isinstance(DeepMergeStrategy(), ThreeWayMergeStrategy)
    assert isinstance(FieldLevelMergeStrategy(), ThreeWayMergeStrategy)
    assert not isinstance(TimestampLastWinsStrategy(), ThreeWayMergeStrategy)


# ---------------------------------------------------------------------------------------------
# Three-way merge


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


# ---------------------------------------------------------------------------------------------
# Hostile input


def test_deep_nesting_merges_without_recursion_error() -> None:
    """5,000 levels of nesting merge two-way and three-way."""
    merged = DeepMergeStrategy().merge(nested(5_000, 1), nested(5_000, 2) | {"top": 1})
    assert bottom(merged) == (5_000, {"leaf": 2})
    assert merged["top"] == 1

    merged = three_way_merge(nested(5_000, 0), nested(5_000, 0) | {"c": 1}, nested(5_000, 2))
    assert bottom(merged) == (5_000, {"leaf": 2})
    assert merged["c"] == 1


def test_deep_nesting_conflict_is_reported_with_its_full_path() -> None:
    """A conflict 5,000 levels down is reported with all 5,001 keys of its path."""
    with pytest.raises(MergeConflictError) as caught:
        three_way_merge(nested(5_000, 0), nested(5_000, 1), nested(5_000, 2))

    (conflict,) = caught.value.conflicts
    assert conflict.path == ("a",) * 5_000 + ("leaf",)
    assert (conflict.base, conflict.current, conflict.incoming) == (0, 1, 2)


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


@pytest.mark.parametrize(
    "strategy",
    [DeepMergeStrategy(), FieldLevelMergeStrategy(), TimestampLastWinsStrategy()],
    ids=repr,
)
def test_deep_nesting_passes_through_every_strategy(strategy: MergeStrategy) -> None:
    """Every strategy returns a 5,000-deep state without a RecursionError."""
    merged = strategy.merge({"x": 1}, nested(5_000, 7))

    assert bottom(merged) == (5_000, {"leaf": 7})


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


@pytest.mark.parametrize(
    ("make_args", "path"),
    [
        (lambda d: (d, d), "'child', 'parent'"),
        (lambda d: ({}, d), "'child', 'parent'"),
        (lambda d: (d, {"name": "y"}), "'child', 'parent'"),
        (lambda d: (d, {"child": {"value": 2}}), "'child', 'parent'"),
        (lambda d: ({"a": [1]}, {"a": [d]}), "'a', 0, 'child', 'parent'"),
    ],
)
def test_deep_merge_raises_value_error_naming_a_cycle(make_args: Any, path: str) -> None:
    """A cycle the result would contain raises ValueError naming where it closes."""
    with pytest.raises(ValueError, match=f"cycle at path \\({path}"):
        DeepMergeStrategy().merge(*make_args(cyclic()))


def test_dict_containing_itself_directly_raises() -> None:
    """The simplest cycle, a dict holding itself, raises ValueError naming the key."""
    doc: dict[str, Any] = {}
    doc["me"] = doc

    with pytest.raises(ValueError, match="'me'"):
        DeepMergeStrategy().merge({"x": 1}, doc)


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

    def loop(tag: int) -> dict[str, Any]:
        doc: dict[str, Any] = {"x": tag}
        doc["s"] = doc
        return doc

    with pytest.raises(ValueError, match="current contains a cycle at path \\('s',\\)"):
        DeepMergeStrategy().merge(loop(1), loop(2))
    with pytest.raises(ValueError, match="cycle"):
        three_way_merge(loop(0), loop(1), loop(2))


@pytest.mark.parametrize("strategy", ALL_STRATEGIES[3:], ids=repr)
def test_other_strategies_reject_cycles_too(strategy: MergeStrategy) -> None:
    """Field-level and timestamp merges raise ValueError for a cyclic result as well."""
    with pytest.raises(ValueError, match="cycle"):
        strategy.merge({"a": 1}, {"a": cyclic(), "modified_at": 1})


def test_three_way_rejects_a_cycle_in_its_result() -> None:
    """three_way_merge and FieldLevelMergeStrategy.merge3 raise ValueError for cycles."""
    doc = cyclic()

    with pytest.raises(ValueError, match="cycle"):
        three_way_merge({}, {}, {"new": doc})
    with pytest.raises(ValueError, match="cycle"):
        FieldLevelMergeStrategy().merge3({}, {}, {"new": doc})


def test_a_cycle_the_result_drops_is_not_an_error() -> None:
    """Replacing a cyclic value with a plain one merges normally."""
    assert DeepMergeStrategy().merge({"child": cyclic()}, {"child": 1}) == {"child": 1}


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


# ---------------------------------------------------------------------------------------------
# Properties

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


@settings(max_examples=60, deadline=None)
@given(doc=DOCS)
def test_property_merging_a_state_with_itself_changes_nothing(doc: dict[str, Any]) -> None:
    """Merging a state with a copy of itself changes nothing, with every strategy."""
    for strategy in [*ALL_STRATEGIES, DeepMergeStrategy(append_lists=True, list_identity_key="a")]:
        assert strategy.merge(doc, copy.deepcopy(doc)) == doc
    assert three_way_merge(doc, copy.deepcopy(doc), copy.deepcopy(doc)) == doc
    assert three_way_merge(doc, doc, doc, list_identity_key="id") == doc


@settings(max_examples=60, deadline=None)
@given(current=DOCS, incoming=DOCS, base=DOCS)
def test_property_inputs_are_never_mutated(
    current: dict[str, Any], incoming: dict[str, Any], base: dict[str, Any]
) -> None:
    """No merge changes its inputs, whether it succeeds or reports conflicts."""
    before = copy.deepcopy((base, current, incoming))
    for strategy in [*ALL_STRATEGIES, DeepMergeStrategy(append_lists=True, list_identity_key="a")]:
        with contextlib.suppress(ValueError):  # timestamps of mixed kinds
            strategy.merge(current, incoming)
    for key in (None, "a"):
        with contextlib.suppress(MergeConflictError):
            three_way_merge(base, current, incoming, list_identity_key=key)
    with contextlib.suppress(MergeConflictError):
        FieldLevelMergeStrategy(exclude_fields={"b"}).merge3(base, current, incoming)
    assert (base, current, incoming) == before


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
    with mock.patch.object(_merge, "_LIMITS", (1,)):
        shallow = [outcome(run) for run in runs]
    for a, b in zip(normal, shallow, strict=True):
        if isinstance(a, list) and a and isinstance(a[0], Conflict):
            assert sorted(map(repr, a)) == sorted(map(repr, b))
        else:
            assert a == b


@settings(max_examples=100, deadline=None)
@given(a=VALUES, b=VALUES)
def test_property_iterative_equality_agrees_with_python(a: Any, b: Any) -> None:
    """The depth-proof comparison used for very deep values agrees with ==."""
    canon = _merge._Canon()

    assert canon.equal(a, b) == (a == b)
    assert canon.equal(a, copy.deepcopy(a))


def test_registry_lookup_by_subscript() -> None:
    """registry[name] is get(name); an unknown name raises the same listing error."""
    registry = MergeStrategyRegistry()
    assert isinstance(registry["deep"], DeepMergeStrategy)
    with pytest.raises(UnknownStrategyError, match="deep, field, timestamp"):
        registry["nope"]


# --- NaN: a side that left a NaN alone did not change it ---------------------------------------


def nan() -> float:
    """A fresh NaN object each call, as decoding a stored state gives."""
    return float("nan")


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


def test_field_level_merge3_counts_nan_as_unchanged() -> None:
    """The field strategy's three-way merge sees an untouched NaN as untouched."""
    merged = FieldLevelMergeStrategy().merge3({"s": nan()}, {"s": nan()}, {"s": 3})
    assert merged == {"s": 3}


def test_keyed_list_items_with_nan_are_unchanged_items() -> None:
    """An item that holds a NaN and was not touched does not conflict with a change to it."""
    base = {"items": [{"id": 1, "w": nan(), "n": 0}]}
    current = {"items": [{"id": 1, "w": nan(), "n": 0}]}
    incoming = {"items": [{"id": 1, "w": nan(), "n": 5}]}
    merged = three_way_merge(base, current, incoming, list_identity_key="id")
    assert merged["items"][0]["n"] == 5


def test_append_lists_treat_nan_items_as_present() -> None:
    """Appending incoming's new items: a NaN already there is not appended again."""
    merged = DeepMergeStrategy(append_lists=True).merge({"l": [nan(), 1]}, {"l": [nan(), 2]})
    assert len(merged["l"]) == 3 and merged["l"][1:] == [1, 2]


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
    """If current is base (re-decoded, NaNs and all), incoming's changes all apply, whatever
    on_conflict says: nothing is dropped and nothing conflicts."""
    current = _fresh(base)
    for on_conflict in OnMergeConflict:
        merged = three_way_merge(base, current, incoming, on_conflict=on_conflict)
        assert msgspec.msgpack.encode(_fresh(merged), order="sorted") == msgspec.msgpack.encode(
            _fresh(incoming), order="sorted"
        )
