"""What stores keep: recent versions (what merges need) and recent command records (what
resends need), pruned as they write; a pruned base never becomes a silent two-way merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from cqrs_resilience import (
    Aggregate,
    Command,
    ConfigurationError,
    ConflictConfig,
    ConflictResolutionPolicy,
    FakeClock,
    InMemoryRepository,
    MergeConflictError,
    VersionPrunedError,
    command_scope,
    resolve_conflicts,
)
from cqrs_resilience._retention import DEFAULT_KEEP_COMMANDS_S, PRUNE_EVERY_S
from cqrs_resilience.stores import SQLiteRepository


class Doc(Aggregate, kw_only=True):
    status: str = "open"
    items: list[dict[str, Any]] = msgspec.field(default_factory=list)
    blob: str = ""


class Edit(Command[None]):
    doc_id: str
    base_version: int
    state: dict[str, Any]


def bump(doc: Doc, **changes: Any) -> Doc:
    return msgspec.structs.replace(doc, **changes)


async def write_versions(store: Any, count: int, **fields: Any) -> Doc:
    doc = await store.persist(Doc(id="d", **fields))
    for n in range(count - 1):
        doc = await store.persist(bump(doc, status=f"s{n}"))
    return doc


async def test_a_write_prunes_versions_older_than_keep_versions(make_store):
    """With keep_versions=3, the three newest versions stay; older ones are VersionPrunedError
    naming the oldest kept; versions never written are still None."""
    store = make_store(Doc, keep_versions=3)
    latest = await write_versions(store, 6)
    for version in (1, 2, 3):
        with pytest.raises(
            VersionPrunedError, match=r"version \d of aggregate 'd' was pruned"
        ) as e:
            await store.retrieve_version("d", version)
        assert (e.value.version, e.value.oldest_kept) == (version, 4)
        assert isinstance(e.value, LookupError)
    assert [(await store.retrieve_version("d", v)).version for v in (4, 5, 6)] == [4, 5, 6]
    assert await store.retrieve_version("d", 7) is None
    assert await store.retrieve(["d"]) == [latest]


async def test_keep_versions_none_keeps_every_version(make_store):
    """keep_versions=None keeps the whole history."""
    store = make_store(Doc, keep_versions=None)
    await write_versions(store, 5)
    assert [(await store.retrieve_version("d", v)).version for v in range(1, 6)] == [1, 2, 3, 4, 5]


def size_on_disk(path: Path) -> int:
    """The database file and its write-ahead log."""
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


async def test_pruning_keeps_a_sqlite_file_bounded(tmp_path):
    """A hundred versions of a 64 KB state take about keep_versions of them on disk."""

    async def fill(keep: int | None) -> int:
        path = tmp_path / f"keep-{keep}.db"
        async with SQLiteRepository(path, Doc, keep_versions=keep) as store:
            doc = await store.persist(Doc(id="d", blob="x" * 65_536))
            for n in range(100):
                doc = await store.persist(bump(doc, status=f"s{n}"))
        return size_on_disk(path)

    bounded, unbounded = await fill(5), await fill(None)
    assert unbounded > 100 * 65_536
    assert bounded < 20 * 65_536


async def test_a_resend_after_its_version_was_pruned_writes_nothing(make_store):
    """A command resent after retention pruned the version it wrote gets the latest state
    back, and is not applied again."""
    store = make_store(Doc, keep_versions=2)
    command = Edit(doc_id="d", base_version=0, state={})
    with command_scope(command):
        first = await store.persist(Doc(id="d", status="by command"))
    latest = await write_versions_on(store, first, 3)
    with command_scope(command):  # the resend: its write replays, nothing new is stored
        assert await store.persist(Doc(id="d", status="by command")) == latest
    assert await store.retrieve(["d"]) == [latest]


async def write_versions_on(store: Any, doc: Doc, count: int) -> Doc:
    for n in range(count):
        doc = await store.persist(bump(doc, status=f"later {n}"))
    return doc


async def test_command_records_expire_after_keep_commands_s(make_store):
    """A resend within keep_commands_s is a repeat; after it (and the next pruning, due with
    a write), the records are gone and the command is applied as a new one."""
    clock = FakeClock()
    store = make_store(Doc, keep_commands_s=3600, clock=clock)
    command = Edit(doc_id="a", base_version=0, state={})
    with command_scope(command):
        created = await store.persist(Doc(id="a"))
    clock.advance(3599)
    with command_scope(command):
        assert await store.persist(Doc(id="a")) == created
    assert await store.was_processed(command.command_id, "a")
    clock.advance(2 + PRUNE_EVERY_S)
    await store.persist(Doc(id="other"))  # a write prunes what expired
    assert not await store.was_processed(command.command_id, "a")
    with command_scope(command):
        [latest] = await store.retrieve(["a"])
        assert (await store.persist(latest)).version == 2


@pytest.mark.parametrize(
    "options",
    [
        {"keep_versions": 0},
        {"keep_versions": 1.5},
        {"keep_versions": True},
        {"keep_commands_s": 0},
        {"keep_commands_s": float("inf")},
        {"keep_commands_s": "7d"},
    ],
)
def test_bad_retention_settings_are_refused(options):
    """A retention setting out of range fails at construction, naming it."""
    with pytest.raises(ConfigurationError, match=next(iter(options))):
        InMemoryRepository(Doc, **options)


def test_defaults_are_documented_values():
    """A week of command records by default; versions kept: 100."""
    store = InMemoryRepository(Doc)
    assert (store.retention.keep_versions, store.retention.keep_commands_s) == (100, 7 * 86400)
    assert DEFAULT_KEEP_COMMANDS_S == 7 * 86400


# --- a pruned base: never a silent two-way merge -----------------------------------------------


def merging(store: Any, config: ConflictConfig, handled: list[Edit]) -> Any:
    async def latest(command: Edit) -> dict[str, Any] | None:
        found = await store.retrieve([command.doc_id])
        return found[0].to_dict() if found else None

    async def base(command: Edit) -> dict[str, Any] | None:
        found = await store.retrieve_version(command.doc_id, command.base_version)
        return found.to_dict() if found else None

    def rebuild(command: Edit, merged: dict[str, Any]) -> Edit:
        return Edit(doc_id=command.doc_id, base_version=merged["version"], state=merged)

    async def handler(command: Edit) -> Doc:
        handled.append(command)
        fields = {k: v for k, v in command.state.items() if k not in ("id", "version")}
        return await store.persist(Doc(id=command.doc_id, version=command.base_version, **fields))

    behavior = resolve_conflicts(
        latest, lambda c: c.state, rebuild, fetch_base_state=base, config=config
    )
    return behavior(handler)


async def test_a_pruned_base_merges_additive_changes(make_store):
    """The command's base was pruned; both sides only added line items: both are kept."""
    store = make_store(Doc, keep_versions=2)
    base = await store.persist(Doc(id="d", items=[{"id": "a"}]))
    latest = base
    for n in range(3):  # others add items; the command's base (v1) falls out of retention
        latest = await store.persist(bump(latest, items=[*latest.items, {"id": f"o{n}"}]))
    config = ConflictConfig(policy=ConflictResolutionPolicy.MERGE, list_identity_key="id")
    handled: list[Edit] = []
    state = {**base.to_dict(), "items": [*base.items, {"id": "mine"}]}
    stored = await merging(store, config, handled)(Edit(doc_id="d", base_version=1, state=state))
    assert [i["id"] for i in stored.items] == ["a", "o0", "o1", "o2", "mine"]
    assert len(handled) == 2


async def test_a_pruned_base_turns_differing_changes_into_conflicts(make_store):
    """Both sides changed `status` since a pruned base: a MergeConflictError, where a two-way
    merge would have silently overwritten the other writer's change."""
    store = make_store(Doc, keep_versions=2)
    base = await store.persist(Doc(id="d"))
    latest = base
    for status in ("paid", "packed", "shipped"):
        latest = await store.persist(bump(latest, status=status))
    config = ConflictConfig(policy=ConflictResolutionPolicy.MERGE)
    handled: list[Edit] = []
    state = {**base.to_dict(), "status": "cancelled"}
    with pytest.raises(MergeConflictError) as info:
        await merging(store, config, handled)(Edit(doc_id="d", base_version=1, state=state))
    assert [c.path for c in info.value.conflicts] == [("status",)]
    assert (await store.retrieve(["d"]))[0].status == "shipped"
