"""A repository wrapper that injects the failures resilience is for, to test against.

Two kinds, drawn per `persist` from a seeded random source: a transient error before the
write (nothing written), and a timeout after the write committed (the caller cannot tell it
succeeded, retries, and must not apply the command twice).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Generic

from ._errors import ConfigurationError, TransientError
from ._repository import A, Repository


class FaultyRepository(Generic[A]):
    """Wraps a repository; `persist` sometimes fails before or after it commits."""

    def __init__(
        self,
        inner: Repository[A],
        *,
        transient_rate: float = 0.1,
        timeout_after_commit_rate: float = 0.0,
        seed: int | None = None,
    ) -> None:
        for name, rate in (
            ("transient_rate", transient_rate),
            ("timeout_after_commit_rate", timeout_after_commit_rate),
        ):
            if not 0 <= rate <= 1:
                raise ConfigurationError(f"{name} must be between 0 and 1, got {rate}")
        self.inner = inner
        self.transient_rate = transient_rate
        self.timeout_after_commit_rate = timeout_after_commit_rate
        self.random = random.Random(seed)
        self.injected_transient = 0
        self.injected_timeouts = 0

    async def retrieve(self, ids: Sequence[str], uow: Any = None) -> list[A]:
        return await self.inner.retrieve(ids, uow)

    async def retrieve_version(self, aggregate_id: str, version: int) -> A | None:
        return await self.inner.retrieve_version(aggregate_id, version)

    async def persist(self, aggregate: A, uow: Any = None, *, command_id: str | None = None) -> A:
        if self.random.random() < self.transient_rate:
            self.injected_transient += 1
            raise TransientError("injected: connection reset before the write")
        stored = await self.inner.persist(aggregate, uow, command_id=command_id)
        if self.random.random() < self.timeout_after_commit_rate:
            self.injected_timeouts += 1
            raise TimeoutError("injected: the write committed, then the reply timed out")
        return stored

    async def __aenter__(self) -> FaultyRepository[A]:
        """Opens the wrapped store (`async with FaultyRepository(store)`); faults stay on."""
        await self.inner.__aenter__()  # type: ignore[attr-defined]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.inner.__aexit__(*exc_info)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
