"""pipeline(): order, identity, decorator use, and introspection."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from cqrs_resilience import FixedRetryPolicy, Pipeline, pipeline, retry


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
    """A pipeline is a behaviour, so pipelines compose with pipelines."""
    log: list[str] = []

    async def handler() -> str:
        return "ok"

    inner = pipeline(tagging("b", log), tagging("c", log))
    assert await pipeline(tagging("a", log), inner)(handler)() == "ok"
    assert log == ["a>", "b>", "c>", "<c", "<b", "<a"]


def test_repr_names_the_behaviours() -> None:
    """A pipeline reads as what it is."""
    composed = pipeline(retry(FixedRetryPolicy(max_retries=1)), tagging("audit", []))
    assert repr(composed).startswith("pipeline(retry(FixedRetryPolicy(max_retries=1")
    assert repr(composed).endswith("audit)")
    assert isinstance(composed, Pipeline)
    assert composed.__name__ == repr(composed)


def test_non_callables_are_rejected() -> None:
    """Passing something that is not a behaviour fails at composition, naming its position."""
    with pytest.raises(TypeError, match="argument 2"):
        pipeline(retry(), "retry")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable handler"):
        pipeline(retry())(None)  # type: ignore[arg-type]
