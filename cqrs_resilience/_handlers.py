"""Handler classes: a `process()` method wrapped in a pipeline of behaviors.

The classes hold no resilience logic of their own. Each mixin contributes one behavior
(`timeout`, `retry`, `circuit_breaker`, `resolve_conflicts`) built from the same functions
users decorate with, wired to the handler's settings and methods; `handle()` runs the composed
pipeline. Mixins listed left to right wrap outermost to innermost.
"""

from __future__ import annotations

import typing
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from . import _telemetry
from ._breaker import CircuitBreaker
from ._budget import RetryBudget
from ._conflict import HOOK_NAMES, MAX_ATTEMPTS_CAP, resolve_conflicts
from ._conflict_config import ConflictConfig, ConflictResolutionPolicy
from ._idempotency import CURRENT, enter
from ._messages import CommandResponse
from ._pipeline import Behavior, async_only, pipeline
from ._policies import RetryPolicy
from ._response_store import ResponseStore
from ._responses import DEFAULT_WAIT_S, Idempotent
from ._retry import MAX_DELAY_CAP_S, MAX_RETRIES_CAP, Stop, Wait, retry
from ._retry_on import RetryOn
from ._timeout import timeout

if TYPE_CHECKING:
    from ._clock import Clock
    from ._hooks import HookRegistry
    from ._turns import TakesTurns

R = TypeVar("R")

Handle = Callable[[Any], Awaitable[CommandResponse[R]]]


_ANSWERING = frozenset({"responses", "responses_keep_s", "responses_wait_s"})


class PipelinedCommandHandler(ABC, Generic[R]):
    """Base handler: implement `process`; `handle` runs it inside the behaviors.

    `repository` (the first argument, named `dispatcher` in the signature): the repository
    (unit of work, client) the handler reads and writes through; `dispatcher` is the same
    object. `strategy_registry`, `hooks` and `clock` reach the built-in behaviors. Behaviors
    apply last-added outermost (`add_behavior`).

    `responses=store` (or a class or instance attribute `responses`) records each command's
    first response in `store` and answers a resend with it before any behavior runs:
    `idempotent(store)`, outermost, with `responses_keep_s` and `responses_wait_s` as its
    `keep_s` and `wait_s`. Setting any of the three later takes effect from the next
    `handle()`. Resends are decoded as `process`'s return annotation (`CommandResponse[R]`).
    """

    responses: ResponseStore | None = None
    responses_keep_s: float | None = None
    responses_wait_s: float = DEFAULT_WAIT_S

    def __init__(
        self,
        dispatcher: Any = None,
        *,
        strategy_registry: Any = None,
        hooks: HookRegistry | None = None,
        clock: Clock | None = None,
        responses: ResponseStore | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        if responses is not None:
            self.responses = responses
        self.strategy_registry = strategy_registry
        self.hooks = hooks
        self.clock = clock
        self._behaviors: list[Behavior] = []
        self._pipeline: Handle[R] | None = None
        # handle() awaits it: a sync process() is refused here, before it could run.
        self._process: Handle[R] = async_only(self.process, f"{type(self).__name__}.handle()")
        for behavior in self.default_behaviors():
            self.add_behavior(behavior)

    def __setattr__(self, name: str, value: Any) -> None:
        # The answering of resends is built into the pipeline: a new setting rebuilds it.
        object.__setattr__(self, name, value)
        if name in _ANSWERING:
            object.__setattr__(self, "_pipeline", None)

    @property
    def repository(self) -> Any:
        """The repository (unit of work, client) the handler reads and writes through;
        `dispatcher` is the same object (read-only here: set `dispatcher` to change it)."""
        return self.dispatcher

    @abstractmethod
    async def process(self, command: Any) -> CommandResponse[R]:
        """The business logic for one command."""

    def default_behaviors(self) -> list[Behavior]:
        """The behaviors this class installs, innermost first; mixins extend the list."""
        return []

    def add_behavior(self, behavior: Behavior) -> None:
        """Wrap the pipeline in one more behavior (it becomes the outermost)."""
        if not callable(behavior):
            raise TypeError(f"a behavior is a callable taking a handler, got {behavior!r}")
        self._behaviors.append(behavior)
        self._pipeline = None

    @property
    def behaviors(self) -> tuple[Behavior, ...]:
        """The installed behaviors, in the order added."""
        return tuple(self._behaviors)

    def get_pipeline(self) -> Handle[R]:
        """`process` wrapped in every behavior (and answering resends first, with
        `responses` set); rebuilt only after `add_behavior`."""
        if self._pipeline is None:
            built: Handle[R] = pipeline(*reversed(self._behaviors))(self._process)
            if self.responses is not None:
                answering = Idempotent(
                    self.responses,
                    keep_s=self.responses_keep_s,
                    wait_s=self.responses_wait_s,
                    response_type=response_type_of(self),
                )
                built = answering(built)
            self._pipeline = built
        return self._pipeline

    async def handle(self, command: Any) -> CommandResponse[R]:
        """Process `command` through the pipeline; what `process` raises propagates as is.

        The command's idempotency scope is opened here, once, for every behavior inside.
        """
        scope, token = enter((command,))
        try:
            measure = _telemetry.MEASURE
            # Instrumented, one handled command, unless an outer handle() or retry() handles
            # this command already.
            if measure is None or (scope is not None and (scope.root or scope).telemetry):
                return await self.get_pipeline()(command)
            record = measure.command(type(self).__name__, command, attempts=scope is not None)
            if scope is not None:
                scope.telemetry = record  # where the behaviors inside report attempts
            try:
                result = await self.get_pipeline()(command)
            except BaseException as exc:
                record.finish(exc)
                raise
            finally:
                if scope is not None:
                    scope.telemetry = None  # a scope of the caller's may outlive the command
            record.finish(None)
            return result
        finally:
            if token is not None:
                CURRENT.reset(token)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({pipeline(*reversed(self._behaviors))!r})"


def response_type_of(handler: PipelinedCommandHandler[Any]) -> Any:
    """What `handler.process` returns, as its annotation says, with the handler class's type
    argument for `R` (`ResilientCommandHandler[Receipt]` makes `CommandResponse[R]` a
    `CommandResponse[Receipt]`): what a resend is decoded as."""
    try:
        returned = typing.get_type_hints(type(handler).process).get("return", CommandResponse)
    except Exception:  # an annotation that does not resolve here
        returned = CommandResponse
    if returned is CommandResponse:
        returned = CommandResponse[R]
    if R in getattr(returned, "__parameters__", ()):
        returned = returned[_type_argument(type(handler))]
    return returned


def _type_argument(kind: type) -> Any:
    """The type a handler class gave `R` (`class H(ResilientCommandHandler[str])`), or Any."""
    for klass in kind.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            origin = typing.get_origin(base)
            if isinstance(origin, type) and issubclass(origin, PipelinedCommandHandler):
                args = typing.get_args(base)
                if args and not isinstance(args[0], TypeVar):
                    return args[0]
    return Any


class TimeoutMixin(PipelinedCommandHandler[R]):
    """Adds `timeout(timeout_s)` around what it wraps, when `timeout_s` (seconds) is set.

    Listed first (outermost), it is the command's overall deadline: every `retry` inside
    honors it and never starts a wait the deadline cannot cover.
    """

    timeout_s: ClassVar[float | None] = None

    def default_behaviors(self) -> list[Behavior]:
        behaviors = super().default_behaviors()
        if self.timeout_s is None:
            return behaviors
        return [*behaviors, timeout(self.timeout_s, clock=self.clock)]


class RetryBehaviorMixin(PipelinedCommandHandler[R]):
    """Adds `retry` around the handler: transient failures are retried with backoff.

    The command's own `retry_policy` (`Retryable`, the mixin's default included) wins over the
    class's `retry_policy`, bounded by `max_retries_cap` and `max_delay_cap_s`. `retry_budget`
    (one `RetryBudget`, shared by every instance) limits retries to a share of first attempts;
    `retry_stop` and `retry_wait` take tenacity's strategies.
    """

    retry_policy: ClassVar[RetryPolicy | None] = None
    retry_on: ClassVar[RetryOn | None] = None
    retry_budget: ClassVar[RetryBudget | None] = None
    retry_stop: ClassVar[Stop | None] = None
    retry_wait: ClassVar[Wait | None] = None
    max_retries_cap: ClassVar[int] = MAX_RETRIES_CAP
    max_delay_cap_s: ClassVar[float] = MAX_DELAY_CAP_S

    def default_behaviors(self) -> list[Behavior]:
        cls = type(self)  # read through the class: a function set there stays unbound
        behavior = retry(
            self.retry_policy,
            on=cls.retry_on,
            stop=cls.retry_stop,
            wait=cls.retry_wait,
            budget=self.retry_budget,
            hooks=self.hooks,
            clock=self.clock,
            max_retries_cap=self.max_retries_cap,
            max_delay_cap_s=self.max_delay_cap_s,
        )
        return [*super().default_behaviors(), behavior]


class CircuitBreakerMixin(PipelinedCommandHandler[R]):
    """Adds the class's `breaker` (a `circuit_breaker()`), when set.

    A class attribute, so every instance (handlers built per request included) shares the one
    circuit. Inside `retry`, a refused call is not retried (`BrokenCircuitError`).
    """

    breaker: ClassVar[CircuitBreaker | None] = None

    def default_behaviors(self) -> list[Behavior]:
        behaviors = super().default_behaviors()
        return behaviors if self.breaker is None else [*behaviors, self.breaker]


class RetryableCommandHandler(TimeoutMixin[R], RetryBehaviorMixin[R], CircuitBreakerMixin[R]):
    """A handler whose `process` is retried on transient failures.

    By default with `ExponentialBackoffPolicy()` (at most 5 more calls after the first), or
    the command's own `retry_policy`; set `retry_policy` on the class to change it. Optionally
    `timeout_s` (outermost) and a `breaker` (inside the retries):
    `timeout → retry → circuit_breaker → process`.
    """


class ConflictResolutionMixin(PipelinedCommandHandler[R]):
    """Adds `resolve_conflicts` wired to this handler's own state methods; it resolves no
    conflict by default: with `conflict_config` unset, `ConflictConfig()` applies, whose policy
    is `FIRST_WINS` (the `ConcurrencyError` propagates). Set `conflict_config =
    ConflictConfig(policy=ConflictResolutionPolicy.MERGE)` (or `LAST_WINS`) to resolve them.

    `RUN_AGAIN` (delta commands: `process` reads the latest state itself) needs nothing more.
    For `LAST_WINS` and `MERGE`, implement `fetch_latest_state`, `get_incoming_state` and
    `update_command` (a missing one is a `TypeError` when the handler is built); define
    `fetch_base_state` too for a three-way merge. The command's own `conflict_config`
    (`ConflictResilient`) wins over the class's `conflict_config`, bounded by
    `max_attempts_cap` and adding to (never removing) the class's `protected_fields`.
    Conflicts on one aggregate are resolved one at a time, across every handler of the
    process and, through the store, across processes; `turns` (a `Turns`) overrides that.
    """

    conflict_config: ClassVar[ConflictConfig | None] = None
    max_attempts_cap: ClassVar[int] = MAX_ATTEMPTS_CAP
    turns: ClassVar[TakesTurns | None] = None

    # The three state methods: needed for LAST_WINS and MERGE only, so not abstract. One left
    # as defined here is "not implemented": resolve_conflicts() gets None for it.

    async def fetch_latest_state(self, command: Any) -> dict[str, Any] | None:
        """The aggregate's latest state, or None if it no longer exists (LAST_WINS, MERGE)."""
        raise NotImplementedError

    def get_incoming_state(self, command: Any) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        """The state the command wants to write (a sync or an async method; LAST_WINS, MERGE)."""
        raise NotImplementedError

    def update_command(self, command: Any, merged_state: dict[str, Any]) -> Any:
        """A command like `command`, carrying `merged_state` (sync or async; LAST_WINS, MERGE)."""
        raise NotImplementedError

    async def fetch_base_state(self, command: Any) -> dict[str, Any] | None:
        """The state the command was issued against; override it for a three-way merge."""
        return None

    def default_behaviors(self) -> list[Behavior]:
        cls = type(self)
        implemented = [
            getattr(cls, name) is not getattr(ConflictResolutionMixin, name) for name in HOOK_NAMES
        ]
        missing = [name for name, done in zip(HOOK_NAMES, implemented, strict=True) if not done]
        policy = getattr(self.conflict_config or ConflictConfig(), "policy", None)
        if missing and policy in (
            ConflictResolutionPolicy.LAST_WINS,
            ConflictResolutionPolicy.MERGE,
        ):
            raise TypeError(
                f"Can't instantiate {cls.__name__}: conflict_config's {policy.name} needs the "
                f"methods {', '.join(missing)} (RUN_AGAIN and FIRST_WINS need none)"
            )
        hooks = [
            getattr(self, name) if done else None
            for name, done in zip(HOOK_NAMES, implemented, strict=True)
        ]
        behavior = resolve_conflicts(
            *hooks,
            config=self.conflict_config,
            registry=self.strategy_registry,
            hooks=self.hooks,
            fetch_base_state=self.fetch_base_state,
            max_attempts_cap=self.max_attempts_cap,
            turns=self.turns,
        )
        return [*super().default_behaviors(), behavior]


class ConflictCommandHandler(ConflictResolutionMixin[R]):
    """A handler whose optimistic-concurrency conflicts are resolved by policy, and none by
    default (`FIRST_WINS`: the `ConcurrencyError` propagates): set `conflict_config` to merge
    (`MERGE`), overwrite (`LAST_WINS`) or run a delta command again (`RUN_AGAIN`)."""


class ResilientCommandHandler(
    TimeoutMixin[R], RetryBehaviorMixin[R], CircuitBreakerMixin[R], ConflictResolutionMixin[R]
):
    """Retries transient failures and can resolve conflicts, but resolves none by default:
    with `conflict_config` unset, `ConflictConfig()` applies, whose policy is `FIRST_WINS`, so
    a `ConcurrencyError` propagates. Set `conflict_config =
    ConflictConfig(policy=ConflictResolutionPolicy.MERGE)` (or `LAST_WINS`) on the class to
    merge; a command's own `conflict_config` (`ConflictResilient`) wins over the class's.

    `retry` is outside `resolve_conflicts`, outside `process`: a transient failure retries the
    whole command, conflict resolution included; a conflict is resolved without spending the
    retries. Set `timeout_s` for an overall deadline (outermost) and `breaker` for a circuit
    breaker between the retries and the resolution:
    `timeout → retry → circuit_breaker → resolve_conflicts → process`.
    """
