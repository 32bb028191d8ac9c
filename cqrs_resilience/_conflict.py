"""`resolve_conflicts()`: the behavior that settles optimistic-concurrency conflicts.

When the handler raises `ConcurrencyError`, the command's intent (its incoming state) is
laid over, or merged into, the latest stored state, the command is rebuilt from the result
and run again; with RUN_AGAIN (delta commands) the original command simply runs again and
its handler reads the latest state itself, so no hook is needed. Three rules keep this from
losing data:

- the incoming state is always the *original* command's, and every round merges it into the
  newest latest state (never into an earlier round's merge);
- with a base (the state the command was issued against) the merge is three-way, so a
  concurrent change the command did not touch survives, and a change on both sides is a
  reported conflict, not an overwrite;
- protected fields (identity, version) always come from the latest state, never count as
  three-way conflicts, and a command's config can add to them but never remove one; the
  rebuilt command keeps the original `command_id`, so stores can recognize a repeat.

A command's `conflict_config` is outside input: its `max_attempts` is bounded by the
behavior's `max_attempts_cap`, and a policy needing hooks (LAST_WINS, MERGE) where none were
given is refused (the conflict propagates). Rounds for one aggregate take turns through the
store that raised the conflict (across processes), else process-wide (`_turns`). A base the
store pruned is merged as an empty base: every path the two sides hold differently is then a
conflict.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, Protocol, TypeVar, cast

import msgspec

from . import _telemetry
from ._conflict_config import ConflictConfig, ConflictResolutionPolicy
from ._errors import (
    ConcurrencyError,
    ConfigurationError,
    MergeConflictError,
    VersionPrunedError,
)
from ._hooks import (
    CONFLICT_DETECTED,
    CONFLICT_FAILED,
    CONFLICT_RESOLVED,
    HookRegistry,
    announce,
    describe_handler,
    get_hook_registry,
    observed,
)
from ._idempotency import CURRENT, Scope, attempt, attempt_needs_own_counts, enter
from ._merge_registry import MergeStrategyRegistry
from ._merge_strategies import MergeStrategy
from ._pipeline import async_only
from ._retry import check_cap
from ._retry_on import command_type
from ._turns import PROCESS_TURNS, TakesTurns

P = ParamSpec("P")
T = TypeVar("T")
State = dict[str, Any]


# Each hook may be async or sync: what a call returns is awaited when it is awaitable.


class FetchLatestState(Protocol):
    """Reads the aggregate's latest state for a command; None when it no longer exists."""

    def __call__(self, command: Any, /) -> Awaitable[State | None] | State | None: ...


class FetchBaseState(Protocol):
    """Reads the state the command was issued against (its base), for a three-way merge."""

    def __call__(self, command: Any, /) -> Awaitable[State | None] | State | None: ...


class GetIncomingState(Protocol):
    """Extracts the state a command wants to write."""

    def __call__(self, command: Any, /) -> State | Awaitable[State]: ...


class UpdateCommand(Protocol):
    """Rebuilds a command around a resolved state (the command, or an awaitable of it)."""

    def __call__(self, command: Any, merged_state: State, /) -> Any: ...


DEFAULT_CONFIG = ConflictConfig()
_DEFAULT_REGISTRY = MergeStrategyRegistry()
ALWAYS_PROTECTED = frozenset({"id", "version"})
_NEEDS_HOOKS = frozenset({ConflictResolutionPolicy.LAST_WINS, ConflictResolutionPolicy.MERGE})
HOOK_NAMES = ("fetch_latest_state", "get_incoming_state", "update_command")
"""The hooks LAST_WINS and MERGE need; FIRST_WINS and RUN_AGAIN need none."""

MAX_ATTEMPTS_CAP = 10
"""The most resolution attempts (more calls after the first) a command's own `max_attempts`
may ask for, unless the behavior says otherwise."""


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class ResolveConflicts:
    """The behavior `resolve_conflicts()` returns; apply it to a one-command async handler."""

    def __init__(
        self,
        fetch_latest_state: FetchLatestState | None = None,
        get_incoming_state: GetIncomingState | None = None,
        update_command: UpdateCommand | None = None,
        *,
        config: ConflictConfig | None = None,
        registry: MergeStrategyRegistry | None = None,
        hooks: HookRegistry | None = None,
        fetch_base_state: FetchBaseState | None = None,
        max_attempts_cap: int = MAX_ATTEMPTS_CAP,
        turns: TakesTurns | None = None,
    ) -> None:
        check_cap("max_attempts_cap", max_attempts_cap)
        given = (fetch_latest_state, get_incoming_state, update_command)
        for name, hook in zip(HOOK_NAMES, given, strict=True):
            if hook is not None and not callable(hook):
                raise TypeError(f"resolve_conflicts() needs a callable {name}, got {hook!r}")
        if fetch_base_state is not None and not callable(fetch_base_state):
            raise TypeError(f"fetch_base_state must be callable, got {fetch_base_state!r}")
        if config is not None and not isinstance(config, ConflictConfig):
            raise TypeError(f"config must be a ConflictConfig, got {config!r}")
        # Without the three hooks, conflicts can only be resolved by running the command again.
        self.missing_hooks = tuple(
            name for name, hook in zip(HOOK_NAMES, given, strict=True) if hook is None
        )
        policy = (config or DEFAULT_CONFIG).policy
        if self.missing_hooks and policy in _NEEDS_HOOKS:
            raise ConfigurationError(
                f"resolve_conflicts(config=ConflictConfig(policy={policy.name})) needs "
                f"{', '.join(self.missing_hooks)}; RUN_AGAIN and FIRST_WINS need no hooks"
            )
        self.fetch_latest_state = fetch_latest_state
        self.get_incoming_state = get_incoming_state
        self.update_command = update_command
        self.config = config
        self.registry = registry
        self.hooks = hooks
        self.fetch_base_state = fetch_base_state
        self.max_attempts_cap = max_attempts_cap
        self.turns = turns

    def __repr__(self) -> str:
        config = f"config={self.config!r}" if self.config is not None else ""
        return f"resolve_conflicts({config})"

    def __call__(self, handler: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        if not callable(handler):
            raise TypeError(f"resolve_conflicts() wraps a callable, got {handler!r}")
        handler_type = describe_handler(handler)
        # Its result is awaited: a sync handler is refused now, before it could run.
        one_arg = cast(Callable[[Any], Awaitable[T]], async_only(handler, "resolve_conflicts()"))

        @functools.wraps(handler)
        async def resolving(command: Any) -> T:
            # The command's idempotency scope; inside handle() it is already open.
            scope, token = CURRENT.get(), None
            if scope is None or command is not scope.command:
                scope, token = enter((command,))
            changes = scope.changes if scope is not None else 0
            try:
                if token is not None and (measure := _telemetry.MEASURE) is not None:
                    return await self._handled(
                        handler_type, one_arg, command, (scope, changes), measure
                    )
                try:
                    return await one_arg(command)
                except ConcurrencyError as exc:
                    conflict = exc
                return await self._resolve(
                    handler_type, one_arg, command, conflict, (scope, changes)
                )
            finally:
                if token is not None:
                    CURRENT.reset(token)

        return resolving  # type: ignore[return-value]

    async def _handled(
        self,
        handler_type: str,
        handler: Callable[[Any], Awaitable[T]],
        command: Any,
        scope: tuple[Scope | None, int],
        measure: _telemetry.Measure,
    ) -> T:
        """Instrumented, the call that opened its command's scope handles it."""
        record = measure.command(handler_type, command, attempts=True)
        if scope[0] is not None:  # always: this call opened it
            scope[0].telemetry = record
        try:
            try:
                result = await handler(command)
            except ConcurrencyError as exc:
                result = await self._resolve(handler_type, handler, command, exc, scope)
        except BaseException as exc:
            record.finish(exc)
            raise
        record.finish(None)
        return result

    # The conflict path: everything below runs only after a ConcurrencyError.

    def _config(self, command: Any, failure: ConcurrencyError) -> ConflictConfig:
        """The config for `command`: its own, bounded by this behavior's limits, or ours.
        The command's own is outside input: one that is no `ConflictConfig` is a `TypeError`
        caused by the conflict it came to resolve."""
        own: ConflictConfig | None = getattr(command, "conflict_config", None)
        trusted = self.config or DEFAULT_CONFIG
        if own is None:
            return trusted
        if not isinstance(own, ConflictConfig):
            raise TypeError(
                f"{type(command).__name__}.conflict_config must be a ConflictConfig, got {own!r}"
            ) from failure
        protected = own.protected_fields | trusted.protected_fields | ALWAYS_PROTECTED
        max_attempts = min(own.max_attempts, self.max_attempts_cap)
        if protected == own.protected_fields and max_attempts == own.max_attempts:
            return own
        return msgspec.structs.replace(own, protected_fields=protected, max_attempts=max_attempts)

    def _hook(self, name: str) -> Any:
        """A hook known to be given (`missing_hooks` was checked before any is called)."""
        return getattr(self, name)

    def _cannot_merge(self, config: ConflictConfig) -> str:
        """Why a command's LAST_WINS or MERGE was refused: the hooks it needs are missing."""
        trusted = (self.config or DEFAULT_CONFIG).policy
        how = (
            "it resolves conflicts only by running the command again"
            if trusted is ConflictResolutionPolicy.RUN_AGAIN
            else "it cannot merge"
        )
        return (
            f"conflict not resolved: the command asked for {config.policy.value}, but this "
            f"handler has no {', '.join(self.missing_hooks)}: {how}"
        )

    def _strategy(self, config: ConflictConfig) -> MergeStrategy:
        return (self.registry or _DEFAULT_REGISTRY).get(config.strategy_name, config)

    def _merge(
        self, config: ConflictConfig, base: State | None, latest: State, incoming: State
    ) -> State:
        protected = config.protected_fields
        if config.policy is ConflictResolutionPolicy.LAST_WINS:
            merged = {**latest, **incoming}
        else:
            strategy = self._strategy(config)
            merge3 = getattr(strategy, "merge3", None)
            if base is not None and merge3 is not None:
                # Protected fields come from latest whatever the merge says, so incoming's
                # (stale, absent or hostile) values there are no change and no conflict.
                if any(k in incoming or k in base for k in protected):
                    incoming = {k: v for k, v in incoming.items() if k not in protected}
                    incoming.update((k, base[k]) for k in protected if k in base)
                merged = merge3(base, latest, incoming, on_conflict=config.on_conflict)
            else:
                merged = strategy.merge(latest, incoming)
        # The mass-assignment guard: identity and version are the store's, never the command's.
        if protected:
            merged = {k: v for k, v in merged.items() if k not in protected}
            merged.update({k: latest[k] for k in protected if k in latest})
        return merged

    def _context(
        self,
        event: str,
        handler_type: str,
        command: Any,
        config: ConflictConfig,
        attempt: int,
        error: BaseException,
    ) -> dict[str, Any]:
        return {
            "event": event,
            "handler.type": handler_type,
            "command.type": command_type(command),
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
        scope: tuple[Scope | None, int],
    ) -> T:
        config = self._config(original, error)
        hooks = self.hooks or get_hook_registry()
        record = None
        if _telemetry.MEASURE is not None:
            record = _telemetry.record_of(scope[0], original)
            if record is not None:
                record.attempt_failed(error)

        async def emit(event: str, attempt: int, exc: BaseException) -> None:
            if observed(hooks, event):
                context = self._context(event, handler_type, original, config, attempt, exc)
                await announce(hooks, event, context)

        await emit(CONFLICT_DETECTED, 1, error)
        if config.policy is ConflictResolutionPolicy.FIRST_WINS:
            await emit(CONFLICT_FAILED, 1, error)
            raise error

        run_again = config.policy is ConflictResolutionPolicy.RUN_AGAIN
        if not run_again and self.missing_hooks:
            # A command's own config asked for a merge this handler has no hooks for.
            error.add_note(self._cannot_merge(config))
            await emit(CONFLICT_FAILED, 1, error)
            raise error
        incoming: State = {}
        base: State | None = None
        if not run_again:
            incoming = await _maybe_await(self._hook("get_incoming_state")(original))
        if self.fetch_base_state is not None and config.policy is ConflictResolutionPolicy.MERGE:
            try:
                base = await _maybe_await(self.fetch_base_state(original))
            except VersionPrunedError:
                base = {}  # unknown: both sides' differences are conflicts, nothing overwritten

        if config.max_attempts == 0:
            error.add_note("conflict not resolved: max_attempts is 0 (resolution is off)")
            await emit(CONFLICT_FAILED, 1, error)
            raise error

        turns = self.turns or error.turns or PROCESS_TURNS
        command = original
        for round_ in range(1, config.max_attempts + 1):
            async with turns.turn(error.aggregate_id):
                # RUN_AGAIN: the same command again; its handler reads the latest state.
                if not run_again:
                    latest = await _maybe_await(self._hook("fetch_latest_state")(command))
                    if latest is None:
                        error.add_note("conflict not resolved: the aggregate no longer exists")
                        await emit(CONFLICT_FAILED, round_, error)
                        raise error
                    try:
                        merged = self._merge(config, base, latest, incoming)
                    except MergeConflictError as merge_error:
                        merge_error.__cause__ = error
                        await emit(CONFLICT_FAILED, round_, merge_error)
                        raise
                    rebuilt = await _maybe_await(self._hook("update_command")(original, merged))
                    command = _keep_identity(rebuilt, original)
                if record is not None:
                    record.attempt_started()
                try:
                    if attempt_needs_own_counts(*scope):
                        with attempt(*scope):
                            result = await handler(command)
                    else:
                        result = await handler(command)
                except ConcurrencyError as exc:
                    error = exc
                    if record is not None:
                        record.attempt_failed(error)
                    if round_ < config.max_attempts:
                        await emit(CONFLICT_DETECTED, round_ + 1, error)
                    continue
            await emit(CONFLICT_RESOLVED, round_, error)
            return result
        error.add_note(_unresolved(original, config))
        await emit(CONFLICT_FAILED, config.max_attempts, error)
        raise error


def _unresolved(command: Any, config: ConflictConfig) -> str:
    """Why resolving stopped with every resolution made: the count, or a cap that cut the
    count the command asked for."""
    made = config.max_attempts
    own = getattr(command, "conflict_config", None)
    asked = own.max_attempts if isinstance(own, ConflictConfig) else made
    if asked > made:
        return (
            f"conflict not resolved after {made} resolution attempts: max_attempts_cap={made} "
            f"caps the command's max_attempts={asked}"
        )
    return f"conflict not resolved after {made} resolution attempts (max_attempts={made})"


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
    fetch_latest_state: FetchLatestState | None = None,
    get_incoming_state: GetIncomingState | None = None,
    update_command: UpdateCommand | None = None,
    *,
    config: ConflictConfig | None = None,
    registry: MergeStrategyRegistry | None = None,
    hooks: HookRegistry | None = None,
    fetch_base_state: FetchBaseState | None = None,
    max_attempts_cap: int = MAX_ATTEMPTS_CAP,
    turns: TakesTurns | None = None,
) -> ResolveConflicts:
    """Settle `ConcurrencyError`s of a one-command handler by the config's policy.

    FIRST_WINS lets the error through; LAST_WINS overlays the command's state on the latest;
    MERGE merges it with the named strategy — three-way when `fetch_base_state` is given;
    RUN_AGAIN calls the handler again with the same command (which reads the latest state
    itself). Each resolution attempt reads the latest state, resolves, and calls the handler
    again: at most `max_attempts` more calls after the first. The three hooks are needed only
    for LAST_WINS and MERGE: without them (FIRST_WINS, RUN_AGAIN) they may be left out, a
    configured LAST_WINS or MERGE is a `ConfigurationError`, and a command's own config asking
    for one lets the conflict propagate with a note. A command's own `conflict_config`
    (`ConflictResilient`) wins over `config`, but makes at most `max_attempts_cap` resolution
    attempts and can only add `protected_fields`. Conflicts on one aggregate are resolved
    one at a time: through the store that raised the conflict (so across processes too), else
    among the handlers of the process; `turns` (a `Turns`) overrides both.

    The hooks may be sync or async. The handler is awaited, so it must be async: a sync
    function is a `TypeError` when decorating, before it ever runs. A lambda (or a
    `functools.wraps` decorator) leading to an async function is taken, and what each call
    returns is checked before it is awaited.
    """
    return ResolveConflicts(
        fetch_latest_state,
        get_incoming_state,
        update_command,
        config=config,
        registry=registry,
        hooks=hooks,
        fetch_base_state=fetch_base_state,
        max_attempts_cap=max_attempts_cap,
        turns=turns,
    )
