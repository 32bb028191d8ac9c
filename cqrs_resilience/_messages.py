"""Commands, responses, and the mixins that let a command carry its own resilience settings."""

from __future__ import annotations

import re
import reprlib
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast, dataclass_transform

import msgspec

from ._conflict_config import ConflictConfig
from ._errors import ConfigurationError
from ._policies import AnyRetryPolicy, ExponentialBackoffPolicy

R = TypeVar("R")

MAX_ID_LENGTH = 255
"""The longest command or aggregate id accepted, in characters (Stripe's idempotency-key cap)."""


def new_command_id() -> str:
    """A fresh random idempotency key."""
    return uuid.uuid4().hex


def check_id(name: str, value: object) -> str | None:
    """Why `value` cannot be an aggregate id (a stored key), or None when it can.

    Ids arrive from queues and HTTP bodies and become database keys, so they must be non-empty
    strings a database stores as text: no NUL, no lone surrogate, at most MAX_ID_LENGTH long.
    Command ids follow `check_command_id`, this rule and no control characters. Aggregate ids
    keep this looser rule on purpose: one stored under an id with a tab or a newline must
    stay readable (`retrieve` finds no id the rule refuses).
    """
    if not isinstance(value, str):
        return f"{name} must be a string, not {type(value).__name__}"
    if not value:
        return f"{name} must be a non-empty string"
    if len(value) > MAX_ID_LENGTH:
        return f"{name} must be at most {MAX_ID_LENGTH} characters, not {len(value)}"
    if "\x00" in value:
        return f"{name} must not contain NUL characters"
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            return f"{name} must be valid Unicode text (it holds a lone surrogate)"
    return None


_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")


def check_command_id(value: object, name: str = "command_id") -> str | None:
    """Why `value` cannot be a command id, or None when it can: `check_id`'s rule, and no
    control characters (U+0000-U+001F, U+007F), since an id from outside also travels in
    headers, logs and traces. Every door that takes a command id applies it (API.md 8);
    `name` is what the message calls the value (an `Idempotency-Key` header, say)."""
    if isinstance(value, str) and not (value.isascii() and value.isprintable()):
        found = _CONTROL_CHARACTER.search(value)
        if found is not None:
            return (
                f"{name} must not contain control characters (U+0000-U+001F, U+007F); "
                f"it holds U+{ord(found[0]):04X}"
            )
    return check_id(name, value)


def require_command_id(value: object) -> str:
    """`value` if it is a valid command id; else the `ConfigurationError` that every door
    taking one raises: `Command(command_id=...)`, `persist(..., command_id=...)`,
    `command_scope(...)`, and a store's first write for a command nobody checked."""
    # The usual id, printable ASCII (a uuid's hex, the default), needs no other test.
    if (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_LENGTH
        and value.isascii()
        and value.isprintable()
    ):
        return value
    problem = check_command_id(value)
    if problem is None:
        return cast(str, value)
    shown = repr(value) if isinstance(value, str) else reprlib.repr(value)
    raise ConfigurationError(f"{problem}: {shown if len(shown) <= 40 else shown[:37] + '...'}")


class _CommandMeta(msgspec.StructMeta):
    """Makes commands keyword-only and adds the fields that plain mixins promise.

    msgspec allows only one base with fields, so the mixins are slot-less plain classes that
    list the fields they promise; this metaclass declares each on the first Command subclass
    that needs it, unless the class (or a base) declares it itself.
    """

    def __new__(
        mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any
    ) -> _CommandMeta:
        # Every command is keyword-only, subclasses too: mixing in a field never shifts positions
        # and required fields may follow defaulted ones.
        kwargs.setdefault("kw_only", True)
        # Every command checks its id on construction and decoding, even one whose class
        # defines its own __post_init__ (msgspec runs it after decoding, too).
        own = namespace.get("__post_init__")
        if own is not None and not getattr(own, "_checks_command_id", False):
            namespace["__post_init__"] = _checking_id(own)
        annotations = namespace.setdefault("__annotations__", {})
        for base in bases:
            for klass in base.__mro__:
                promised: dict[str, tuple[Any, Callable[[], Any]]] = klass.__dict__.get(
                    "__promised_fields__", {}
                )
                for field, (tp, factory) in promised.items():
                    inherited = any(field in getattr(b, "__struct_fields__", ()) for b in bases)
                    if field not in annotations and not inherited:
                        annotations[field] = tp
                        namespace[field] = msgspec.field(default_factory=factory)
        return super().__new__(mcls, name, bases, namespace, **kwargs)


def _checking_id(post_init: Callable[[Any], None]) -> Callable[[Any], None]:
    def __post_init__(self: Any) -> None:
        require_command_id(self.command_id)
        post_init(self)

    __post_init__._checks_command_id = True  # type: ignore[attr-defined]
    __post_init__.__doc__ = post_init.__doc__
    __post_init__.__wrapped__ = post_init  # type: ignore[attr-defined]
    return __post_init__


# Tells type checkers what the metaclass does at run time: every command field is keyword-only.
@dataclass_transform(kw_only_default=True, field_specifiers=(msgspec.field,))
class Command(msgspec.Struct, Generic[R], kw_only=True, metaclass=_CommandMeta):
    """Base for commands; `command_id` is the idempotency key, kept across retries and merges.

    The id is a string of 1 to 255 characters, valid Unicode, without control characters: a
    bad one is a `ConfigurationError` at construction and a `msgspec.ValidationError` when
    decoding (`check_command_id`).
    """

    command_id: str = msgspec.field(default_factory=new_command_id)

    def __post_init__(self) -> None:
        require_command_id(self.command_id)

    __post_init__._checks_command_id = True  # type: ignore[attr-defined]


class CommandResponse(msgspec.Struct, Generic[R], kw_only=True):
    """What a handler returns: a result and the domain events the command raised."""

    result: R | None = None
    events: list[Any] = msgspec.field(default_factory=list)


if TYPE_CHECKING:
    # What type checkers see: Structs whose fields join a command's __init__ (msgspec's
    # dataclass_transform collects fields only from Struct bases). At run time the mixins are
    # plain classes, because msgspec allows one base with fields; the metaclass adds them.

    class Retryable(msgspec.Struct, kw_only=True):
        """Mixin: the command carries a `retry_policy`, which overrides the handler's."""

        retry_policy: AnyRetryPolicy = msgspec.field(default_factory=ExponentialBackoffPolicy)

    class ConflictResilient(msgspec.Struct, kw_only=True):
        """Mixin: the command carries a `conflict_config`, which overrides the handler's."""

        conflict_config: ConflictConfig = msgspec.field(default_factory=ConflictConfig)

else:

    class Retryable:
        """Mixin: the command carries a `retry_policy`, which overrides the handler's."""

        __slots__ = ()
        __promised_fields__: ClassVar[dict[str, tuple[Any, Callable[[], Any]]]] = {
            "retry_policy": (AnyRetryPolicy, ExponentialBackoffPolicy)
        }
        retry_policy: AnyRetryPolicy

    class ConflictResilient:
        """Mixin: the command carries a `conflict_config`, which overrides the handler's."""

        __slots__ = ()
        __promised_fields__: ClassVar[dict[str, tuple[Any, Callable[[], Any]]]] = {
            "conflict_config": (ConflictConfig, ConflictConfig)
        }
        conflict_config: ConflictConfig
