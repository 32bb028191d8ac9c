"""The command-id rule (API.md section 8) at every door that takes an id: a string of 1 to 255
characters, valid Unicode, no control characters. Anything else is the ConfigurationError that
`Command(command_id=...)` gives, raised before a store or its driver sees it."""

from __future__ import annotations

import copy
import itertools
import sqlite3
import uuid
import weakref
from collections.abc import Callable
from contextlib import closing
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cqrs_resilience import ConfigurationError, InMemoryRepository, command_scope
from cqrs_resilience.stores import SQLiteRepository
from cqrs_resilience.stores._sql import TABLES
from tests.conftest_stores import DurableStore
from tests.test_idempotency import ENTRY_POINTS, Account, Deposit, entry_points

BAD_IDS = [
    pytest.param("", id="empty"),
    pytest.param("\x00", id="NUL"),
    pytest.param("a\nb", id="newline"),
    pytest.param("\x7f", id="DEL"),
    pytest.param("x" * 300, id="300 characters"),
    pytest.param("\ud800", id="lone surrogate"),
    pytest.param(uuid.UUID(int=7), id="UUID"),
    pytest.param(7, id="int"),
]
GOOD_IDS = ["x" * 255, "commande-reçue-à-Zürich", "注文-1", "order-🚀-1", "a b: c/d?e=f"]


def refused_by_command(command_id: Any) -> str | None:
    """What `Command(command_id=...)` says of this id, None if it takes it: every door must
    say the same."""
    try:
        Deposit(command_id=command_id, account_id="a", amount=1)
    except ConfigurationError as exc:
        return str(exc)
    return None


def refusal(command_id: Any) -> str:
    """What `Command(command_id=...)` says of an id it refuses."""
    message = refused_by_command(command_id)
    assert message is not None, f"Command() takes {command_id!r}"
    return message


@pytest.fixture
def everything_stored(store_kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """A function giving all a store holds (every table, or the in-memory store's dicts)."""
    if store_kind == "memory":

        def in_memory(store: InMemoryRepository[Any]) -> Any:
            kept = (store._latest, store._states, store._command_keys, store._writes)
            return copy.deepcopy(kept)

        return in_memory
    if store_kind == "postgres":
        database = DurableStore("postgres", request.getfixturevalue("pg_database"))
        return lambda store: [database.execute(f"SELECT * FROM {t} ORDER BY 1, 2") for t in TABLES]

    def in_sqlite(store: SQLiteRepository[Any]) -> Any:
        with closing(sqlite3.connect(store.path)) as conn:
            return [sorted(conn.execute(f"SELECT * FROM {t}")) for t in TABLES]

    return in_sqlite


async def a_store_with_history(make_store: Any) -> Any:
    """A store holding one aggregate written twice, under two command ids."""
    store = make_store(Account)
    first = await store.persist(Account(id="a", balance=1), command_id="c-1")
    await store.persist(msgspec.structs.replace(first, balance=2), command_id="c-2")
    return store


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_persist_refuses_a_bad_command_id(make_store, everything_stored, bad):
    """persist(..., command_id=) with a bad id raises what Command() raises; nothing stored."""
    store = await a_store_with_history(make_store)
    [latest] = await store.retrieve(["a"])
    before = everything_stored(store)
    for aggregate in (latest, Account(id="b")):  # an update, and a new aggregate
        with pytest.raises(ConfigurationError) as info:
            await store.persist(aggregate, command_id=bad)
        assert str(info.value) == refusal(bad)
    assert everything_stored(store) == before


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_command_scope_refuses_a_bad_id(make_store, everything_stored, bad):
    """command_scope() with a bad id, bare or on a command, raises what Command() raises,
    before its block runs: nothing is written under it."""
    store = await a_store_with_history(make_store)
    before = everything_stored(store)
    unchecked = Deposit(account_id="b", amount=1)
    unchecked.command_id = bad  # assigned after construction, past the check

    class PlainCommand:
        command_id = bad

    for given_ in (bad, unchecked, PlainCommand()):
        with pytest.raises(ConfigurationError) as info, command_scope(given_):
            await store.persist(Account(id="b"))
        assert str(info.value) == refusal(bad)
    assert everything_stored(store) == before


def test_command_scope_refuses_an_empty_id_and_keeps_none_for_off():
    """command_scope("") is refused (it used to drop the second write under that id);
    command_scope(None) still turns recording off."""
    with pytest.raises(ConfigurationError, match="non-empty"), command_scope(""):
        pass
    with command_scope(None):
        pass


class PlainDeposit:
    """A command that is no library `Command`: nothing checked its id."""

    def __init__(self, command_id: Any, account_id: str, amount: int) -> None:
        self.command_id = command_id
        self.account_id = account_id
        self.amount = amount


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("bad", BAD_IDS)
async def test_a_command_that_skipped_its_id_check_is_refused_at_its_first_write(
    make_store, everything_stored, entry, bad
):
    """handle(), retry(), resolve_conflicts() and a pipeline never record a write under a
    bad id that reached them unchecked (an id assigned later, a plain class): the write is
    refused with what Command() raises, and nothing is stored."""
    store = await a_store_with_history(make_store)
    before = everything_stored(store)
    run = entry_points(store)[entry]
    assigned = Deposit(account_id="b", amount=1)
    assigned.command_id = bad
    for command in (assigned, PlainDeposit(bad, "b", 1)):
        with pytest.raises(ConfigurationError) as info:
            await run(command)
        assert str(info.value) == refusal(bad)
    assert everything_stored(store) == before


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_was_processed_answers_false_for_an_id_never_storable(make_store, bad):
    """A lookup by an id no write could be recorded under answers False, on every store,
    never a driver's error; an id that is no string is the ConfigurationError of Command()."""
    store = await a_store_with_history(make_store)
    if isinstance(bad, str):
        assert await store.was_processed(bad, "a") is False
    else:
        with pytest.raises(ConfigurationError) as info:
            await store.was_processed(bad, "a")
        assert str(info.value) == refusal(bad)
    for aggregate_id in ("", "a\x00", "\ud800", "x" * 300):  # nor an unstorable aggregate id
        assert await store.was_processed("c-1", aggregate_id) is False


@pytest.mark.parametrize("good", GOOD_IDS)
async def test_long_non_ascii_and_emoji_ids_work_at_every_door(make_store, good):
    """255 characters, accented and CJK letters, emoji: accepted at every door, recorded,
    and a resend under the id gets the first outcome."""
    store = make_store(Account)
    assert Deposit(command_id=good, account_id="a", amount=1).command_id == good
    stored = await store.persist(Account(id="a", balance=1), command_id=good)
    assert await store.persist(Account(id="a", balance=1), command_id=good) == stored
    with command_scope(good):
        assert await store.persist(Account(id="b", balance=1)) == Account(
            id="b", balance=1, version=1
        )
    assert await store.was_processed(good, "a") and await store.was_processed(good, "b")
    run = entry_points(store)["handle"]
    assert await run(PlainDeposit(good[:250] + "-h", "c", 5)) == 5


async def test_an_aggregate_id_keeps_its_own_looser_rule(make_store):
    """Aggregate ids may hold control characters other than NUL, as before: an aggregate
    stored under a tab or a newline stays readable and writable."""
    store = make_store(Account)
    for aggregate_id in ("tab\there", "line\nbreak", "del\x7f"):
        stored = await store.persist(Account(id=aggregate_id))
        assert await store.retrieve([aggregate_id]) == [stored]
        assert (await store.persist(stored, command_id="ok")).version == 2


_characters = st.characters(exclude_categories=())  # surrogates and controls included
_candidates = st.one_of(
    st.text(_characters, max_size=12),
    st.text(st.sampled_from("a\x00\t\n\x1f\x7f\x80é🚀\ud800 "), max_size=6),
    st.text(st.sampled_from("ab"), min_size=250, max_size=260),
)
_aggregate_ids = (f"p-{n}" for n in itertools.count())
# One store for all of a test's examples (a PostgreSQL store per example runs out of clients).
_one_per_test: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(candidate=_candidates)
async def test_any_string_passes_everywhere_or_is_refused_everywhere_alike(make_store, candidate):
    """A string either passes the rule and round-trips through persist and was_processed on
    every store, or is refused at every door (construction, decoding, persist, command_scope)
    with the same message, and nothing is written."""
    store = _one_per_test.get(make_store) or _one_per_test.setdefault(
        make_store, make_store(Account)
    )
    aggregate_id = next(_aggregate_ids)
    message = refused_by_command(candidate)
    if message is None:
        stored = await store.persist(Account(id=aggregate_id), command_id=candidate)
        assert await store.was_processed(candidate, aggregate_id)
        assert await store.persist(Account(id=aggregate_id), command_id=candidate) == stored
        with command_scope(candidate):
            await store.persist(Account(id=f"{aggregate_id}-in-scope"))
        assert await store.was_processed(candidate, f"{aggregate_id}-in-scope")
        body = msgspec.json.encode({"command_id": candidate, "account_id": "a", "amount": 1})
        assert msgspec.json.decode(body, type=Deposit).command_id == candidate
        return
    doors: list[Callable[[], Any]] = [
        lambda: store.persist(Account(id=aggregate_id), command_id=candidate),
        lambda: _in_scope(store, candidate, aggregate_id),
    ]
    for door in doors:
        with pytest.raises(ConfigurationError) as info:
            await door()
        assert str(info.value) == message
    try:
        body = msgspec.json.encode({"command_id": candidate, "account_id": "a", "amount": 1})
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 body carries it
        body = None
    if body is not None:
        with pytest.raises(msgspec.ValidationError) as decoding:
            msgspec.json.decode(body, type=Deposit)
        assert str(decoding.value) == message
    assert await store.was_processed(candidate, aggregate_id) is False
    assert await store.retrieve([aggregate_id]) == []


async def _in_scope(store: Any, command_id: str, aggregate_id: str) -> None:
    with command_scope(command_id):
        await store.persist(Account(id=aggregate_id))
