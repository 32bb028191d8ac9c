"""Tests for cqrs_resilience._merge_strategies: the deep, field-level and timestamp strategies."""

from __future__ import annotations

import contextlib
import copy
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings

from cqrs_resilience import (
    ConfigurationError,
    Conflict,
    DeepMergeStrategy,
    FieldLevelMergeStrategy,
    MergeConflictError,
    MergeStrategy,
    OnMergeConflict,
    ThreeWayMergeStrategy,
    TimestampLastWinsStrategy,
    three_way_merge,
)
from tests.merge_data import ALL_STRATEGIES, DOCS, bottom, cyclic, nan, nested

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


# ---------------------------------------------------------------------------------------------
# Every strategy


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


def test_strategies_compare_and_show_by_their_options() -> None:
    """Strategies with the same options are equal (and hash alike); repr shows the options."""
    assert FieldLevelMergeStrategy(["a"]) == FieldLevelMergeStrategy({"a"})
    assert hash(FieldLevelMergeStrategy(["a"])) == hash(FieldLevelMergeStrategy({"a"}))
    assert DeepMergeStrategy() != DeepMergeStrategy(append_lists=True)
    assert DeepMergeStrategy() != FieldLevelMergeStrategy()
    assert repr(TimestampLastWinsStrategy("ts", False)) == (
        "TimestampLastWinsStrategy(timestamp_field='ts', fallback_to_incoming=False)"
    )


def test_builtin_strategies_offer_three_way_merges() -> None:
    """Deep and field-level strategies satisfy ThreeWayMergeStrategy; timestamp does not."""
    assert isinstance(DeepMergeStrategy(), ThreeWayMergeStrategy)
    assert isinstance(FieldLevelMergeStrategy(), ThreeWayMergeStrategy)
    assert not isinstance(TimestampLastWinsStrategy(), ThreeWayMergeStrategy)


@pytest.mark.parametrize(
    "strategy",
    [DeepMergeStrategy(), FieldLevelMergeStrategy(), TimestampLastWinsStrategy()],
    ids=repr,
)
def test_deep_nesting_passes_through_every_strategy(strategy: MergeStrategy) -> None:
    """Every strategy returns a 5,000-deep state without a RecursionError."""
    merged = strategy.merge({"x": 1}, nested(5_000, 7))

    assert bottom(merged) == (5_000, {"leaf": 7})


@pytest.mark.parametrize("strategy", ALL_STRATEGIES[3:], ids=repr)
def test_shallow_strategies_take_values_whole_without_looking_inside(
    strategy: MergeStrategy,
) -> None:
    """Field-level and timestamp merges return incoming's values as they are, cyclic ones too."""
    doc = cyclic()

    assert strategy.merge({"a": 1}, {"a": doc, "modified_at": 1})["a"] is doc


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


def test_field_level_merge3_counts_nan_as_unchanged() -> None:
    """The field strategy's three-way merge sees an untouched NaN as untouched."""
    merged = FieldLevelMergeStrategy().merge3({"s": nan()}, {"s": nan()}, {"s": 3})
    assert merged == {"s": 3}


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
    """Run with a local time zone far from UTC, so "naive means local" would show. Where
    Python cannot move the zone (no `time.tzset`, as on Windows) the test runs in the
    machine's own zone, which checks the same rule there."""
    if not hasattr(time, "tzset"):
        yield
        return
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
