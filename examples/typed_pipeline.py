"""Decorated functions keep their types: `mypy --strict` checks this file in CI.

Every behaviour maps an async function to an async function with the same parameters and
result (`asyncio.run` accepts it) and a sync function to a sync one, so wrapping a function in
place changes nothing a type checker sees.
"""

from __future__ import annotations

import asyncio

from cqrs_resilience import (
    FixedRetryPolicy,
    RetryBudget,
    circuit_breaker,
    inject_faults,
    pipeline,
    retry,
    timeout,
)

NO_WAIT = FixedRetryPolicy(max_retries=2, delay_ms=0, jitter=False)


@pipeline(
    timeout(5.0),
    retry(NO_WAIT, budget=RetryBudget()),
    circuit_breaker(),
    inject_faults(0.0),
)
async def price(sku: str, quantity: int = 1) -> float:
    """The price of `quantity` items."""
    return 9.5 * quantity


@retry(NO_WAIT)
async def in_stock(sku: str) -> int:
    return 3


@retry(NO_WAIT, on=ConnectionError)
def legacy_price(sku: str) -> float:
    return 9.5


def main() -> None:
    count: int = asyncio.run(in_stock("book"))
    total: float = asyncio.run(price("book", quantity=count - 1)) + legacy_price("book")
    print(f"{price.__name__}{price.__doc__ and ':'} {price.__doc__} -> total {total}")


if __name__ == "__main__":
    main()
