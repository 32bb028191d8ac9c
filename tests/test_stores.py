"""The repository contract on every store, and how the durable stores fail."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cqrs_resilience import (
    Aggregate,
    Command,
    ConcurrencyError,
    FakeClock,
    IdempotencyKeyReuseError,
    InMemoryRepository,
    InvalidStateError,
    TransientError,
    VersionPrunedError,
    command_scope,
    stores,
)
from cqrs_resilience._idempotency import fingerprint
from cqrs_resilience._retention import PRUNE_BATCH, PRUNE_EVERY_S
from cqrs_resilience.stores import (
    CorruptStateError,
    PostgresRepository,
    SchemaError,
    SQLiteRepository,
    StoreClosedError,
    StoreConfigurationError,
    StoreError,
)
from cqrs_resilience.stores._errors import map_sqlite_error, postgres_errors
from cqrs_resilience.stores._sqlite_reads import INLINE_READ_BYTES
from tests.conftest_stores import reader_thread_blocked, writer_thread_blocked


class Account(Aggregate, kw_only=True):
    owner: str = ""
    balance: int = 0
    tags: list[str] = msgspec.field(default_factory=list)


def bump(account: Account, **changes: Any) -> Account:
    return msgspec.structs.replace(account, **changes)


# --- the contract, on InMemoryRepository, SQLiteRepository and PostgresRepository -------------


async def test_create_stores_version_one(make_store):
    """A new aggregate (version 0) is stored as version 1 and read back whole."""
    store = make_store(Account)
    stored = await store.persist(Account(id="a", owner="ann", tags=["x"]))
    assert stored == Account(id="a", version=1, owner="ann", tags=["x"])
    assert await store.retrieve(["a"]) == [stored]


async def test_update_stores_next_version(make_store):
    """Persisting what was read stores it as the next version."""
    store = make_store(Account)
    await store.persist(Account(id="a", balance=1))
    [read] = await store.retrieve(["a"])
    stored = await store.persist(bump(read, balance=2))
    assert stored.version == 2
    assert await store.retrieve(["a"]) == [Account(id="a", version=2, balance=2)]


async def test_stale_write_is_a_concurrency_error(make_store):
    """A write based on an old read fails with the expected and actual versions; nothing changes."""
    store, other = make_store(Account), make_store(Account)
    await store.persist(Account(id="a"))
    [mine] = await store.retrieve(["a"])
    [theirs] = await other.retrieve(["a"])
    await other.persist(bump(theirs, balance=5))
    with pytest.raises(ConcurrencyError) as info:
        await store.persist(bump(mine, balance=7))
    assert (info.value.aggregate_id, info.value.expected_version) == ("a", 1)
    assert info.value.actual_version == 2
    assert await store.retrieve(["a"]) == [Account(id="a", version=2, balance=5)]


async def test_creating_an_existing_id_is_a_concurrency_error(make_store):
    """A second 'new' aggregate with a stored id conflicts at version 0."""
    store = make_store(Account)
    await store.persist(Account(id="a", owner="first"))
    with pytest.raises(ConcurrencyError) as info:
        await store.persist(Account(id="a", owner="second"))
    assert (info.value.expected_version, info.value.actual_version) == (0, 1)
    assert (await store.retrieve(["a"]))[0].owner == "first"


async def test_version_ahead_of_the_store_is_a_concurrency_error(make_store):
    """A version the store never had is refused and leaves no trace."""
    store = make_store(Account)
    with pytest.raises(ConcurrencyError) as info:
        await store.persist(Account(id="a", version=3))
    assert (info.value.expected_version, info.value.actual_version) == (3, 0)
    assert await store.retrieve(["a"]) == []
    assert await store.retrieve_version("a", 4) is None


async def test_retrieve_keeps_the_order_asked_and_skips_missing_ids(make_store):
    """Results follow the ids asked for; unknown ids are left out, repeated ids repeated."""
    store = make_store(Account)
    for aggregate_id in "abc":
        await store.persist(Account(id=aggregate_id, owner=aggregate_id))
    found = await store.retrieve(["c", "missing", "a", "b", "c"])
    assert [a.id for a in found] == ["c", "a", "b", "c"]
    assert await store.retrieve([]) == []


async def test_retrieve_version_gives_every_version(make_store):
    """Each stored version stays readable, for three-way merges; others are None."""
    store = make_store(Account)
    account = await store.persist(Account(id="a", balance=0))
    for balance in range(1, 4):
        account = await store.persist(bump(account, balance=balance))
    for version in range(1, 5):
        assert await store.retrieve_version("a", version) == Account(
            id="a", version=version, balance=version - 1
        )
    for version in (0, 5, -1):
        assert await store.retrieve_version("a", version) is None
    assert await store.retrieve_version("missing", 1) is None


@pytest.mark.parametrize("version", [True, "1", 1.0, None, [1]])
async def test_retrieve_version_refuses_a_version_that_is_no_int(make_store, version):
    """A command's expected_version is untrusted: anything but an int is a TypeError on
    every store, never a row read under a coerced number."""
    store = make_store(Account)
    await store.persist(Account(id="a"))
    with pytest.raises(TypeError, match="version must be an int"):
        await store.retrieve_version("a", version)


async def test_retrieve_version_of_a_version_no_store_could_hold_is_none(make_store):
    """Versions beyond the 32-bit column (or absurdly large) are never found, not an
    overflow from the driver."""
    store = make_store(Account)
    await store.persist(Account(id="a"))
    for version in (2**31 - 1, 2**31, 2**63, 10**30):
        assert await store.retrieve_version("a", version) is None


async def test_repeated_command_returns_the_first_outcome(make_store):
    """The same write under the same command id is stored once; the repeat gets the first result."""
    store = make_store(Account)
    first = await store.persist(Account(id="a", balance=1), command_id="cmd-1")
    again = await store.persist(Account(id="a", balance=1), command_id="cmd-1")
    assert again == first == Account(id="a", version=1, balance=1)
    assert await store.retrieve_version("a", 2) is None
    assert await store.was_processed("cmd-1", "a")
    assert not await store.was_processed("cmd-2", "a")


async def test_a_different_write_under_a_used_id_is_refused(make_store):
    """A used command id with another state is refused, never answered with the old outcome."""
    store = make_store(Account)
    first = await store.persist(Account(id="a", balance=1), command_id="cmd-1")
    with pytest.raises(IdempotencyKeyReuseError, match="cmd-1") as info:
        await store.persist(Account(id="a", balance=99), command_id="cmd-1")
    assert (info.value.command_id, info.value.aggregate_id) == ("cmd-1", "a")
    assert await store.retrieve(["a"]) == [first]


async def test_command_scope_supplies_the_command_id(make_store):
    """Inside a `command_scope` every write is recorded under its id, each applied once."""
    store = make_store(Account)
    with command_scope("cmd-1"):
        created = await store.persist(Account(id="a", balance=1))
        updated = await store.persist(bump(created, balance=2))
    assert updated.version == 2
    with command_scope("cmd-1"):  # the command again: both writes answered, none applied
        assert await store.persist(Account(id="a", balance=1)) == created
        assert await store.persist(bump(created, balance=2)) == updated
    assert await store.was_processed("cmd-1", "a")
    assert await store.retrieve(["a"]) == [updated]


async def test_repeat_after_a_newer_write_returns_the_first_outcome(make_store):
    """A repeat whose read version is stale by now still gets its first outcome, not a conflict."""
    store, other = make_store(Account), make_store(Account)
    created = await store.persist(Account(id="a"))
    mine = await store.persist(bump(created, balance=1), command_id="cmd-1")
    [latest] = await other.retrieve(["a"])
    await other.persist(bump(latest, balance=2), command_id="cmd-2")
    repeat = await store.persist(bump(created, balance=1), command_id="cmd-1")
    assert repeat == mine == Account(id="a", version=2, balance=1)
    assert (await store.retrieve(["a"]))[0] == Account(id="a", version=3, balance=2)


async def test_one_command_may_write_several_aggregates(make_store):
    """The command id is recorded per aggregate: one command can write two of them once each."""
    store = make_store(Account)
    a = await store.persist(Account(id="a"), command_id="transfer")
    b = await store.persist(Account(id="b"), command_id="transfer")
    assert (a.version, b.version) == (1, 1)
    assert await store.persist(Account(id="b"), command_id="transfer") == b
    assert await store.was_processed("transfer", "a")
    assert await store.was_processed("transfer", "b")


async def test_a_failed_write_does_not_record_its_command(make_store):
    """A conflict leaves the command unprocessed, so its retry after a re-read is applied."""
    store = make_store(Account)
    await store.persist(Account(id="a"))
    with pytest.raises(ConcurrencyError):
        await store.persist(Account(id="a", balance=5), command_id="cmd-1")
    assert not await store.was_processed("cmd-1", "a")
    [latest] = await store.retrieve(["a"])
    assert (await store.persist(bump(latest, balance=5), command_id="cmd-1")).version == 2


class Deposit(Command[None]):
    account_id: str
    amount: int


async def _send(store: Any, command: Deposit) -> Account:
    """The command's write of its account (a new one), in the command's scope."""
    with command_scope(command):
        stored: Account = await store.persist(Account(id=command.account_id))
        return stored


async def test_two_commands_racing_for_one_id_on_two_aggregates_leave_one(make_store):
    """Two different commands under one id, written at once to different aggregates: one is
    stored, the other refused; never both."""
    clients = [make_store(Account), make_store(Account)]
    for n, client in enumerate(clients):  # the tables made, each client connected
        await client.persist(Account(id=f"made-{n}"))
    first, second = Deposit(account_id="a", amount=1), Deposit(account_id="b", amount=2)
    second.command_id = first.command_id
    outcomes = await asyncio.gather(
        _send(clients[0], first), _send(clients[1], second), return_exceptions=True
    )
    assert sorted(type(o).__name__ for o in outcomes) == ["Account", "IdempotencyKeyReuseError"]
    stored = await clients[0].retrieve(["a", "b"])
    assert [a.id for a in stored] == [o.id for o in outcomes if isinstance(o, Account)]


async def test_command_ids_recorded_by_a_store_before_0_1_0_are_honored(durable_store):
    """A store made before 0.1.0 (its command records in `command_keys`) keeps refusing a
    different command under a recorded id and answering a resend, until retention prunes them."""
    clock = FakeClock()
    store = durable_store.open(Account, keep_commands_s=3600, clock=clock)
    sent = Deposit(account_id="a", amount=1)
    created = await store.persist(Account(id="a"))  # the tables, and the command's version
    digest, now = fingerprint(sent), clock.time()
    # What the release before wrote for the command: its key, and its write of "a".
    durable_store.execute(
        "INSERT INTO command_keys (command_id, fingerprint, recorded_at) VALUES (%s, %s, %s)",
        (sent.command_id, digest, now),
    )
    durable_store.execute(
        "INSERT INTO processed_writes"
        " (command_id, aggregate_id, seq, fingerprint, version, recorded_at)"
        " VALUES (%s, 'Account:a', 1, %s, 1, %s)",
        (sent.command_id, digest, now),
    )
    other = Deposit(account_id="b", amount=2)
    other.command_id = sent.command_id
    with pytest.raises(IdempotencyKeyReuseError):  # on another aggregate
        await _send(store, other)
    assert await _send(store, sent) == created  # the resend: its first outcome
    clock.advance(3601 + PRUNE_EVERY_S)
    await store.persist(Account(id="c"))  # a write prunes what expired
    assert durable_store.execute("SELECT command_id FROM command_keys") == []
    assert (await _send(store, other)).id == "b"


async def test_a_pruning_takes_a_batch_of_expired_commands_with_their_writes(durable_store):
    """One pruning removes `PRUNE_BATCH` expired commands and each one's write, so records
    stay bounded at a write per command for up to that many commands a pruning."""
    clock = FakeClock()
    store = durable_store.open(Account, keep_commands_s=3600, clock=clock)
    await store.persist(Account(id="a"))
    for n in range(PRUNE_BATCH):
        with command_scope(f"create-{n}"):
            await store.persist(Account(id=f"account-{n}"))
    clock.advance(3601 + PRUNE_EVERY_S)
    await store.persist(Account(id="b"))  # a write prunes what expired
    assert durable_store.execute("SELECT count(*) FROM processed_writes") == [(0,)]


async def test_concurrent_writers_of_one_version_leave_one_winner(make_store):
    """Racing writes from one read: exactly one is stored, the others conflict."""
    store = make_store(Account)
    created = await store.persist(Account(id="a"))
    clients = [make_store(Account) for _ in range(4)]
    results = await asyncio.gather(
        *(c.persist(bump(created, balance=n)) for n, c in enumerate(clients)),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, Account)]
    assert len(winners) == 1
    assert all(isinstance(r, ConcurrencyError) for r in results if r not in winners)
    assert await store.retrieve(["a"]) == winners


_operation = st.tuples(
    st.integers(0, 2),  # which aggregate
    st.integers(-2, 1),  # read version offset: stale, current, or ahead
    st.sampled_from([None, "c0", "c1", "c2"]),  # command id, reused to provoke repeats
    st.integers(0, 9),  # new balance
)


async def _outcome(persisting: Any) -> Any:
    try:
        return await persisting
    except ConcurrencyError as exc:
        return ("conflict", exc.aggregate_id, exc.expected_version, exc.actual_version)
    except IdempotencyKeyReuseError as exc:
        return ("reused", exc.command_id, exc.aggregate_id)
    except InvalidStateError as exc:
        return ("invalid", exc.aggregate_id, exc.path)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations=st.lists(_operation, max_size=12))
async def test_durable_store_matches_the_reference(durable_store, operations):
    """Any sequence of writes, repeats and stale writes ends as in InMemoryRepository."""
    prefix = uuid.uuid4().hex  # examples share the database; their ids do not overlap
    ids = [f"{prefix}-{n}" for n in range(3)]
    reference = InMemoryRepository(Account)
    store = durable_store.open(Account)
    try:
        for which, offset, command, balance in operations:
            [current] = await reference.retrieve([ids[which]]) or [Account(id=ids[which])]
            proposed = bump(current, version=current.version + offset, balance=balance)
            command_id = None if command is None else f"{prefix}-{command}"
            expected = await _outcome(reference.persist(proposed, command_id=command_id))
            assert await _outcome(store.persist(proposed, command_id=command_id)) == expected
        assert await store.retrieve(ids) == await reference.retrieve(ids)
        for aggregate_id in ids:
            for version in range(6):
                assert await store.retrieve_version(
                    aggregate_id, version
                ) == await reference.retrieve_version(aggregate_id, version)
            for command in ("c0", "c1", "c2"):
                assert await store.was_processed(
                    f"{prefix}-{command}", aggregate_id
                ) == await reference.was_processed(f"{prefix}-{command}", aggregate_id)
    finally:
        await store.close()


# --- errors on both durable stores ------------------------------------------------------------


async def test_corrupt_row_is_a_clear_error(durable_store):
    """Garbage bytes in a row raise CorruptStateError naming the id and version, cause chained."""
    store = durable_store.open(Account)
    await store.persist(Account(id="a"))
    durable_store.execute(
        "UPDATE aggregate_versions SET state = %s WHERE aggregate_id = %s",
        (b"\xc1\xff", "Account:a"),
    )
    for reading in (store.retrieve(["a"]), store.retrieve_version("a", 1)):
        with pytest.raises(CorruptStateError, match=r"'a' version 1") as info:
            await reading
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value.__cause__, msgspec.DecodeError)
        assert (info.value.aggregate_id, info.value.version) == ("a", 1)


async def test_row_of_another_shape_is_corrupt(durable_store):
    """Valid msgpack that is not an Account, or claims another id, is reported as corrupt."""
    store = durable_store.open(Account)
    await store.persist(Account(id="a"))
    await store.persist(Account(id="b"))
    wrong_type = msgspec.msgpack.encode({"id": "a", "version": 1, "balance": "lots"})
    other_id = msgspec.msgpack.encode(Account(id="z", version=1))
    update = "UPDATE aggregate_versions SET state = %s WHERE aggregate_id = %s"
    durable_store.execute(update, (wrong_type, "Account:a"))
    durable_store.execute(update, (other_id, "Account:b"))
    with pytest.raises(CorruptStateError, match="balance") as info:
        await store.retrieve(["a"])
    assert isinstance(info.value.__cause__, msgspec.ValidationError)
    with pytest.raises(CorruptStateError, match="'z'"):
        await store.retrieve(["b"])


async def test_dropped_table_is_a_schema_error(durable_store):
    """A table dropped under an open store gives a SchemaError naming it, for every call."""
    store = durable_store.open(Account)
    await store.persist(Account(id="a"))
    durable_store.execute("DROP TABLE aggregate_versions")
    for call in (
        store.retrieve(["a"]),
        store.retrieve_version("a", 1),
        store.persist(Account(id="b")),
    ):
        with pytest.raises(SchemaError, match="aggregate_versions"):
            await call


async def test_a_persist_that_fails_midway_writes_nothing(durable_store):
    """When recording the command fails, the version written before it is rolled back too."""
    store = durable_store.open(Account)
    await store.persist(Account(id="a"))
    durable_store.execute("DROP TABLE processed_writes")
    [latest] = await store.retrieve(["a"])
    with pytest.raises(SchemaError, match="processed_writes"):
        await store.persist(bump(latest, balance=5), command_id="cmd-1")
    assert await store.retrieve(["a"]) == [latest]
    assert await store.retrieve_version("a", 2) is None


async def test_closed_repository_says_so(durable_store):
    """Every call on a closed repository raises StoreClosedError; closing again is harmless."""
    store = durable_store.open(Account)
    await store.persist(Account(id="a"))
    await store.close()
    await store.close()
    for call in (
        store.retrieve(["a"]),
        store.retrieve_version("a", 1),
        store.persist(Account(id="b")),
        store.was_processed("c", "a"),
    ):
        with pytest.raises(StoreClosedError, match="closed"):
            await call


async def test_context_manager_opens_and_closes(durable_store):
    """`async with` creates the tables on entry and closes the repository on exit."""
    async with durable_store.open(Account) as store:
        assert durable_store.execute("SELECT count(*) FROM aggregate_versions") == [(0,)]
        await store.persist(Account(id="a"))
    with pytest.raises(StoreClosedError):
        await store.retrieve(["a"])


async def test_tables_are_created_once_and_shared(durable_store):
    """A second repository on the same database sees what the first stored."""
    first = durable_store.open(Account)
    await first.persist(Account(id="a", owner="ann"))
    second = durable_store.open(Account)
    assert [a.owner for a in await second.retrieve(["a"])] == ["ann"]


async def test_unencodable_state_raises_before_touching_the_database(durable_store):
    """A value msgspec cannot encode is refused, naming where it is, and nothing is written."""

    class Loose(Aggregate, kw_only=True):
        payload: Any = None

    store = durable_store.open(Loose)
    with pytest.raises(InvalidStateError, match=r"type object .* at `\$\.payload`"):
        await store.persist(Loose(id="a", payload=object()))
    assert await store.retrieve(["a"]) == []


async def test_wrong_aggregate_type_is_refused(durable_store):
    """A repository stores one aggregate type; building one for a non-aggregate is an error."""
    store = durable_store.open(Account)

    class Other(Aggregate, kw_only=True):
        pass

    for wrong in (Other(id="a"), None, {"id": "a"}, "a"):
        with pytest.raises(TypeError, match="stores Account"):
            await store.persist(wrong)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Aggregate"):
        durable_store.open(dict)  # type: ignore[type-var]


# --- namespaces: many aggregate types in one database -----------------------------------------


class User(Aggregate, kw_only=True):
    name: str = ""


async def test_aggregate_types_with_the_same_id_do_not_meet(durable_store):
    """An Account "1" and a User "1" in one database are two streams, each from version 0."""
    accounts, users = durable_store.open(Account), durable_store.open(User)
    assert (accounts.namespace, users.namespace) == ("Account", "User")
    account = await accounts.persist(Account(id="1", owner="ann"), command_id="cmd-1")
    assert await users.retrieve(["1"]) == []
    assert await users.retrieve_version("1", 1) is None
    assert not await users.was_processed("cmd-1", "1")
    # The same command id on the other type is a first write there, not a repeat.
    user = await users.persist(User(id="1", name="bob"), command_id="cmd-1")
    assert user == User(id="1", version=1, name="bob")
    user = await users.persist(bump(user, name="bo"))
    assert await accounts.retrieve(["1"]) == [account]
    assert await accounts.retrieve_version("1", 2) is None
    assert await users.retrieve(["1"]) == [user]
    assert await users.retrieve_version("1", 1) == User(id="1", version=1, name="bob")
    assert await accounts.was_processed("cmd-1", "1")
    assert await users.was_processed("cmd-1", "1")
    rows = durable_store.execute(
        "SELECT aggregate_id, version FROM aggregate_versions ORDER BY aggregate_id, version"
    )
    assert rows == [("Account:1", 1), ("User:1", 1), ("User:1", 2)]


async def test_ids_holding_colons_stay_apart_from_namespaces(durable_store):
    """The namespace ends at the first ":", so ids may contain colons freely."""
    store = durable_store.open(Account)
    stored = [await store.persist(Account(id=i)) for i in ("x:y", "x", ":", "::")]
    assert await store.retrieve(["x:y", "x", ":", "::"]) == stored
    assert await durable_store.open(Account, namespace="x").retrieve(["y", "x:y"]) == []


async def test_namespace_isolates_one_type_and_shares_across_types(durable_store):
    """Two namespaces of one type are isolated; a renamed class given the old one reads on."""
    eu, us = (
        durable_store.open(Account, namespace="eu"),
        durable_store.open(Account, namespace="us"),
    )
    assert eu.namespace == "eu"
    created = await eu.persist(Account(id="a", owner="eu"))
    assert await us.retrieve(["a"]) == []
    assert (await us.persist(Account(id="a", owner="us"))).version == 1
    assert [a.owner for a in await eu.retrieve(["a"])] == ["eu"]
    assert await durable_store.open(Account).retrieve(["a"]) == []  # default is "Account"

    class AccountV2(Account, kw_only=True):
        pass

    await durable_store.open(Account).persist(Account(id="b", balance=3))
    assert await durable_store.open(AccountV2).retrieve(["b"]) == []  # its own namespace
    renamed = durable_store.open(AccountV2, namespace="Account")
    [b] = await renamed.retrieve(["b"])
    assert (type(b), b.balance, b.version) == (AccountV2, 3, 1)
    assert (await renamed.persist(bump(b, balance=4))).version == 2
    assert await renamed.retrieve_version("b", 1) == AccountV2(id="b", version=1, balance=3)
    assert await eu.retrieve(["a"]) == [created]


@pytest.mark.parametrize("namespace", ["", "a:b", ":", 5])
def test_bad_namespace_is_refused(durable_target, namespace):
    """A namespace must be a non-empty str without ":"; the error names the field."""
    kind, target = durable_target
    cls = PostgresRepository if kind == "postgres" else SQLiteRepository
    with pytest.raises(ValueError, match="namespace"):
        cls(target, Account, namespace=namespace)


async def test_concurrency_error_names_the_plain_id(durable_store):
    """Errors speak of the aggregate's own id, never the stored key."""
    store = durable_store.open(Account, namespace="ledger")
    await store.persist(Account(id="a"))
    with pytest.raises(ConcurrencyError) as info:
        await store.persist(Account(id="a"))
    assert info.value.aggregate_id == "a"
    assert "ledger" not in str(info.value)
    other_id = msgspec.msgpack.encode(Account(id="ledger:a", version=1))
    durable_store.execute(
        "UPDATE aggregate_versions SET state = %s WHERE aggregate_id = %s", (other_id, "ledger:a")
    )
    with pytest.raises(CorruptStateError, match="'ledger:a'") as corrupt:
        await store.retrieve(["a"])
    assert corrupt.value.aggregate_id == "a"


# --- SQLite -----------------------------------------------------------------------------------


async def test_sqlite_locked_database_is_transient(sqlite_path):
    """A write blocked by another writer past busy_timeout is a TransientError; nothing written."""
    async with SQLiteRepository(sqlite_path, Account, busy_timeout=0.05) as store:
        created = await store.persist(Account(id="a"))
        blocker = sqlite3.connect(sqlite_path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(TransientError, match="locked") as info:
                await store.persist(bump(created, balance=1), command_id="cmd-1")
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
            assert "locked" in str(info.value.__cause__)
            assert await store.retrieve(["a"]) == [created]  # WAL: readers are not blocked
        finally:
            blocker.close()
        assert not await store.was_processed("cmd-1", "a")
        retried = await store.persist(bump(created, balance=1), command_id="cmd-1")
        assert retried.version == 2


async def test_sqlite_uses_wal(sqlite_path):
    """The file is switched to write-ahead logging, so readers never wait for writers."""
    async with SQLiteRepository(sqlite_path, Account):
        pass
    with sqlite3.connect(sqlite_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_sqlite_a_command_write_logs_four_pages(sqlite_path):
    """A command's write adds four pages to the file's log, each synced on commit: the
    version and its index, the command's records and their time index."""
    async with SQLiteRepository(sqlite_path, Account) as store:
        account = await store.persist(Account(id="a"))
        with closing(sqlite3.connect(sqlite_path)) as raw:
            for n in range(3):
                raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                with command_scope(f"deposit-{n}"):
                    account = await store.persist(bump(account, balance=n))
                _, logged, _ = raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                assert logged == 4


async def test_sqlite_a_state_of_1_5_kb_takes_half_a_page(sqlite_path):
    """Versions of a 1.5 KB state are stored two to a 4 KB page, none spilling into an
    overflow page of its own, so a read or a write of one touches few pages."""
    async with SQLiteRepository(sqlite_path, Account, keep_versions=None) as store:
        account = await store.persist(Account(id="a"))
        with closing(sqlite3.connect(sqlite_path)) as raw:
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            [(pages_before,)] = raw.execute("PRAGMA page_count")
            for n in range(20):
                account = await store.persist(bump(account, tags=[f"{n:040}"] * 35))
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            [(pages_after,)] = raw.execute("PRAGMA page_count")
    assert len(msgspec.msgpack.encode(account)) > 1500
    assert pages_after - pages_before <= 12


async def test_sqlite_a_file_made_before_0_1_0_keeps_working(sqlite_path):
    """A file whose versions table was made WITHOUT ROWID, as before 0.1.0, is read, written
    and pruned as any other."""
    with closing(sqlite3.connect(sqlite_path)) as raw:
        raw.execute(
            """CREATE TABLE aggregate_versions (
                aggregate_id TEXT NOT NULL,
                version INTEGER NOT NULL CHECK (version > 0),
                state BLOB NOT NULL,
                PRIMARY KEY (aggregate_id, version)
            ) WITHOUT ROWID"""
        )
    async with SQLiteRepository(sqlite_path, Account, keep_versions=4) as store:
        account = await store.persist(Account(id="a"))
        for n in range(1, 9):
            with command_scope(f"deposit-{n}"):
                account = await store.persist(bump(account, balance=n))
        assert await store.retrieve(["a"]) == [account]
        assert (await store.retrieve_version("a", 8)).balance == 7
        with pytest.raises(VersionPrunedError):
            await store.retrieve_version("a", 1)
        with command_scope("deposit-8"):  # a resend: its first outcome
            assert await store.persist(bump(account, version=8, balance=8)) == account
    with closing(sqlite3.connect(sqlite_path)) as raw:
        [(ddl,)] = raw.execute("SELECT sql FROM sqlite_master WHERE name = 'aggregate_versions'")
        assert "WITHOUT ROWID" in ddl


async def test_sqlite_retrieves_more_ids_than_one_query_binds(sqlite_path):
    """Thousands of ids come back complete and in order."""
    async with SQLiteRepository(sqlite_path, Account) as store:
        ids = [f"id-{n:04d}" for n in range(1200)]
        for aggregate_id in ids[::100]:
            await store.persist(Account(id=aggregate_id))
        found = await store.retrieve(list(reversed(ids)))
        assert [a.id for a in found] == list(reversed(ids[::100]))


async def _settled(*calls: Any) -> list[Any]:
    """Each call's result or the exception it raised, in order."""
    return await asyncio.gather(*calls, return_exceptions=True)


async def test_sqlite_writes_queued_together_commit_together_each_with_its_outcome(
    sqlite_path,
):
    """Writes that queue while the writer is busy commit in one transaction, and each gets
    its own outcome: stored, a conflict with a write before it in the same commit, a repeat,
    or a refused key reuse that rolls back only itself."""
    async with SQLiteRepository(sqlite_path, Account) as store:
        a = await store.persist(Account(id="a"), command_id="make-a")
        with writer_thread_blocked(store):
            calls = [
                store.persist(bump(a, balance=1), command_id="c1"),
                store.persist(bump(a, balance=2), command_id="c2"),  # same version as c1
                store.persist(Account(id="b", balance=3), command_id="c3"),
                store.persist(Account(id="a", balance=4), command_id="make-a"),  # reused id
                store.persist(Account(id="a"), command_id="make-a"),  # a resend
                store.persist(Account(id="d", balance=5)),
            ]
            settled = asyncio.ensure_future(_settled(*calls))
            await asyncio.sleep(0)
            assert not settled.done()
        c1, c2, c3, reused, resent, d = await settled
        assert c1 == bump(a, balance=1, version=2)
        assert isinstance(c2, ConcurrencyError) and c2.actual_version == 2
        assert c3 == Account(id="b", version=1, balance=3)
        assert isinstance(reused, IdempotencyKeyReuseError)
        assert resent == a
        assert d == Account(id="d", version=1, balance=5)
        assert await store.retrieve(["a", "b", "d"]) == [c1, c3, d]
        assert not await store.was_processed("c2", "a")


async def test_sqlite_writes_queued_together_fail_together_on_a_database_error(sqlite_path):
    """When the commit they share cannot happen (the file is locked past busy_timeout), every
    queued write gets a TransientError and none is stored; each can simply be retried."""
    async with SQLiteRepository(sqlite_path, Account, busy_timeout=0.05) as store:
        blocker = sqlite3.connect(sqlite_path, isolation_level=None)
        try:
            with writer_thread_blocked(store):
                blocker.execute("BEGIN IMMEDIATE")
                calls = [store.persist(Account(id=i), command_id=f"c-{i}") for i in "abc"]
                settled = asyncio.ensure_future(_settled(*calls))
                await asyncio.sleep(0)
            outcomes = await settled
        finally:
            blocker.close()
        assert all(isinstance(o, TransientError) for o in outcomes), outcomes
        assert await store.retrieve(["a", "b", "c"]) == []
        for i in "abc":
            assert not await store.was_processed(f"c-{i}", i)
            assert (await store.persist(Account(id=i), command_id=f"c-{i}")).version == 1


def test_sqlite_writes_from_two_threads_loops_commit_together(sqlite_path):
    """Writes from event loops on two threads that land in one commit each get their outcome
    on their own loop."""
    store = SQLiteRepository(sqlite_path, Account)
    asyncio.run(store.open())
    found: dict[str, Any] = {}
    both_queued = threading.Barrier(3, timeout=30)

    def writer(name: str) -> None:
        async def write() -> Account:
            persisting = asyncio.ensure_future(store.persist(Account(id=name)))
            await asyncio.sleep(0)  # queued behind the blocked writer thread
            both_queued.wait()
            return await persisting  # woken by its own loop, or never

        found[name] = asyncio.run(write())

    with writer_thread_blocked(store):
        threads = [
            threading.Thread(target=writer, args=(name,), daemon=True) for name in ("a", "b")
        ]
        for thread in threads:
            thread.start()
        both_queued.wait()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a writer was never told its outcome"
    assert found == {"a": Account(id="a", version=1), "b": Account(id="b", version=1)}

    async def read_and_close() -> list[Account]:
        try:
            return await store.retrieve(["a", "b"])
        finally:
            await store.close()

    assert asyncio.run(read_and_close()) == [found["a"], found["b"]]


async def test_sqlite_a_cancelled_writer_leaves_the_others_in_its_commit(sqlite_path):
    """Cancelling one queued write cancels its wait at once; the writes queued with it still
    commit, and its own resend gets the first outcome if it had been written."""
    async with SQLiteRepository(sqlite_path, Account) as store:
        with writer_thread_blocked(store):
            kept = asyncio.ensure_future(store.persist(Account(id="a"), command_id="keep"))
            dropped = asyncio.ensure_future(store.persist(Account(id="b"), command_id="drop"))
            await asyncio.sleep(0)
            dropped.cancel()
            with pytest.raises(asyncio.CancelledError):
                await dropped
        assert (await kept).version == 1
        resent = await store.persist(Account(id="b"), command_id="drop")
        assert resent == Account(id="b", version=1)
        assert await store.retrieve(["a", "b"]) == [await kept, resent]


async def test_sqlite_small_reads_do_not_wait_for_the_reader_thread(sqlite_path):
    """Reading one small aggregate runs on the event loop: a busy reader thread (a big read
    under way, say) does not hold it up, and it sees the last commit."""
    async with SQLiteRepository(sqlite_path, Account) as store:
        created = await store.persist(Account(id="a"))
        updated = await store.persist(bump(created, balance=5), command_id="c1")
        with reader_thread_blocked(store):
            found = await asyncio.wait_for(store.retrieve(["a"]), 5)
            assert found == [updated]
            assert await asyncio.wait_for(store.retrieve_version("a", 1), 5) == created
            assert await asyncio.wait_for(store.was_processed("c1", "a"), 5)
            assert await asyncio.wait_for(store.retrieve(["missing"]), 5) == []


async def test_sqlite_big_states_and_many_ids_read_back_whole(sqlite_path):
    """A state over `INLINE_READ_BYTES`, and several ids at once, are read on the reader
    thread: complete, equal to what was written, from every version."""
    big_tags = [f"tag-{n:06d}" for n in range(INLINE_READ_BYTES // 8)]
    async with SQLiteRepository(sqlite_path, Account) as store:
        small = await store.persist(Account(id="small"))
        big = await store.persist(Account(id="big", tags=big_tags))
        assert len(msgspec.msgpack.encode(big)) > INLINE_READ_BYTES
        bigger = await store.persist(bump(big, balance=1))
        with reader_thread_blocked(store):
            waiting = asyncio.ensure_future(store.retrieve(["big"]))
            await asyncio.sleep(0)
            assert not waiting.done()  # the big state waits for the reader thread
        assert await waiting == [bigger]
        assert await store.retrieve_version("big", 1) == big
        assert await store.retrieve(["big", "small"]) == [bigger, small]


def test_sqlite_reads_from_another_threads_loop(sqlite_path):
    """A repository read from event loops on two threads answers on both (the second thread
    reads through the reader thread: connections stay with their thread)."""

    async def write_and_read() -> Account:
        store = SQLiteRepository(sqlite_path, Account)
        created = await store.persist(Account(id="a", balance=3))
        assert await store.retrieve(["a"]) == [created]
        found: list[Any] = []
        other = threading.Thread(target=lambda: found.extend(asyncio.run(store.retrieve(["a"]))))
        other.start()
        await asyncio.to_thread(other.join, 30)
        await store.close()
        assert found == [created]
        return created

    assert asyncio.run(write_and_read()).balance == 3


async def test_sqlite_bad_path_is_a_configuration_error(tmp_path):
    """A file that is not a database, or a missing directory, is named in a non-retried error."""
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_bytes(b"these are not the bytes you are looking for" * 100)
    for path in (not_a_db, tmp_path / "missing" / "store.sqlite3"):
        store = SQLiteRepository(path, Account)
        with pytest.raises(StoreConfigurationError, match=path.name):
            await store.retrieve(["a"])
        await store.close()


async def test_sqlite_text_state_is_corrupt(sqlite_path):
    """A row whose state is text rather than bytes is reported as corrupt, not a TypeError."""
    async with SQLiteRepository(sqlite_path, Account) as store:
        await store.persist(Account(id="a"))
        with sqlite3.connect(sqlite_path) as raw:
            raw.execute("UPDATE aggregate_versions SET state = 'hello'")
        raw.close()
        with pytest.raises(CorruptStateError, match="state is str"):
            await store.retrieve(["a"])


def test_sqlite_other_constraint_violations_are_not_retried(tmp_path):
    """A real constraint error that is no version clash maps to StoreError, never transient."""
    with sqlite3.connect(tmp_path / "x.db") as raw:
        raw.execute("CREATE TABLE t (n INTEGER CHECK (n > 0))")
        with pytest.raises(sqlite3.IntegrityError) as info:
            raw.execute("INSERT INTO t VALUES (0)")
    mapped = map_sqlite_error(info.value, "insert")
    assert type(mapped) is StoreError
    assert "CHECK constraint failed" in str(mapped)


# --- PostgreSQL -------------------------------------------------------------------------------


@contextmanager
def socket_closed_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening) while held."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _with_password(dsn: str, **changes: str) -> str:
    from psycopg.conninfo import make_conninfo

    return make_conninfo(dsn, password="hunter2-secret", **changes)


@pytest.mark.postgres
async def test_postgres_wrong_database_is_a_clear_error_without_password(pg_dsn):
    """An unknown database or role says which, host included, and never shows the password."""
    for changes, named in (
        ({"dbname": "no_such_db"}, "no_such_db"),
        ({"user": "nobody_x"}, "nobody_x"),
    ):
        store = PostgresRepository(_with_password(pg_dsn, **changes), Account)
        with pytest.raises(StoreConfigurationError) as info:
            await store.open()
        message = str(info.value)
        assert named in message
        assert "127.0.0.1" in message
        assert "hunter2" not in message + repr(store) + str(info.value.__cause__)
        await store.close()


@pytest.mark.postgres
async def test_postgres_unreachable_server_is_transient_without_password(pg_dsn):
    """Connection refused may be a restart: TransientError naming the host, not the password."""
    with socket_closed_port() as port:
        store = PostgresRepository(_with_password(pg_dsn, port=str(port)), Account)
        with pytest.raises(TransientError) as info:
            await store.retrieve(["a"])
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "hunter2" not in str(info.value) + str(info.value.__cause__)
    await store.close()


def test_postgres_malformed_dsn_is_not_echoed():
    """A DSN that does not parse is refused without quoting it, even in the exception chain."""
    with pytest.raises(StoreConfigurationError) as info:
        PostgresRepository("host=db password=hunter2 secret", Account)
    assert "hunter2" not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


@pytest.mark.postgres
async def test_postgres_serialization_failure_is_transient(pg_database):
    """A real 40001 from the server maps to TransientError with the driver error chained."""
    import psycopg

    async with (
        await psycopg.AsyncConnection.connect(pg_database, autocommit=True) as a,
        await psycopg.AsyncConnection.connect(pg_database, autocommit=True) as b,
    ):
        await a.execute("CREATE TABLE t (k int PRIMARY KEY, n int)")
        await a.execute("INSERT INTO t VALUES (1, 0)")
        await a.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await a.execute("SELECT n FROM t")
        await b.execute("UPDATE t SET n = 1 WHERE k = 1")
        with pytest.raises(TransientError, match="40001") as info, postgres_errors("update"):
            await a.execute("UPDATE t SET n = 2 WHERE k = 1")
        assert isinstance(info.value.__cause__, psycopg.errors.SerializationFailure)
        await a.execute("ROLLBACK")


@pytest.mark.postgres
async def test_postgres_deadlock_is_transient(pg_database):
    """A real deadlock (40P01) between two transactions maps to TransientError."""
    import psycopg

    async with (
        await psycopg.AsyncConnection.connect(pg_database, autocommit=True) as a,
        await psycopg.AsyncConnection.connect(pg_database, autocommit=True) as b,
    ):
        await a.execute("CREATE TABLE t (k int PRIMARY KEY)")
        await a.execute("INSERT INTO t VALUES (1), (2)")
        for conn, first in ((a, 1), (b, 2)):
            await conn.execute("BEGIN")
            await conn.execute("SELECT * FROM t WHERE k = %s FOR UPDATE", (first,))

        async def lock(conn: Any, k: int) -> None:
            with postgres_errors(f"lock {k}"):
                await conn.execute("SELECT * FROM t WHERE k = %s FOR UPDATE", (k,))

        results = await asyncio.gather(lock(a, 2), lock(b, 1), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1
        assert isinstance(errors[0], TransientError)
        assert isinstance(errors[0].__cause__, psycopg.errors.DeadlockDetected)
        for conn in (a, b):
            await conn.execute("ROLLBACK")


@pytest.mark.postgres
async def test_postgres_other_server_errors_are_not_retried(pg_database):
    """Bad SQL or a constraint that is no version clash is a StoreError saying what failed."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(pg_database, autocommit=True) as conn:
        await conn.execute("CREATE TABLE t (n int CHECK (n > 0))")
        for statement, says in (("INSERT INTO t VALUES (0)", "23514"), ("SELEC 1", "42601")):
            with pytest.raises(StoreError, match=says) as info, postgres_errors("statement"):
                await conn.execute(statement)
            assert not isinstance(info.value, TransientError)


@pytest.mark.postgres
async def test_postgres_lost_connection_is_transient_and_writes_nothing(pg_database):
    """A connection the server kills fails the call as transient; nothing is written; a retry
    succeeds."""
    import psycopg

    async with PostgresRepository(pg_database, Account, min_size=1, max_size=1) as store:
        created = await store.persist(Account(id="a"))
        with psycopg.connect(pg_database, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        with pytest.raises(TransientError) as info:
            await store.persist(bump(created, balance=1), command_id="cmd-1")
        assert isinstance(info.value.__cause__, psycopg.OperationalError)
        assert await store.retrieve(["a"]) == [created]
        assert (await store.persist(bump(created, balance=1), command_id="cmd-1")).version == 2


@pytest.mark.postgres
async def test_postgres_pool_exhaustion_is_transient(pg_database):
    """No free connection within the pool timeout is TransientError (PoolTimeout chained)."""
    from psycopg_pool import AsyncConnectionPool, PoolTimeout

    async with AsyncConnectionPool(pg_database, min_size=1, max_size=1, timeout=0.2) as pool:
        store = PostgresRepository(pool, Account)
        await store.open()
        async with pool.connection():
            with pytest.raises(TransientError) as info:
                await store.retrieve(["a"])
        assert isinstance(info.value.__cause__, PoolTimeout)
        assert await store.retrieve(["a"]) == []
        await store.close()
        assert not pool.closed  # a pool passed in stays its owner's to close


@pytest.mark.postgres
async def test_postgres_pool_passed_in_may_make_any_rows(pg_database):
    """A pool whose connections return dict rows and do not autocommit works the same."""
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    kwargs = {"row_factory": dict_row, "autocommit": False}
    async with AsyncConnectionPool(pg_database, min_size=1, kwargs=kwargs) as pool:
        store = PostgresRepository(pool, Account)
        created = await store.persist(Account(id="a"), command_id="cmd-1")
        assert await store.persist(Account(id="a"), command_id="cmd-1") == created
        with pytest.raises(ConcurrencyError):
            await store.persist(Account(id="a"))
        assert await store.retrieve(["a"]) == [created]
        assert await store.retrieve_version("a", 1) == created
        await store.close()


@pytest.mark.postgres
async def test_postgres_closed_pool_passed_in_is_a_closed_error(pg_database):
    """A pool its owner closed makes calls raise StoreClosedError."""
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(pg_database, min_size=1, open=False)
    await pool.open()
    store = PostgresRepository(pool, Account)
    await store.persist(Account(id="a"))
    await pool.close()
    with pytest.raises(StoreClosedError):
        await store.retrieve(["a"])


@pytest.mark.postgres
async def test_postgres_tables_need_no_create_right_once_they_exist(pg_database):
    """A role that may only read, insert and delete (no CREATE) uses tables made before."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    async with PostgresRepository(pg_database, Account) as owner:
        await owner.persist(Account(id="a"))
    role = f"app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_database, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"REVOKE CREATE ON SCHEMA public FROM {role}, PUBLIC")
        tables = "aggregate_versions, processed_writes, command_keys, command_responses"
        admin.execute(f"GRANT SELECT, INSERT, DELETE ON {tables} TO {role}")
        admin.execute(f"GRANT UPDATE ON command_responses TO {role}")
    try:
        async with PostgresRepository(make_conninfo(pg_database, user=role), Account) as app:
            [a] = await app.retrieve(["a"])
            assert (await app.persist(a)).version == 2
    finally:
        with psycopg.connect(pg_database, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


def test_stores_import_without_psycopg():
    """`import cqrs_resilience.stores` works, and does not load psycopg, when it is missing."""
    code = (
        "import sys; sys.modules['psycopg'] = None; sys.modules['psycopg_pool'] = None\n"
        "import cqrs_resilience.stores as s\n"
        "from cqrs_resilience.stores import SQLiteRepository, PostgresRepository\n"
        "from cqrs_resilience._repository import Aggregate\n"
        "try:\n"
        "    PostgresRepository('dbname=x', Aggregate)\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert "pip install 'cqrs-resilience[postgres]'" in result.stdout


def test_stores_exports():
    """`cqrs_resilience.stores.__all__` is sorted and names exactly what it exports."""
    assert stores.__all__ == sorted(stores.__all__)
    # (pytest adds "@py_builtins" to modules of a package that ships a pytest plugin)
    public = {name for name in vars(stores) if not name.startswith(("_", "@"))}
    assert public == set(stores.__all__)


async def test_retrieve_refuses_a_bare_string(make_store):
    """retrieve("abc") is a mistake for retrieve(["abc"]): a TypeError, not three lookups."""
    store = make_store(Account)
    with pytest.raises(TypeError, match=r"retrieve\(\['abc'\]\)"):
        await store.retrieve("abc")


def test_the_in_memory_store_serves_event_loops_on_several_threads():
    """One in-memory repository written and read by loops on four threads at once, and by a
    later `asyncio.run`: no error, and each thread's writes all there."""
    store = InMemoryRepository(Account)
    errors: list[BaseException] = []

    def run(t: int) -> None:
        async def main() -> None:
            for n in range(200):
                created = await store.persist(Account(id=f"t{t}-{n}"), command_id=f"c{t}-{n}")
                assert await store.retrieve([created.id]) == [created]
                assert await store.was_processed(f"c{t}-{n}", created.id)

        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave between almost any two bytecodes
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(switching)
    assert errors == []
    ids = [f"t{t}-{n}" for t in range(4) for n in range(200)]
    assert len(asyncio.run(store.retrieve(ids))) == 800
