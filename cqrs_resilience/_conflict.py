"""`resolve_conflicts()`: the behaviour that settles optimistic-concurrency conflicts.

When the handler raises `ConcurrencyError`, the command's intent (its incoming state) is
laid over, or merged into, the latest stored state, the command is rebuilt from the result
and run again. Three rules keep this from losing data:

- the incoming state is always the *original* command's, and every round merges it into the
  newest latest state (never into an earlier round's merge);
- with a base (the state the command was issued against) the merge is three-way, so a
  concurrent change the command did not touch survives, and a change on both sides is a
  reported conflict, not an overwrite;
- protected fields (identity, version) always come from the latest state, and the rebuilt
  command keeps the original `command_id`, so stores can recognise a repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import weakref
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, ParamSpec, Protocol, TypeVar, cast

import msgspec

from ._conflict_config import ConflictConfig, ConflictResolutionPolicy
from ._errors import ConcurrencyError, MergeConflictError
from ._hooks import (
    CONFLICT_DETECTED,
    CONFLICT_FAILED,
    CONFLICT_RESOLVED,
    HookRegistry,
    describe_handler,
    get_hook_registry,
)
from ._idempotency import current_command_id
from ._merge import MergeStrategy, MergeStrategyRegistry

P = ParamSpec("P")
T = TypeVar("T")
State = dict[str, Any]


class FetchLatestState(Protocol):
    """Reads the aggregate's latest state for a command; None when it no longer exists."""

    def __call__(self, command: Any, /) -> Awaitable[State | None]: ...


class FetchBaseState(Protocol):
    """Reads the state the command was issued against (its base), for a three-way merge."""

    def __call__(self, command: Any, /) -> Awaitable[State | None]: ...


class GetIncomingState(Protocol):
    """Extracts the state a command wants to write."""

    def __call__(self, command: Any, /) -> State: ...


class UpdateCommand(Protocol):
    """Rebuilds a command around a resolved state."""

    def __call__(self, command: Any, merged_state: State, /) -> Any: ...


DEFAULT_CONFIG = ConflictConfig()
_DEFAULT_REGISTRY = MergeStrategyRegistry()


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class ResolveConflicts:
    """The behaviour `resolve_conflicts()` returns; apply it to a one-command async handler."""

    def __init__(
        self,
        fetch_latest_state: FetchLatestState,
        get_incoming_state: GetIncomingState,
        update_command: UpdateCommand,
        *,
        config: ConflictConfig | None = None,
        registry: MergeStrategyRegistry | None = None,
        hooks: HookRegistry | None = None,
        fetch_base_state: FetchBaseState | None = None,
    ) -> None:
        for name, hook in (
            ("fetch_latest_state", fetch_latest_state),
            ("get_incoming_state", get_incoming_state),
            ("update_command", update_command),
        ):
            if not callable(hook):
                raise TypeError(f"resolve_conflicts() needs a callable {name}, got {hook!r}")
        if fetch_base_state is not None and not callable(fetch_base_state):
            raise TypeError(f"fetch_base_state must be callable, got {fetch_base_state!r}")
        if config is not None and not isinstance(config, ConflictConfig):
            raise TypeError(f"config must be a ConflictConfig, got {config!r}")
        self.fetch_latest_state = fetch_latest_state
        self.get_incoming_state = get_incoming_state
        self.update_command = update_command
        self.config = config
        self.registry = registry
        self.hooks = hooks
        self.fetch_base_state = fetch_base_state
        # Locks live only while someone holds or waits for them.
        self._turns: weakref.WeakValueDictionary[Any, asyncio.Lock] = weakref.WeakValueDictionary()

    def __repr__(self) -> str:
        config = f"config={self.config!r}" if self.config is not None else ""
        return f"resolve_conflicts({config})"

    def __call__(self, handler: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        if not callable(handler):
            raise TypeError(f"resolve_conflicts() wraps a callable, got {handler!r}")
        handler_type = describe_handler(handler)
        one_arg = cast(Callable[[Any], Awaitable[T]], handler)

        @functools.wraps(handler)
        async def resolving(command: Any) -> T:
            # Stores record this id with the write, so a repeat after a commit is recognised.
            # Inside handle() it is already current, and a context-variable write is not free.
            command_id = getattr(command, "command_id", None)
            token = None
            if command_id is not None and current_command_id.get() != command_id:
                token = current_command_id.set(command_id)
            try:
                try:
                    return await one_arg(command)
                except ConcurrencyError as exc:
                    conflict = exc
                return await self._resolve(handler_type, one_arg, command, conflict)
            finally:
                if token is not None:
                    current_command_id.reset(token)

        return resolving  # type: ignore[return-value]

    # The conflict path: everything below runs only after a ConcurrencyError.

    def _turn(self, aggregate_id: Any) -> AbstractAsyncContextManager[Any]:
        """Resolution rounds for one aggregate take turns within this process.

        Without turns, N local writers that lost a race re-read, re-merge and race again
        together: about N/2 attempts each. Taking turns, each round reads the state the
        previous round wrote, so a round fails only against a first attempt or another
        process. First attempts never wait; the database still arbitrates.
        """
        if aggregate_id is None:
            return contextlib.nullcontext()
        try:
            lock = self._turns.get(aggregate_id)
        except TypeError:  # an unhashable id: no turns, only the database
            return contextlib.nullcontext()
        if lock is None:
            lock = self._turns[aggregate_id] = asyncio.Lock()
        return lock

    def _strategy(self, config: ConflictConfig) -> MergeStrategy:
        return (self.registry or _DEFAULT_REGISTRY).get(config.strategy_name, config)

    def _merge(
        self, config: ConflictConfig, base: State | None, latest: State, incoming: State
    ) -> State:
        if config.policy is ConflictResolutionPolicy.LAST_WINS:
            merged = {**latest, **incoming}
        else:
            strategy = self._strategy(config)
            merge3 = getattr(strategy, "merge3", None)
            if base is not None and merge3 is not None:
                merged = merge3(base, latest, incoming, on_conflict=config.on_conflict)
            else:
                merged = strategy.merge(latest, incoming)
        # The mass-assignment guard: identity and version are the store's, never the command's.
        protected = config.protected_fields
        if protected:
            merged = {k: v for k, v in merged.items() if k not in protected}
            merged.update({k: latest[k] for k in protected if k in latest})
        return merged

    def _context(
        self,
        handler_type: str,
        command: Any,
        config: ConflictConfig,
        attempt: int,
        error: BaseException,
    ) -> dict[str, Any]:
        return {
            "handler.type": handler_type,
            "command.type": type(command).__name__,
            "attempt": attempt,
            "max_retries": config.max_attempts,
            "delay_ms": None,
            "error": error,
            "policy": config.policy,
            "strategy": config.strategy_name
            if config.policy is ConflictResolutionPolicy.MERGE
            else None,
        }

    async def _resolve(
        self,
        handler_type: str,
        handler: Callable[[Any], Awaitable[T]],
        original: Any,
        error: ConcurrencyError,
    ) -> T:
        config = getattr(original, "conflict_config", None) or self.config or DEFAULT_CONFIG
        hooks = self.hooks or get_hook_registry()

        async def emit(event: str, attempt: int, exc: BaseException) -> None:
            if hooks.wants(event):
                await hooks.emit(event, self._context(handler_type, original, config, attempt, exc))

        await emit(CONFLICT_DETECTED, 1, error)
        if config.policy is ConflictResolutionPolicy.FIRST_WINS:
            await emit(CONFLICT_FAILED, 1, error)
            raise error

        incoming = self.get_incoming_state(original)
        base: State | None = None
        if self.fetch_base_state is not None and config.policy is ConflictResolutionPolicy.MERGE:
            base = await _maybe_await(self.fetch_base_state(original))

        command = original
        for attempt in range(1, config.max_attempts + 1):
            async with self._turn(error.aggregate_id):
                latest = await _maybe_await(self.fetch_latest_state(command))
                if latest is None:
                    error.add_note("conflict not resolved: the aggregate no longer exists")
                    await emit(CONFLICT_FAILED, attempt, error)
                    raise error
                try:
                    merged = self._merge(config, base, latest, incoming)
                except MergeConflictError as merge_error:
                    merge_error.__cause__ = error
                    await emit(CONFLICT_FAILED, attempt, merge_error)
                    raise
                command = _keep_identity(self.update_command(original, merged), original)
                try:
                    result = await handler(command)
                except ConcurrencyError as exc:
                    error = exc
                    if attempt < config.max_attempts:
                        await emit(CONFLICT_DETECTED, attempt + 1, error)
                    continue
            await emit(CONFLICT_RESOLVED, attempt, error)
            return result
        error.add_note(f"conflict not resolved after {config.max_attempts} resolution attempts")
        await emit(CONFLICT_FAILED, config.max_attempts, error)
        raise error


def _keep_identity(rebuilt: Any, original: Any) -> Any:
    """The rebuilt command keeps the original `command_id`: one logical command, one key."""
    command_id = getattr(original, "command_id", None)
    if command_id is None or getattr(rebuilt, "command_id", command_id) == command_id:
        return rebuilt
    if isinstance(rebuilt, msgspec.Struct):
        return msgspec.structs.replace(rebuilt, command_id=command_id)
    rebuilt.command_id = command_id
    return rebuilt


def resolve_conflicts(
    fetch_latest_state: FetchLatestState,
    get_incoming_state: GetIncomingState,
    update_command: UpdateCommand,
    *,
    config: ConflictConfig | None = None,
    registry: MergeStrategyRegistry | None = None,
    hooks: HookRegistry | None = None,
    fetch_base_state: FetchBaseState | None = None,
) -> ResolveConflicts:
    """Settle `ConcurrencyError`s of a one-command handler by the config's policy.

    FIRST_WINS lets the error through; LAST_WINS overlays the command's state on the latest;
    MERGE merges it with the named strategy — three-way when `fetch_base_state` is given.
    A command's own `conflict_config` (`ConflictResilient`) wins over `config`.
    """
    return ResolveConflicts(
        fetch_latest_state,
        get_incoming_state,
        update_command,
        config=config,
        registry=registry,
        hooks=hooks,
        fetch_base_state=fetch_base_state,
    )
