"""SQLite prunes old versions a batch at a time: always at least `keep_versions` kept, at
most a batch more, and most writes delete nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec
import pytest

from cqrs_resilience import Aggregate, VersionPrunedError
from cqrs_resilience._retention import Retention
from cqrs_resilience.stores import SQLiteRepository


class Doc(Aggregate, kw_only=True):
    status: str = "open"


def stored_versions(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT version FROM aggregate_versions ORDER BY version").fetchall()
    return [version for (version,) in rows]


async def test_sqlite_prunes_old_versions_a_batch_at_a_time(tmp_path):
    """With keep_versions=64, the newest 64 versions are always there; older ones go 16 at a
    time, so a write deletes nothing 15 times out of 16 and at most 79 versions stay."""
    path = tmp_path / "batches.db"
    async with SQLiteRepository(path, Doc, keep_versions=64) as store:
        doc = await store.persist(Doc(id="d"))
        kept: dict[int, tuple[int, int]] = {}
        for n in range(99):
            doc = await store.persist(msgspec.structs.replace(doc, status=f"s{n}"))
            versions = stored_versions(path)
            kept[doc.version] = (versions[0], len(versions))
            assert versions == list(range(versions[0], doc.version + 1))
            assert 64 <= len(versions) <= 79 or doc.version < 64
        assert kept[79] == (1, 79)  # no pruning yet: the batch is not due
        assert kept[80] == (17, 64)  # a batch of 16 went
        assert kept[95] == (17, 79)
        assert kept[96] == (33, 64)
        assert (await store.retrieve_version("d", 33)).version == 33
        with pytest.raises(VersionPrunedError) as pruned:
            await store.retrieve_version("d", 32)
        assert pruned.value.oldest_kept == 33


@pytest.mark.parametrize("keep", [1, 2, 3, 7, 8, 63, 64, 100, 1000])
def test_a_batch_never_prunes_the_newest_keep_versions(keep):
    """Whatever keep_versions is, pruning never reaches one of the newest `keep_versions`
    versions, and never leaves more than a quarter of it (16 at most) beyond them."""
    retention = Retention(keep, None)
    oldest = 1
    for latest in range(1, 3 * keep + 40):
        bound = retention.versions_to_prune(latest)
        if bound is not None:
            assert bound == latest - keep + 1
            oldest = bound
        assert latest - oldest + 1 >= min(latest, keep)
        assert latest - oldest + 1 <= keep + max(0, min(16, keep // 4) - 1)
