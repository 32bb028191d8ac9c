"""What every durable store shares: `async with store:` opens it and closes it."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self


class StoreLifecycle:
    """`async with` support for stores that define `open()` and `close()`."""

    namespace: str

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        where: Any = getattr(self, "target", None) or getattr(self, "path", None)
        kind = getattr(self, "aggregate_type", type(None)).__name__
        return f"{type(self).__name__}({where!r}, {kind}, namespace={self.namespace!r})"
