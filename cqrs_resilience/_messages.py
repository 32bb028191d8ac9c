"""Commands, responses, and the mixins that let a command carry its own resilience settings."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, dataclass_transform

import msgspec

from ._conflict_config import ConflictConfig
from ._policies import AnyRetryPolicy, ExponentialBackoffPolicy

R = TypeVar("R")


def new_command_id() -> str:
    """A fresh random idempotency key."""
    return uuid.uuid4().hex


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


# Tells type checkers what the metaclass does at run time: every command field is keyword-only.
@dataclass_transform(kw_only_default=True, field_specifiers=(msgspec.field,))
class Command(msgspec.Struct, Generic[R], kw_only=True, metaclass=_CommandMeta):
    """Base for commands; `command_id` is the idempotency key, kept across retries and merges."""

    command_id: str = msgspec.field(default_factory=new_command_id)


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
