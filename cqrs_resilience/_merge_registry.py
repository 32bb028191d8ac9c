"""`MergeStrategyRegistry`: merge strategies by name, so a config can name the one it needs.

The built-ins read their options from the config by attribute name, so this module does not
depend on `ConflictConfig` (which sits below the merge code and imports `OnMergeConflict`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final, TypeAlias

from ._errors import ConfigurationError
from ._merge_strategies import (
    DeepMergeStrategy,
    FieldLevelMergeStrategy,
    MergeStrategy,
    TimestampLastWinsStrategy,
)

StrategyFactory: TypeAlias = Callable[[], MergeStrategy]
"""A strategy class, or any callable taking no arguments that returns a strategy."""

_Builtin: TypeAlias = (
    type[DeepMergeStrategy] | type[FieldLevelMergeStrategy] | type[TimestampLastWinsStrategy]
)
_BUILTINS: Final[dict[str, _Builtin]] = {
    "deep": DeepMergeStrategy,
    "field": FieldLevelMergeStrategy,
    "timestamp": TimestampLastWinsStrategy,
}


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


class MergeStrategyRegistry:
    """Merge strategies by name, so a ConflictConfig can name the one a command needs.

    Every registry knows the built-ins "deep", "field" and "timestamp", which take their
    options from the config passed to `get`. Registered factories are called with no
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

    def get(self, name: str, config: object = None) -> MergeStrategy:
        """The strategy registered as `name`. A built-in takes each option from the attribute
        of `config` with the option's name (a `ConflictConfig` has them all), and its default
        where `config` has none."""
        factory = self._factories.get(name) if isinstance(name, str) else None
        if isinstance(name, str) and factory is None and name in _BUILTINS:
            builtin = _BUILTINS[name]
            names = builtin.option_names
            return builtin(**{key: getattr(config, key) for key in names if hasattr(config, key)})
        if factory is None:
            raise UnknownStrategyError(name, self.names())
        strategy = factory()
        # What isinstance(strategy, MergeStrategy) checks, without its cost (tens of µs).
        if not callable(getattr(strategy, "merge", None)):
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
