"""`pipeline()`: compose behaviors, first listed outermost; and what every behavior needs to
know about the functions it wraps.

A behavior wraps async and sync functions alike and picks its wrapper when decorating, by
`is_async`. Some callables return an awaitable without saying so: a lambda around an async
function, a plain decorator that calls one. Their kind shows only in what a call returns, so
a sync wrapper checks each result (one set lookup, `returns_awaitable`) and, on an awaitable,
runs that call the async way (nothing of it ran yet: an unawaited coroutine has not started)
and every later call too. `timeout()` and `resolve_conflicts()` wrap async functions only:
`async_only` takes what may return an awaitable and refuses, when decorating, what cannot.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import types
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar, ParamSpec, TypeAlias, TypeVar, overload

P = ParamSpec("P")
T = TypeVar("T")

Behavior: TypeAlias = Callable[[Callable[..., Any]], Callable[..., Any]]
"""A behavior takes a handler and returns one that does more around it."""

# What `asyncio.iscoroutinefunction` recognizes, and asgiref's `markcoroutinefunction` sets
# before Python 3.12 (3.12's own mark is seen by `inspect.iscoroutinefunction`).
_LEGACY_MARK = getattr(asyncio.coroutines, "_is_coroutine", None)


def is_async(fn: Callable[..., Any]) -> bool:
    """Whether `fn` is declared async, so calling it gives a coroutine: an async function, one
    marked by `inspect.markcoroutinefunction`, an object whose `__call__` is one, and any of
    these through `functools.partial` and bound methods. Behaviors pick their async or sync
    wrapper by it.

    A `__wrapped__` chain is not followed here: a sync function that wraps an async one may
    run it to completion (`asyncio.run` in a CLI, asgiref's `async_to_sync`), and the sync
    wrappers see at the first call whether it returned an awaitable instead."""
    target: Any = fn
    while True:
        if inspect.iscoroutinefunction(target):
            return True
        if _LEGACY_MARK is not None and getattr(target, "_is_coroutine", None) is _LEGACY_MARK:
            return True
        if isinstance(target, functools.partial):
            target = target.func
        elif isinstance(target, types.MethodType):
            target = target.__func__
        else:
            break
    if isinstance(target, types.FunctionType | types.BuiltinFunctionType | type):
        return False
    call = getattr(type(target), "__call__", None)  # noqa: B004 - a callable object's method
    return call is not None and call is not target and is_async(call)


NOT_AWAITABLE: set[type] = set()
"""Types whose instances are never awaitable, learned from what calls return: the sync
wrappers read it inline, `type(result) not in NOT_AWAITABLE and returns_awaitable(result)`,
so a sync call pays one set lookup for the check."""


def returns_awaitable(result: object) -> bool:
    """Whether a call's `result` is awaitable (a coroutine, a Future, anything with
    `__await__`), learning the types that are not."""
    if inspect.isawaitable(result):
        return True
    kind = type(result)
    if kind is not types.GeneratorType:  # a generator may be awaitable or not, each its own
        if len(NOT_AWAITABLE) > 10_000:  # types made on the fly must not grow this forever
            NOT_AWAITABLE.clear()
        NOT_AWAITABLE.add(kind)
    return False


def name_of(fn: Callable[..., Any]) -> str:
    """How an error names a function: `Class.method`, `function`, else its repr."""
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else repr(fn)


def _may_return_awaitable(fn: Callable[..., Any]) -> bool:
    """Whether `fn` is async or may be, though it is not declared so: a lambda (its one
    expression may call an async function), or a function whose `__wrapped__` chain (a
    decorator that kept the metadata with `functools.wraps`) leads to either."""
    target: Any = fn
    for _ in range(100):  # a chain that loops is no async function
        if is_async(target):
            return True
        while isinstance(target, functools.partial):
            target = target.func
        if isinstance(target, types.MethodType):
            target = target.__func__
        if isinstance(target, types.FunctionType) and target.__code__.co_name == "<lambda>":
            return True
        target = getattr(target, "__wrapped__", None)
        if target is None:
            return False
    return False


def async_only(fn: Callable[P, Any], called: str) -> Callable[P, Awaitable[Any]]:
    """`fn` as the async function a behavior that wraps only those (`called`) can await, or
    a `TypeError` naming it, raised now, before anything ran.

    An async function is taken as it is. A lambda, or a function whose `__wrapped__` chain
    leads to an async function or a lambda, may return an awaitable without being declared
    async: it is taken, and each call's result is checked before anything awaits it. One that
    is no awaitable is a `TypeError` naming the function; such a call ran synchronously, so
    its effects happened. Any other callable is a sync function, whose calls would run before
    anything could check them: refused.
    """
    if is_async(fn):
        return fn
    if not _may_return_awaitable(fn):
        raise TypeError(
            f"{called} wraps async functions only, and {name_of(fn)} is a sync function (a "
            "call would run it before anything could await it). Declare it `async def`."
        )

    @functools.wraps(fn)
    async def awaiting(*args: P.args, **kwargs: P.kwargs) -> Any:
        result = fn(*args, **kwargs)
        if not inspect.isawaitable(result):
            raise TypeError(
                f"{called} wraps async functions only, and {name_of(fn)} returned "
                f"{type(result).__name__}, not an awaitable: it ran as a sync function. "
                "Declare it `async def`, or have it return the coroutine of one."
            )
        return await result

    return awaiting


def _describe(behavior: Behavior) -> str:
    if isinstance(behavior, types.FunctionType | types.MethodType):
        return behavior.__name__
    return repr(behavior)


class Pipeline:
    """Behaviors composed into one: `Pipeline(a, b)(h)` is `a(b(h))`."""

    __slots__ = ("behaviors",)

    def __init__(self, *behaviors: Behavior) -> None:
        for position, behavior in enumerate(behaviors, 1):
            if not callable(behavior):
                raise TypeError(
                    f"pipeline() takes behaviors (callables); argument {position} is {behavior!r}"
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
    """Compose behaviors; `pipeline(a, b, c)(h)` is `a(b(c(h)))`, `pipeline()` the identity.

    The result is itself a behavior and a decorator.
    """
    return Pipeline(*behaviors)


class BehaviorBase:
    """What every behavior that wraps sync and async functions alike shares: its typing (an
    async function stays a coroutine function, so `asyncio.run(decorated())` type-checks; a
    sync one keeps its signature), refusing what is not callable, and picking the async or
    sync wrapper. Subclasses implement `_wrap_async` and `_wrap_sync` and name themselves in
    `called`. A sync wrapper whose call returned an awaitable runs that call the async way and
    hands every later call to `_wrap_async(fn)` (see the module docstring)."""

    __slots__ = ()
    called: ClassVar[str]  # how users call it: "retry()"

    @overload
    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]: ...
    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        if not callable(fn):
            raise TypeError(f"{self.called} wraps a callable, got {fn!r}")
        return self._wrap(fn)

    def _wrap(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        return self._wrap_async(fn) if is_async(fn) else self._wrap_sync(fn)

    def _wrap_async(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        raise NotImplementedError

    def _wrap_sync(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        raise NotImplementedError
