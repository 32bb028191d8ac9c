"""How aggregates become rows and back: msgpack, validated against the aggregate type.

msgpack rather than JSON keeps every value msgspec can encode exact (bytes, NaN, NUL characters,
big integers) and matches `InMemoryRepository`. A row that does not decode, or decodes to
another id or version than the row says, is reported as corrupt rather than half-trusted.

Rows are keyed by `namespace:id`, not the bare id, so aggregates of several types can share one
database; the codec builds that key, and everything a caller sees keeps the bare id.
"""

from __future__ import annotations

from typing import Generic

import msgspec

from .._repository import A, Aggregate
from ._errors import CorruptStateError


class AggregateCodec(Generic[A]):
    """Encodes aggregates of one type and decodes stored rows back, checking them.

    `namespace` (default: the type's `__name__`) prefixes the key each aggregate is stored
    under: `key("1")` is `"Order:1"`. It must be a non-empty string without ":", so the first
    ":" of a key always ends the namespace, whatever the id holds.
    """

    def __init__(self, aggregate_type: type[A], namespace: str | None = None) -> None:
        if not (isinstance(aggregate_type, type) and issubclass(aggregate_type, Aggregate)):
            raise TypeError(
                f"aggregate_type must be a subclass of cqrs_resilience Aggregate, "
                f"got {aggregate_type!r}"
            )
        if namespace is None:
            namespace = aggregate_type.__name__
        if not isinstance(namespace, str) or not namespace or ":" in namespace:
            raise ValueError(f"namespace must be a non-empty str without ':', got {namespace!r}")
        self.aggregate_type = aggregate_type
        self.namespace = namespace
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(aggregate_type)

    def key(self, aggregate_id: str) -> str:
        """The key rows of `aggregate_id` are stored under: `namespace:aggregate_id`."""
        return f"{self.namespace}:{aggregate_id}"

    def next_version(self, aggregate: A) -> tuple[A, bytes]:
        """The aggregate as it will be stored (version + 1), and its encoded form."""
        if not isinstance(aggregate, self.aggregate_type):
            raise TypeError(
                f"this repository stores {self.aggregate_type.__name__}, "
                f"got {type(aggregate).__name__}"
            )
        stored = msgspec.structs.replace(aggregate, version=aggregate.version + 1)
        return stored, self._encoder.encode(stored)

    def decode(self, raw: object, aggregate_id: str, version: int | None) -> A:
        """The aggregate a row holds; `CorruptStateError` if it is not what the row says.

        `aggregate_id` is the bare id (not the stored key), the one the aggregate must hold.
        """
        if raw is None:
            raise CorruptStateError(aggregate_id, version, "the row is missing")
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise CorruptStateError(aggregate_id, version, f"state is {type(raw).__name__}")
        try:
            aggregate = self._decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise CorruptStateError(aggregate_id, version, str(exc)) from exc
        if aggregate.id != aggregate_id or (version is not None and aggregate.version != version):
            raise CorruptStateError(
                aggregate_id,
                version,
                f"it holds id {aggregate.id!r} version {aggregate.version}",
            )
        return aggregate
