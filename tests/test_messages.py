"""Commands and their mixins: ids, policies and configs that travel with the command."""

from __future__ import annotations

import msgspec
import pytest

from cqrs_resilience import (
    Command,
    CommandResponse,
    ConfigurationError,
    ConflictConfig,
    ConflictResilient,
    ConflictResolutionPolicy,
    ExponentialBackoffPolicy,
    FixedRetryPolicy,
    Retryable,
)


class SendEmailCommand(Command[str], Retryable):
    to: str
    subject: str = ""
    retry_policy: ExponentialBackoffPolicy = msgspec.field(
        default_factory=lambda: ExponentialBackoffPolicy(max_retries=3, initial_delay_ms=500)
    )


class PlainRetryable(Command[str], Retryable):
    to: str


class UpdateOrderCommand(Command[str], Retryable, ConflictResilient):
    order_id: str
    updates: dict[str, object] = msgspec.field(default_factory=dict)


def test_command_ids_are_fresh_random_hex() -> None:
    """Each command gets its own hex idempotency key."""
    a, b = PlainRetryable(to="x"), PlainRetryable(to="x")
    assert a.command_id != b.command_id
    int(a.command_id, 16)


def test_commands_are_keyword_only() -> None:
    """Fields are passed by name, so adding a mixin never shifts positions."""
    with pytest.raises(TypeError):
        PlainRetryable("x")  # type: ignore[misc]


def test_retryable_gives_a_default_exponential_policy() -> None:
    """Without redeclaring it, a Retryable command has ExponentialBackoffPolicy()."""
    assert PlainRetryable(to="x").retry_policy == ExponentialBackoffPolicy()


def test_a_command_may_redeclare_its_policy_default() -> None:
    """The reference's redeclaration gives that command its own default."""
    assert SendEmailCommand(to="x").retry_policy == ExponentialBackoffPolicy(
        max_retries=3, initial_delay_ms=500
    )


def test_subclasses_keep_a_redeclared_default() -> None:
    """A subclass of a command that redeclared the policy inherits that default."""

    class UrgentEmail(SendEmailCommand):
        priority: int = 1

    assert UrgentEmail(to="x").retry_policy.max_retries == 3


def test_both_mixins_at_once() -> None:
    """A command may be Retryable and ConflictResilient together."""
    command = UpdateOrderCommand(order_id="o1")
    assert command.retry_policy == ExponentialBackoffPolicy()
    assert command.conflict_config == ConflictConfig()
    assert isinstance(command, Retryable)
    assert isinstance(command, ConflictResilient)


@pytest.mark.parametrize("codec", [msgspec.json, msgspec.msgpack])
def test_policy_and_config_travel_with_the_command(codec: object) -> None:
    """Encoded and decoded (as through a queue), a command keeps its id, policy and config."""
    command = UpdateOrderCommand(
        order_id="o1",
        updates={"status": "shipped"},
        retry_policy=FixedRetryPolicy(max_retries=9, delay_ms=5),
        conflict_config=ConflictConfig(policy=ConflictResolutionPolicy.MERGE, append_lists=True),
    )
    decoded = codec.decode(codec.encode(command), type=UpdateOrderCommand)  # type: ignore[attr-defined]
    assert decoded == command
    assert isinstance(decoded.retry_policy, FixedRetryPolicy)


def test_decoding_validates_a_bad_policy() -> None:
    """A command whose policy is out of range does not decode."""
    payload = b'{"order_id": "o1", "retry_policy": {"type": "fixed", "delay_ms": -1}}'
    with pytest.raises(msgspec.ValidationError, match="delay_ms"):
        msgspec.json.decode(payload, type=UpdateOrderCommand)


def test_decoding_validates_a_bad_conflict_policy() -> None:
    """An unknown conflict policy name does not decode."""
    payload = b'{"order_id": "o1", "conflict_config": {"policy": "newest"}}'
    with pytest.raises(msgspec.ValidationError, match="policy"):
        msgspec.json.decode(payload, type=UpdateOrderCommand)


def test_command_response_defaults() -> None:
    """A response has no result and no events unless given."""
    response: CommandResponse[str] = CommandResponse()
    assert response.result is None
    assert response.events == []
    assert CommandResponse(result="ok", events=[1]).events == [1]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"policy": "sometimes"}, "policy"),
        ({"max_attempts": -1}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"strategy_name": ""}, "strategy_name"),
        ({"include_fields": "status"}, "include_fields"),
    ],
)
def test_conflict_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    """A bad conflict setting raises ValueError naming the field."""
    with pytest.raises(ValueError, match=field):
        ConflictConfig(**kwargs)  # type: ignore[arg-type]


def test_conflict_config_accepts_plain_sets_and_names() -> None:
    """Sets, lists and policy names are accepted and normalized."""
    config = ConflictConfig(policy="merge", include_fields={"a", "b"}, exclude_fields=["c"])  # type: ignore[arg-type]
    assert config.policy is ConflictResolutionPolicy.MERGE
    assert config.include_fields == frozenset({"a", "b"})
    assert config.exclude_fields == frozenset({"c"})


# --- command_id is an idempotency key from outside: refused unless a usable key ---------------


@pytest.mark.parametrize(
    ("command_id", "reason"),
    [
        ("", "non-empty"),
        ("a\x00b", "control characters .*U\\+0000"),
        ("a\tb", "control characters .*U\\+0009"),
        ("line\n", "control characters .*U\\+000A"),
        ("\x1f", "control characters .*U\\+001F"),
        ("del\x7f", "control characters .*U\\+007F"),
        ("x" * 256, "at most 255"),
        ("\ud800", "surrogate"),
        (7, "must be a string"),
    ],
)
def test_a_bad_command_id_is_refused_at_construction(command_id: object, reason: str) -> None:
    """An unusable id is a ConfigurationError (a ValueError) naming command_id."""
    with pytest.raises(ConfigurationError, match=f"command_id .*{reason}"):
        UpdateOrderCommand(command_id=command_id, order_id="o1")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        b'{"command_id": "", "order_id": "o1"}',
        b'{"command_id": "a\\u0000", "order_id": "o1"}',
        b'{"command_id": "a\\nb", "order_id": "o1"}',
        b'{"command_id": "a\\u007f", "order_id": "o1"}',
    ],
)
def test_a_bad_command_id_is_refused_at_decoding(body: bytes) -> None:
    """A queue message or HTTP body with an unusable id does not decode."""
    with pytest.raises(msgspec.ValidationError, match="command_id"):
        msgspec.json.decode(body, type=UpdateOrderCommand)


def test_a_command_with_its_own_post_init_still_checks_its_id() -> None:
    """A subclass's __post_init__ runs, after the id check it cannot skip."""

    class Checked(Command[str]):
        amount: int = 0

        def __post_init__(self) -> None:
            if self.amount < 0:
                raise ValueError("amount must be >= 0")

    with pytest.raises(ConfigurationError, match="command_id"):
        Checked(command_id="")
    with pytest.raises(ValueError, match="amount"):
        Checked(amount=-1)
    with pytest.raises(msgspec.ValidationError, match="command_id"):
        msgspec.json.decode(b'{"command_id": ""}', type=Checked)
    assert Checked(amount=1).amount == 1


def test_a_conflict_config_may_turn_resolution_off() -> None:
    """max_attempts=0 is valid, like max_retries=0: no resolution."""
    assert ConflictConfig(max_attempts=0).max_attempts == 0
    assert msgspec.json.decode(b'{"max_attempts": 0}', type=ConflictConfig).max_attempts == 0
