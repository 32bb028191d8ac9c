"""What stores accept: a state that reads back as its type, or a clear refusal naming where."""

from __future__ import annotations

import sys
import uuid
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cqrs_resilience import Aggregate, InvalidStateError, StoreError
from cqrs_resilience._codec import AggregateCodec
from cqrs_resilience.stores import InvalidStateError as StoresInvalidStateError


class Order(Aggregate, kw_only=True):
    status: str = "open"
    items: list[dict[str, Any]] = msgspec.field(default_factory=list)
    payload: Any = None


def nested(depth: int) -> dict[str, Any]:
    root = node = {}
    for _ in range(depth):
        node["k"] = {}
        node = node["k"]
    return root


def cyclic() -> dict[str, Any]:
    state: dict[str, Any] = {"items": []}
    state["items"].append(state)
    return state


BAD_STATES = [
    pytest.param({"items": [{1: "x"}]}, r"\$\.items\[0\] \(a key\)", id="int key"),
    pytest.param({"items": [{(1, 2): "x"}]}, r"\$\.items\[0\] \(a key\)", id="tuple key"),
    pytest.param(
        {"items": "abc"}, r"Expected `array`, got `str` - at `\$\.items`", id="str for list"
    ),
    pytest.param({"status": 5}, r"Expected `str`, got `int` - at `\$\.status`", id="int status"),
    pytest.param({"status": None}, r"\$\.status", id="None status"),
    pytest.param({"payload": 2**64}, r"64 bits.* at `\$\.payload`", id="int over 64 bits"),
    pytest.param({"payload": [-(2**63) - 1]}, r"64 bits.* at `\$\.payload\[0\]`", id="negative"),
    pytest.param(
        {"payload": {"a": object()}}, r"type object .* at `\$\.payload\['a'\]`", id="object"
    ),
    pytest.param({"payload": "\ud800"}, r"surrogate.* at `\$\.payload`", id="lone surrogate"),
    pytest.param({"payload": cyclic()}, r"cycle.* at `\$\.payload\['items'\]\[0\]`", id="cycle"),
    pytest.param({"payload": nested(10_000)}, r"too deeply", id="10k levels"),
    pytest.param({"payload": "x" * 2**24}, r"max_state_bytes", id="huge string"),
    pytest.param({"id": ""}, r"non-empty.* at `\$\.id`", id="empty id"),
    pytest.param({"id": "a\x00b"}, r"NUL.* at `\$\.id`", id="NUL in id"),
    pytest.param({"id": "x" * 256}, r"at most 255.* at `\$\.id`", id="long id"),
    pytest.param({"id": 7}, r"must be a string.* at `\$\.id`", id="int id"),
    pytest.param({"version": -1}, r"\$\.version", id="negative version"),
    pytest.param({"version": 2**31}, r"\$\.version", id="version over 32 bits"),
    pytest.param({"version": True}, r"\$\.version", id="bool version"),
]


@pytest.mark.parametrize(("fields", "where"), BAD_STATES)
async def test_a_state_that_would_not_read_back_is_refused(make_store, fields, where):
    """The store refuses it, naming the aggregate and the path, and is left as it was."""
    store = make_store(Order)
    fields = {"id": "o", **fields}
    with pytest.raises(InvalidStateError, match=where) as info:
        await store.persist(Order(**fields))
    assert isinstance(info.value, StoreError) and isinstance(info.value, ValueError)
    assert info.value.path.startswith("$")
    assert await store.retrieve(["o"]) == []
    # The aggregate is not bricked: ordinary commands to it work as before.
    stored = await store.persist(Order(id="o"))
    for n in range(20):
        stored = await store.persist(msgspec.structs.replace(stored, status=f"step {n}"))
    assert (await store.retrieve(["o"]))[0] == stored


async def test_a_refused_update_leaves_the_aggregate_readable(make_store):
    """A bad update of a stored aggregate is refused; its latest state still reads back."""
    store = make_store(Order)
    stored = await store.persist(Order(id="o", items=[{"sku": "a"}]))
    with pytest.raises(InvalidStateError, match=r"'o'"):
        await store.persist(msgspec.structs.replace(stored, items=[{1: "x"}]))
    assert await store.retrieve(["o"]) == [stored]
    assert (await store.persist(stored)).version == 2


async def test_persist_returns_what_later_reads_return(make_store):
    """Values msgspec normalizes (tuples, sets) come back from persist as reads give them."""
    store = make_store(Order)
    stored = await store.persist(Order(id="o", payload={"t": (1, 2), "s": {3}, "b": b"\x00"}))
    assert stored.payload == {"t": [1, 2], "s": [3], "b": b"\x00"}
    assert await store.retrieve(["o"]) == [stored]


def _depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def _deeper(frames: int, then: Any) -> Any:
    return then() if frames <= 0 else _deeper(frames - 1, then)


async def test_a_deep_state_reads_back_from_a_much_deeper_stack(make_store):
    """A state nested near the recursion limit is stored, then read back 250 frames deeper."""
    store = make_store(Order)
    stored = await store.persist(Order(id="o", payload=nested(sys.getrecursionlimit() - 60)))

    async def deeper(frames: int) -> list[Order]:
        return await deeper(frames - 1) if frames else await store.retrieve(["o"])

    [read_back] = await deeper(250)
    assert read_back.version == stored.version == 1
    assert msgspec.msgpack.encode(read_back) == msgspec.msgpack.encode(stored)


def test_a_deep_state_decodes_on_a_nearly_full_stack():
    """Decoding falls back to a fresh stack when the caller's is too deep: any depth works."""
    codec = AggregateCodec(Order)
    stored, encoded = codec.next_version(Order(id="o", payload=nested(800)))
    headroom = sys.getrecursionlimit() - _depth()
    assert _deeper(headroom - 20, lambda: codec.decode(encoded, "o", 1)) == stored


async def test_a_deep_state_turns_into_plain_data_from_a_deep_stack(make_store):
    """to_dict() of a stored state nested 900 levels deep works 200 frames deeper, as the
    conflict path calls it; a state holding a cycle is a TypeError naming the aggregate."""
    store = make_store(Order)
    stored = await store.persist(Order(id="o", payload=nested(900)))
    headroom = sys.getrecursionlimit() - _depth()
    assert _deeper(200, stored.to_dict) == _deeper(headroom - 20, stored.to_dict)
    assert _deeper(200, stored.to_dict)["payload"] == nested(900)
    with pytest.raises(TypeError, match=r"aggregate 'c' contains a cycle .* at `\$\.payload"):
        Order(id="c", payload=cyclic()).to_dict()


def test_the_state_size_limit_is_a_store_setting():
    """max_state_bytes bounds one encoded state; a bad setting fails at construction."""
    codec = AggregateCodec(Order, max_state_bytes=100)
    with pytest.raises(InvalidStateError, match="at most 100"):
        codec.next_version(Order(id="o", payload="x" * 200))
    for bad in (0, -1, True, 1.5):
        with pytest.raises((TypeError, ValueError)):
            AggregateCodec(Order, max_state_bytes=bad)


def test_invalid_state_error_is_exported_from_both_places():
    """InvalidStateError is one class, importable from the package and from its stores."""
    assert InvalidStateError is StoresInvalidStateError


async def test_retrieve_of_an_id_that_cannot_exist_finds_nothing(make_store):
    """Ids no store could hold (empty, NUL, too long) are simply not found; non-strings err."""
    store = make_store(Order)
    assert await store.retrieve(["", "a\x00", "x" * 300]) == []
    assert await store.retrieve_version("", 1) is None
    with pytest.raises(TypeError, match="strings"):
        await store.retrieve([7])  # type: ignore[list-item]


# --- property: whatever is accepted reads back as persist returned it ------------------------

_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_values = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=4) | st.integers(-3, 3), inner, max_size=4)
        | st.tuples(inner, inner)
    ),
    max_leaves=20,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(status=_values, items=_values, payload=_values)
async def test_what_is_accepted_reads_back_as_persist_returned_it(
    make_store, status, items, payload
):
    """Any values in typed or untyped fields: refused with InvalidStateError, or read back
    exactly (encoding-equal, so NaN compares) as persist returned them."""
    store = make_store(Order)
    aggregate_id = uuid.uuid4().hex
    refused: InvalidStateError | None = None
    try:
        stored = await store.persist(
            Order(id=aggregate_id, status=status, items=items, payload=payload)
        )
    except InvalidStateError as exc:
        refused = exc
    if refused is not None:
        assert refused.aggregate_id == aggregate_id
        assert await store.retrieve([aggregate_id]) == []
        return
    [read_back] = await store.retrieve([aggregate_id])
    assert msgspec.msgpack.encode(read_back) == msgspec.msgpack.encode(stored)
    assert isinstance(read_back.status, str)
