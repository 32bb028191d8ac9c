"""How conflict resolution on one SQLite file takes turns across repositories and processes.

Within one event loop, conflict resolution on an aggregate runs one command at a time
(`cqrs_resilience._turns`), and that is all a single process needs. Several processes (or
several repositories) writing one file resolve the same aggregate side by side instead, and
keep invalidating each other's merge. So once a repository's resolution lost to another
writer, it marks the aggregate contested for `CONTESTED_S` (`Contested`), and while it is,
each of its resolutions first takes a lease: a row of `conflict_leases` (aggregate, owner,
expiry) written in a transaction of its own. Another repository's resolution waits for the
lease, and its first attempts at writing the aggregate yield to it: their insert is skipped
and they become resolutions themselves.

The lease never decides what is stored: every write is still a version-checked insert. It
only keeps writers out of each other's way, so it can stay simple. It expires `busy_timeout`
seconds after it was taken, so a process killed while holding one holds nobody up for longer;
a resolution that cannot get it within `busy_timeout` goes on without it; and a release that
never ran (its caller cancelled, its event loop gone) lets it expire.
"""

from __future__ import annotations

import threading

TABLE = "conflict_leases"
SCHEMA = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    aggregate_id TEXT NOT NULL PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
) WITHOUT ROWID"""

# Takes the lease when it is free, expired or already this owner's (changes one row).
TAKE = f"""INSERT INTO {TABLE} (aggregate_id, owner, expires_at) VALUES (:id, :owner, :expires)
    ON CONFLICT (aggregate_id)
    DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
    WHERE {TABLE}.owner = excluded.owner OR {TABLE}.expires_at <= :now"""
# Gives it back, and sweeps leases that expired (left by processes that died holding them).
RELEASE = f"""DELETE FROM {TABLE}
    WHERE (aggregate_id = :id AND owner = :owner) OR expires_at <= :now"""
# The next version, unless it is not the expected one or, for a first attempt (:resolving is
# 0), another owner's resolution holds a live lease on the aggregate.
INSERT_NEXT = f"""INSERT INTO aggregate_versions (aggregate_id, version, state)
    SELECT :id, :expected + 1, :state
    WHERE COALESCE((SELECT MAX(version) FROM aggregate_versions WHERE aggregate_id = :id), 0)
        = :expected
    AND (:resolving OR NOT EXISTS (SELECT 1 FROM {TABLE}
        WHERE aggregate_id = :id AND owner <> :owner AND expires_at > :now))"""

CONTESTED_S = 5.0
"""How long an aggregate whose resolution lost to another writer keeps taking leases."""
POLL_S = (0.002, 0.05)
"""The first and the longest pause between tries for a lease another owner holds."""
_KEPT = 1024  # marks kept before the ones that ran out are swept


class Contested:
    """The aggregates whose resolution lately lost to another writer: id -> when (monotonic).

    Shared by the repository's callers on every thread, so each use takes a lock."""

    def __init__(self) -> None:
        self._marks: dict[str, float] = {}
        self._lock = threading.Lock()

    def mark(self, aggregate_id: str, now: float) -> None:
        """Mark it; forget the marks that ran out, so many aggregates contested once each do
        not pile up."""
        with self._lock:
            marks = self._marks
            if len(marks) >= _KEPT:
                for stale in [k for k, lost in marks.items() if now - lost >= CONTESTED_S]:
                    del marks[stale]
            marks[aggregate_id] = now

    def now(self, aggregate_id: str, now: float) -> bool:
        """Whether it is contested at `now`."""
        with self._lock:
            lost = self._marks.get(aggregate_id)
            if lost is None:
                return False
            if now - lost < CONTESTED_S:
                return True
            del self._marks[aggregate_id]
            return False

    def __len__(self) -> int:
        return len(self._marks)
