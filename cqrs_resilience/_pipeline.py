"""`pipeline()`: compose behaviours, first listed outermost."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, ParamSpec, TypeAlias, TypeVar, overload

P = ParamSpec("P")
T = TypeVar("T")

Behavior: TypeAlias = Callable[[Callable[..., Any]], Callable[..., Any]]
"""A behaviour takes a handler and returns one that does more around it."""


def is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling `fn` gives a coroutine: an async function, or an object whose
    `__call__` is one. Behaviours pick their async or sync wrapper by it."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    )


def _describe(behavior: Behavior) -> str:
    if isinstance(behavior, types.FunctionType | types.MethodType):
        return behavior.__name__
    return repr(behavior)


class Pipeline:
    """Behaviours composed into one: `Pipeline(a, b)(h)` is `a(b(h))`."""

    __slots__ = ("behaviors",)

    def __init__(self, *behaviors: Behavior) -> None:
        for position, behavior in enumerate(behaviors, 1):
            if not callable(behavior):
                raise TypeError(
                    f"pipeline() takes behaviours (callables); argument {position} is {behavior!r}"
                )
        self.behaviors = behaviors

    def __call__(self, handler: Callable[P, T]) -> Callable[P, T]:
        if not callable(handler):
            raise TypeError(f"a pipeline wraps a callable handler, got {handler!r}")
        wrapped: Callable[..., Any] = handler
        for behavior in reversed(self.behaviors):
            wrapped = behavior(wrapped)
        return wrapped

    @property
    def __name__(self) -> str:
        return repr(self)

    def __repr__(self) -> str:
        return f"pipeline({', '.join(map(_describe, self.behaviors))})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.behaviors == other.behaviors

    def __hash__(self) -> int:
        return hash(self.behaviors)


def pipeline(*behaviors: Behavior) -> Pipeline:
    """Compose behaviours; `pipeline(a, b, c)(h)` is `a(b(c(h)))`, `pipeline()` the identity.

    The result is itself a behaviour and a decorator.
    """
    return Pipeline(*behaviors)


class Behaviour:
    """What every behaviour that wraps sync and async functions alike shares: its typing (an
    async function stays a coroutine function, so `asyncio.run(decorated())` type-checks; a
    sync one keeps its signature) and refusing what is not callable. Subclasses implement
    `_wrap` and name themselves in `called`."""

    __slots__ = ()
    called: ClassVar[str]  # how users call it: "retry()"

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...
    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        if not callable(fn):
            raise TypeError(f"{self.called} wraps a callable, got {fn!r}")
        return self._wrap(fn)

    def _wrap(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        raise NotImplementedError
