"""How aggregates become stored bytes and back: msgpack, checked both ways.

A store must never keep a state it cannot read back: msgspec Structs do not validate on
construction, so `Order(id="o", items=[{1: "x"}])` would encode fine and then fail every read,
bricking the aggregate. So a write is encoded *and decoded again* with the aggregate type
before it goes anywhere; what does not survive the round trip is refused with an
`InvalidStateError` naming the aggregate and the path of the offending value, and the caller
gets back exactly what later reads will return.

Depth: msgspec encodes and decodes recursively, within Python's recursion limit, so a deep
state that decoded at write time could fail when read from a deeper call stack. Encoding and
decoding fall back to a fresh stack (`_stack`) whenever the caller's stack is too deep; a
state that cannot be encoded and decoded even there (a cycle, or nesting near the recursion
limit) is refused.

Rows are keyed by `namespace:id`, not the bare id, so several aggregate types share one
database; the codec builds that key, and everything a caller sees keeps the bare id.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Generic

import msgspec

from ._aggregate import A, Aggregate
from ._errors import CorruptStateError, InvalidStateError
from ._messages import check_id
from ._stack import with_stack_fallback
from ._walk import REPORTED_DEPTH, cycle_or_depth, path_to

DEFAULT_MAX_STATE_BYTES = 16 * 1024 * 1024
"""The largest encoded state a store takes by default: a clear error, not a slow outage."""

MAX_VERSION = 2**31 - 2
"""Versions are stored as 32-bit integers; the next version must fit."""

# What msgspec's encoder raises for a value it cannot write (RecursionError: cycle or depth).
_UNENCODABLE = (TypeError, ValueError, OverflowError, RecursionError)


class AggregateCodec(Generic[A]):
    """Encodes aggregates of one type, refusing what would not read back, and decodes rows.

    `namespace` (default: the type's `__name__`) prefixes the key each aggregate is stored
    under: `key("1")` is `"Order:1"`. It must be a non-empty string without ":", so the first
    ":" of a key always ends the namespace, whatever the id holds. `max_state_bytes` bounds
    the encoded size of one state.
    """

    def __init__(
        self,
        aggregate_type: type[A],
        namespace: str | None = None,
        *,
        max_state_bytes: int = DEFAULT_MAX_STATE_BYTES,
    ) -> None:
        if not (isinstance(aggregate_type, type) and issubclass(aggregate_type, Aggregate)):
            raise TypeError(
                f"aggregate_type must be a subclass of cqrs_resilience Aggregate, "
                f"got {aggregate_type!r}"
            )
        if namespace is None:
            namespace = aggregate_type.__name__
        if not isinstance(namespace, str) or not namespace or ":" in namespace:
            raise ValueError(f"namespace must be a non-empty str without ':', got {namespace!r}")
        if isinstance(max_state_bytes, bool) or not isinstance(max_state_bytes, int):
            raise TypeError(f"max_state_bytes must be an int, got {max_state_bytes!r}")
        if max_state_bytes < 1:
            raise ValueError(f"max_state_bytes must be >= 1, got {max_state_bytes}")
        self.aggregate_type = aggregate_type
        self.namespace = namespace
        self.max_state_bytes = max_state_bytes
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(aggregate_type).decode

    def key(self, aggregate_id: str) -> str:
        """The key rows of `aggregate_id` are stored under: `namespace:aggregate_id`."""
        return f"{self.namespace}:{aggregate_id}"

    def storable_id(self, aggregate_id: object) -> bool:
        """Whether `aggregate_id` could be stored; other ids are never found (not an error)."""
        if not isinstance(aggregate_id, str):
            raise TypeError(f"aggregate ids are strings, got {aggregate_id!r}")
        return check_id("id", aggregate_id) is None

    def storable_version(self, version: object) -> bool:
        """Whether a version could be stored (1 to `MAX_VERSION`); one that could not is
        never found (not an error), a version that is no int is a `TypeError`."""
        if type(version) is not int:
            raise TypeError(f"version must be an int, got {version!r}")
        return 0 < version <= MAX_VERSION

    def require(self, aggregate: object) -> None:
        """A `TypeError` unless `aggregate` is of the type this codec stores."""
        if not isinstance(aggregate, self.aggregate_type):
            raise TypeError(
                f"this repository stores {self.aggregate_type.__name__}, "
                f"got {type(aggregate).__name__}"
            )

    def next_version(self, aggregate: A) -> tuple[A, bytes]:
        """The aggregate as it will be stored (version + 1, read back from its encoding), and
        its encoding; `InvalidStateError` if it is not something this store can read back."""
        self.require(aggregate)
        aggregate_id, version = aggregate.id, aggregate.version
        problem = check_id("id", aggregate_id)
        if problem is not None:
            raise InvalidStateError(_shown_id(aggregate_id), "$.id", problem)
        if type(version) is not int or not 0 <= version <= MAX_VERSION - 1:
            raise InvalidStateError(
                aggregate_id,
                "$.version",
                f"version must be an int from 0 to {MAX_VERSION - 1}, got {version!r}",
            )
        stored = msgspec.structs.replace(aggregate, version=version + 1)
        encoded = self._encoded(stored)
        if len(encoded) > self.max_state_bytes:
            raise InvalidStateError(
                aggregate_id,
                "$",
                f"the encoded state is {len(encoded):,} bytes; this store takes at most "
                f"{self.max_state_bytes:,} (max_state_bytes)",
            )
        try:
            return with_stack_fallback(self._decode, encoded), encoded
        except msgspec.ValidationError as exc:
            raise InvalidStateError(aggregate_id, *_where(exc)) from None
        except RecursionError:
            raise self._too_deep(stored) from None

    def _encoded(self, stored: A) -> bytes:
        try:
            return with_stack_fallback(self._encode, stored)
        except RecursionError:
            raise self._too_deep(stored) from None
        except _UNENCODABLE as exc:
            path = path_to(stored, functools.partial(_fails, self._encode))
            raise InvalidStateError(stored.id, path, _reason(exc)) from None

    def _too_deep(self, stored: A) -> InvalidStateError:
        found = cycle_or_depth(stored, REPORTED_DEPTH)
        if found is not None and found[0] == "cycle":
            reason = "the state contains a cycle (a value that contains itself)"
        else:
            reason = "the state is nested too deeply to be read back safely"
        return InvalidStateError(stored.id, found[1] if found else "$", reason)

    def decode(self, raw: object, aggregate_id: str, version: int | None) -> A:
        """The aggregate a row holds; `CorruptStateError` if it is not what the row says.

        `aggregate_id` is the bare id (not the stored key), the one the aggregate must hold.
        """
        if raw is None:
            raise CorruptStateError(aggregate_id, version, "the row is missing")
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise CorruptStateError(aggregate_id, version, f"state is {type(raw).__name__}")
        try:
            aggregate = with_stack_fallback(self._decode, raw)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise CorruptStateError(aggregate_id, version, str(exc)) from exc
        if aggregate.id != aggregate_id or (version is not None and aggregate.version != version):
            raise CorruptStateError(
                aggregate_id,
                version,
                f"it holds id {aggregate.id!r} version {aggregate.version}",
            )
        return aggregate


def _fails(encode: Callable[[Any], bytes], value: Any) -> bool:
    try:
        encode(value)
    except _UNENCODABLE:
        return True
    return False


def _where(exc: msgspec.ValidationError) -> tuple[str, str]:
    """(path, reason) from msgspec's "Expected `str`, got `int` - at `key` in `$.a[0]`"."""
    reason, _, where = str(exc).partition(" - at `")
    where = where.removesuffix("`")
    if where.startswith("key` in `"):
        return f"{where.removeprefix('key` in `')} (a key)", reason
    return where or "$", reason


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OverflowError):
        return "integers must fit in 64 bits (from -2**63 to 2**64 - 1)"
    if isinstance(exc, UnicodeError):
        return "strings must be valid Unicode (this one holds a lone surrogate)"
    text = str(exc)
    if text.startswith("Encoding objects of type"):
        kind = text.removeprefix("Encoding objects of type ").removesuffix(" is unsupported")
        return f"values of type {kind} cannot be stored"
    return text


def _shown_id(aggregate_id: object) -> object:
    shown = repr(aggregate_id)
    return aggregate_id if len(shown) <= 60 else shown[:57] + "..."
