"""pipeline(): order, identity, decorator use, and introspection."""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from cqrs_resilience import (
    FakeClock,
    FixedRetryPolicy,
    Pipeline,
    circuit_breaker,
    inject_faults,
    pipeline,
    retry,
)


def tagging(name: str, log: list[str]) -> Callable[[Any], Any]:
    def behavior(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            log.append(f"{name}>")
            result = await handler(*args, **kwargs)
            log.append(f"<{name}")
            return result

        return wrapped

    behavior.__name__ = name
    return behavior


async def test_first_listed_is_outermost() -> None:
    """pipeline(a, b, c)(h) is a(b(c(h))): a runs first and finishes last."""
    log: list[str] = []

    async def handler(x: int) -> int:
        log.append("h")
        return x

    composed = pipeline(tagging("a", log), tagging("b", log), tagging("c", log))(handler)
    assert await composed(7) == 7
    assert log == ["a>", "b>", "c>", "h", "<c", "<b", "<a"]


def test_empty_pipeline_is_the_identity() -> None:
    """pipeline() returns the handler itself."""

    async def handler() -> None: ...

    assert pipeline()(handler) is handler


async def test_pipeline_works_as_a_decorator_and_keeps_the_signature() -> None:
    """@pipeline(...) keeps name, docstring and signature of the decorated function."""

    @pipeline(retry(FixedRetryPolicy()), retry())
    async def place_order(order_id: str, *, quantity: int = 1) -> str:
        """Place an order."""
        return f"{order_id}x{quantity}"

    assert await place_order("o1", quantity=2) == "o1x2"
    assert place_order.__name__ == "place_order"
    assert place_order.__doc__ == "Place an order."
    assert str(inspect.signature(place_order)) == (
        "(order_id: 'str', *, quantity: 'int' = 1) -> 'str'"
    )


async def test_pipelines_nest() -> None:
    """A pipeline is a behavior, so pipelines compose with pipelines."""
    log: list[str] = []

    async def handler() -> str:
        return "ok"

    inner = pipeline(tagging("b", log), tagging("c", log))
    assert await pipeline(tagging("a", log), inner)(handler)() == "ok"
    assert log == ["a>", "b>", "c>", "<c", "<b", "<a"]


def test_repr_names_the_behaviors() -> None:
    """A pipeline reads as what it is."""
    composed = pipeline(retry(FixedRetryPolicy(max_retries=1)), tagging("audit", []))
    assert repr(composed).startswith("pipeline(retry(FixedRetryPolicy(max_retries=1")
    assert repr(composed).endswith("audit)")
    assert isinstance(composed, Pipeline)
    assert composed.__name__ == repr(composed)


def test_non_callables_are_rejected() -> None:
    """Passing something that is not a behavior fails at composition, naming its position."""
    with pytest.raises(TypeError, match="argument 2"):
        pipeline(retry(), "retry")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable handler"):
        pipeline(retry())(None)  # type: ignore[arg-type]


class AsyncCallable:
    """An object whose `__call__` is async."""

    async def __call__(self, x: int) -> int:
        return x

    async def method(self, x: int) -> int:
        return x


def marked_legacy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What asgiref's `markcoroutinefunction` does before Python 3.12."""
    fn._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
    return fn


def returns_coroutine(x: int) -> Awaitable[int]:
    return AsyncCallable()(x)


ASYNC_IN_DISGUISE = {
    "partial of an async method": functools.partial(AsyncCallable().method),
    "partial of an async callable object": functools.partial(AsyncCallable()),
    "function marked as a coroutine function": marked_legacy(returns_coroutine),
}
if sys.version_info >= (3, 12):
    ASYNC_IN_DISGUISE["inspect.markcoroutinefunction"] = inspect.markcoroutinefunction(  # type: ignore[attr-defined,unused-ignore]
        lambda x: AsyncCallable()(x)
    )


@pytest.mark.parametrize("fn", ASYNC_IN_DISGUISE.values(), ids=ASYNC_IN_DISGUISE.keys())
@pytest.mark.parametrize(
    "behavior",
    [retry(), circuit_breaker(), inject_faults(0.0, latency_s=0.5, clock=FakeClock())],
    ids=["retry", "circuit_breaker", "inject_faults"],
)
async def test_callables_declared_async_get_the_async_wrapper(
    fn: Callable[[int], Awaitable[int]], behavior: Any
) -> None:
    """A partial of an async method or callable object, or a function marked as a coroutine
    function, is wrapped as the async function it is."""
    wrapped = behavior(fn)
    assert inspect.iscoroutinefunction(wrapped)
    assert await wrapped(7) == 7


def test_a_sync_wrapper_that_runs_an_async_function_stays_sync() -> None:
    """A sync function that runs an async one to completion (`functools.wraps` pointing at it,
    as a CLI's `asyncio.run` wrapper does) is still wrapped as the sync function it is."""

    async def fetch(x: int) -> int:
        return x

    @functools.wraps(fetch)
    def fetch_now(x: int) -> int:
        return asyncio.run(fetch(x))

    for behavior in (retry(), circuit_breaker(), inject_faults(0.01, seed=1)):
        assert behavior(fetch_now)(3) == 3
