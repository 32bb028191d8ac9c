"""Tests for cqrs_resilience._merge_registry: merge strategies by name."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

import cqrs_resilience
from cqrs_resilience import (
    ConfigurationError,
    ConflictConfig,
    ConflictResolutionPolicy,
    DeepMergeStrategy,
    FieldLevelMergeStrategy,
    IMergeStrategy,
    MergeStrategy,
    MergeStrategyRegistry,
    TimestampLastWinsStrategy,
    UnknownStrategyError,
)


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


def test_builtins_read_options_from_any_object_and_default_the_rest() -> None:
    """get() reads a built-in's options by attribute name; those the object lacks default."""
    registry = MergeStrategyRegistry()
    options = SimpleNamespace(list_identity_key="sku", timestamp_field="ts")

    assert registry.get("deep", options) == DeepMergeStrategy(list_identity_key="sku")
    assert registry.get("field", options) == FieldLevelMergeStrategy()
    assert registry.get("timestamp", options) == TimestampLastWinsStrategy("ts")


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


def test_registry_lookup_by_subscript() -> None:
    """registry[name] is get(name); an unknown name raises the same listing error."""
    registry = MergeStrategyRegistry()
    assert isinstance(registry["deep"], DeepMergeStrategy)
    with pytest.raises(UnknownStrategyError, match="deep, field, timestamp"):
        registry["nope"]


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


def test_no_merge_module_imports_the_conflict_config() -> None:
    """The merge code sits below ConflictConfig: no _merge_* module imports _conflict_config."""
    package = Path(cqrs_resilience.__file__).parent
    for path in sorted(package.glob("_merge_*.py")):
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "_conflict_config" not in imported, path.name
