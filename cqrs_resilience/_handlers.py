"""Handler classes: a `process()` method wrapped in a pipeline of behaviours.

The classes hold no resilience logic of their own. Each mixin contributes one behaviour
(`retry`, `resolve_conflicts`) built from the same functions users decorate with, wired to
the handler's settings and methods; `handle()` runs the composed pipeline.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from ._idempotency import current_command_id
from ._messages import CommandResponse
from ._pipeline import Behavior, pipeline
from ._policies import RetryPolicy
from ._retry import RetryOn, retry

if TYPE_CHECKING:
    from ._clock import Clock
    from ._hooks import HookRegistry

R = TypeVar("R")

Handle = Callable[[Any], Awaitable[CommandResponse[R]]]


class PipelinedCommandHandler(ABC, Generic[R]):
    """Base handler: implement `process`; `handle` runs it inside the behaviours.

    Behaviours apply last-added outermost. `strategy_registry`, `hooks` and `clock` reach
    the built-in behaviours; `dispatcher` is yours (a repository, a unit of work, ...).
    """

    def __init__(
        self,
        dispatcher: Any = None,
        *,
        strategy_registry: Any = None,
        hooks: HookRegistry | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.strategy_registry = strategy_registry
        self.hooks = hooks
        self.clock = clock
        self._behaviors: list[Behavior] = []
        self._pipeline: Handle[R] | None = None
        for behavior in self.default_behaviors():
            self.add_behavior(behavior)

    @abstractmethod
    async def process(self, command: Any) -> CommandResponse[R]:
        """The business logic for one command."""

    def default_behaviors(self) -> list[Behavior]:
        """The behaviours this class installs, innermost first; mixins extend the list."""
        return []

    def add_behavior(self, behavior: Behavior) -> None:
        """Wrap the pipeline in one more behaviour (it becomes the outermost)."""
        if not callable(behavior):
            raise TypeError(f"a behaviour is a callable taking a handler, got {behavior!r}")
        self._behaviors.append(behavior)
        self._pipeline = None

    @property
    def behaviors(self) -> tuple[Behavior, ...]:
        """The installed behaviours, in the order added."""
        return tuple(self._behaviors)

    def get_pipeline(self) -> Handle[R]:
        """`process` wrapped in every behaviour; rebuilt only after `add_behavior`."""
        if self._pipeline is None:
            self._pipeline = pipeline(*reversed(self._behaviors))(self.process)
        return self._pipeline

    async def handle(self, command: Any) -> CommandResponse[R]:
        """Process `command` through the pipeline; what `process` raises propagates as is."""
        token = current_command_id.set(getattr(command, "command_id", None))
        try:
            return await self.get_pipeline()(command)
        finally:
            current_command_id.reset(token)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({pipeline(*reversed(self._behaviors))!r})"


class RetryBehaviorMixin(PipelinedCommandHandler[R]):
    """Adds `retry` around the handler: transient failures are retried with backoff.

    The command's own `retry_policy` (`Retryable`) wins over the class's `retry_policy`.
    """

    retry_policy: ClassVar[RetryPolicy | None] = None
    retry_on: ClassVar[RetryOn | None] = None

    def default_behaviors(self) -> list[Behavior]:
        behavior = retry(self.retry_policy, on=self.retry_on, hooks=self.hooks, clock=self.clock)
        return [*super().default_behaviors(), behavior]


class RetryableCommandHandler(RetryBehaviorMixin[R]):
    """A handler whose `process` is retried on transient failures."""
