"""Handler classes: thin shells over the behaviors, with the reference's shapes."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from cqrs_resilience import (
    Command,
    CommandResponse,
    ConcurrencyError,
    ConflictCommandHandler,
    ConflictConfig,
    ConflictResolutionMixin,
    ConflictResolutionPolicy,
    ExponentialBackoffPolicy,
    FakeClock,
    FixedRetryPolicy,
    HookRegistry,
    PipelinedCommandHandler,
    ResilientCommandHandler,
    Retryable,
    RetryableCommandHandler,
    RetryBehaviorMixin,
    TransientError,
    current_command_id,
)


class SendEmailCommand(Command[str], Retryable):
    to: str
    subject: str
    body: str
    retry_policy: ExponentialBackoffPolicy = msgspec.field(
        default_factory=lambda: ExponentialBackoffPolicy(
            max_retries=3, initial_delay_ms=500, jitter=False
        )
    )


class EmailService:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sent: list[str] = []

    async def send(self, to: str, subject: str, body: str) -> None:
        if self.failures:
            self.failures -= 1
            raise TransientError("smtp timeout")
        self.sent.append(to)


class SendEmailHandler(RetryableCommandHandler[str]):
    async def process(self, command: SendEmailCommand) -> CommandResponse[str]:
        await self.dispatcher.send(command.to, command.subject, command.body)
        return CommandResponse(result="sent")


async def test_reference_example_1_simple_retry(clock: FakeClock) -> None:
    """The reference's SendEmail example: transient failures are retried on the command's policy."""
    service = EmailService(failures=2)
    handler = SendEmailHandler(service, clock=clock)
    response = await handler.handle(SendEmailCommand(to="a@b.c", subject="hi", body="..."))
    assert response.result == "sent"
    assert service.sent == ["a@b.c"]
    assert clock.sleeps == [0.5, 1.0]


async def test_exhausted_retries_propagate_the_error_from_handle(clock: FakeClock) -> None:
    """When the command's budget is spent, handle raises the last error itself."""
    service = EmailService(failures=10)
    with pytest.raises(TransientError, match="smtp") as info:
        await SendEmailHandler(service, clock=clock).handle(
            SendEmailCommand(to="x", subject="", body="")
        )
    assert info.value.__notes__ == ["gave up after 4 attempts: all retries used (max_retries=3)"]


class Echo(Command[str]):
    text: str


class EchoHandler(PipelinedCommandHandler[str]):
    async def process(self, command: Echo) -> CommandResponse[str]:
        if command.text == "boom":
            raise LookupError("no such thing")
        return CommandResponse(result=command.text)


async def test_pipelined_handler_runs_behaviors_last_added_outermost() -> None:
    """add_behavior: the last added runs first (LIFO), as the reference describes."""
    log: list[str] = []

    def tag(name: str) -> Any:
        def behavior(next_fn: Any) -> Any:
            async def wrapped(command: Any) -> Any:
                log.append(name)
                return await next_fn(command)

            return wrapped

        return behavior

    handler = EchoHandler()
    handler.add_behavior(tag("first-added"))
    handler.add_behavior(tag("last-added"))
    assert (await handler.handle(Echo(text="hi"))).result == "hi"
    assert log == ["last-added", "first-added"]
    assert len(handler.behaviors) == 2


async def test_exceptions_from_process_propagate_unchanged() -> None:
    """What process raises comes out of handle as the same exception."""
    with pytest.raises(LookupError, match="no such thing"):
        await EchoHandler().handle(Echo(text="boom"))


def test_a_handler_without_process_cannot_be_instantiated() -> None:
    """process is abstract."""

    class Incomplete(PipelinedCommandHandler[str]):
        pass

    with pytest.raises(TypeError, match="process"):
        Incomplete()  # type: ignore[abstract]


def test_constructor_keeps_dispatcher_and_options(hooks: HookRegistry) -> None:
    """dispatcher, strategy_registry and hooks are kept as given."""
    registry = object()
    handler = EchoHandler("dispatcher", strategy_registry=registry, hooks=hooks)
    assert handler.dispatcher == "dispatcher"
    assert handler.strategy_registry is registry
    assert handler.hooks is hooks
    assert EchoHandler().dispatcher is None


def test_repository_is_the_dispatcher_under_its_own_name() -> None:
    """`repository` is the object passed as `dispatcher`, read-only; `dispatcher` is kept."""
    store = object()
    handler = EchoHandler(store)
    assert handler.repository is store and handler.dispatcher is store
    handler.dispatcher = other = object()
    assert handler.repository is other
    assert EchoHandler().repository is None
    assert EchoHandler(dispatcher=store).repository is store
    with pytest.raises(AttributeError):
        handler.repository = store  # type: ignore[misc]


@pytest.mark.parametrize(
    "handler_class", [ResilientCommandHandler, ConflictCommandHandler, ConflictResolutionMixin]
)
def test_the_docstring_says_conflicts_are_not_resolved_by_default(
    handler_class: type[ConflictResolutionMixin[Any]],
) -> None:
    """Nothing near a conflict-resolving handler's introduction hides that it resolves no
    conflict until `conflict_config` says how (the default policy is FIRST_WINS)."""
    first_paragraph = (handler_class.__doc__ or "").split("\n\n")[0]
    assert "FIRST_WINS" in first_paragraph and "conflict_config" in first_paragraph
    assert handler_class.conflict_config is None
    assert ConflictConfig().policy is ConflictResolutionPolicy.FIRST_WINS


async def test_overridden_get_pipeline_is_used_by_handle() -> None:
    """A subclass may build its own pipeline as in the reference; handle uses it."""

    class Custom(EchoHandler):
        def get_pipeline(self) -> Any:
            pipeline = self.process
            for behavior in reversed(self._behaviors):
                pipeline = behavior(pipeline)

            async def shout(command: Echo) -> CommandResponse[str]:
                response = await pipeline(command)
                return CommandResponse(result=str(response.result).upper())

            return shout

    assert (await Custom().handle(Echo(text="hi"))).result == "HI"


class Unreliable(RetryableCommandHandler[str]):
    retry_policy = FixedRetryPolicy(max_retries=1, delay_ms=3, jitter=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    async def process(self, command: Echo) -> CommandResponse[str]:
        self.calls += 1
        raise ConnectionError("refused")


async def test_class_policy_applies_to_commands_without_one(
    clock: FakeClock, hooks: HookRegistry, events: list[Any]
) -> None:
    """A handler's retry_policy class attribute is used when the command has none."""
    handler = Unreliable(clock=clock, hooks=hooks)
    with pytest.raises(ConnectionError):
        await handler.handle(Echo(text="x"))
    assert handler.calls == 2
    assert clock.sleeps == [0.003]
    assert events[0][1]["handler.type"] == "Unreliable"
    assert events[0][1]["command.type"] == "Echo"


def test_mixin_name_from_the_reference_exists() -> None:
    """RetryBehaviorMixin is the reference's name for the retry half."""
    assert issubclass(RetryableCommandHandler, RetryBehaviorMixin)


async def test_handle_exposes_the_command_id_to_stores() -> None:
    """While a command is handled, its id is the current command id (for idempotent writes)."""
    seen: list[str | None] = []

    class Recording(PipelinedCommandHandler[str]):
        async def process(self, command: Echo) -> CommandResponse[str]:
            seen.append(current_command_id.get())
            return CommandResponse()

    command = Echo(text="x")
    await Recording().handle(command)
    assert seen == [command.command_id]
    assert current_command_id.get() is None


class FromTheWire(Command[str], Retryable):
    text: str = ""


async def test_a_commands_policy_wins_even_by_default_but_within_the_class_caps(
    clock: FakeClock,
) -> None:
    """A Retryable command's policy (the mixin's default included) replaces the class's,
    bounded by the class's max_retries_cap and max_delay_cap_s."""

    class Capped(Unreliable):
        max_retries_cap = 2
        max_delay_cap_s = 0.05

    handler = Capped(clock=clock)
    with pytest.raises(ConnectionError):  # the mixin's default: 5 retries, capped at 2
        await handler.handle(FromTheWire())
    assert handler.calls == 3
    wire = b'{"retry_policy": {"type": "fixed", "max_retries": 1000, "delay_ms": 1e300}}'
    handler = Capped(clock=FakeClock())
    with pytest.raises(ConnectionError):
        await handler.handle(msgspec.json.decode(wire, type=FromTheWire))
    assert handler.calls == 3
    assert handler.clock.sleeps == [0.05, 0.05]  # type: ignore[union-attr]


def test_a_sync_process_is_refused_when_the_handler_is_built() -> None:
    """handle() awaits process(): a sync one is a TypeError naming it, at construction,
    before any command could run it."""
    sent: list[str] = []

    class SyncSend(RetryableCommandHandler[str]):
        def process(self, command: Any) -> CommandResponse[str]:  # type: ignore[override]
            sent.append(command)
            return CommandResponse(result="sent")

    with pytest.raises(TypeError, match=r"SyncSend.process is a sync function"):
        SyncSend()
    assert sent == []


async def test_async_conflict_hooks_on_a_handler_class() -> None:
    """A conflict handler's get_incoming_state and update_command may be async methods."""

    class Save(Command[str]):
        state: dict[str, Any] = msgspec.field(default_factory=dict)

    class SaveHandler(ConflictCommandHandler[str]):
        conflict_config = ConflictConfig(policy=ConflictResolutionPolicy.LAST_WINS)

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[dict[str, Any]] = []

        async def process(self, command: Save) -> CommandResponse[str]:
            self.seen.append(command.state)
            if len(self.seen) == 1:
                raise ConcurrencyError(aggregate_id="a1")
            return CommandResponse(result="saved")

        async def fetch_latest_state(self, command: Save) -> dict[str, Any] | None:
            return {"id": "a1", "version": 2, "status": "new"}

        async def get_incoming_state(self, command: Save) -> dict[str, Any]:
            return command.state

        async def update_command(self, command: Save, merged_state: dict[str, Any]) -> Save:
            return Save(state=merged_state)

    handler = SaveHandler()
    assert (await handler.handle(Save(state={"note": "hi"}))).result == "saved"
    assert handler.seen == [
        {"note": "hi"},
        {"id": "a1", "version": 2, "status": "new", "note": "hi"},
    ]
