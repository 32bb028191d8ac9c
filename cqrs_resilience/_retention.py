"""What a store keeps: the versions three-way merges need, and ids a client could resend.

Storing every version of a growing aggregate makes storage grow with the square of its history.
A three-way merge only needs the version its command was issued against, which under
contention lags the latest by about the number of writers racing on the aggregate; and a
resend only needs its command's record for as long as a queue or a client may redeliver it.

- `keep_versions` (default 100): the newest `keep_versions` versions of each aggregate are
  always kept. Older ones are pruned in the transaction of a write: SQLite prunes a batch at a
  time (`versions_to_prune`: on every `keep_versions // 4`-th version, at most every 16th, so
  up to that many more stay between prunings), the other stores on every write. A merge
  whose base was pruned gets `VersionPrunedError` from `retrieve_version`; `resolve_conflicts`
  then merges against an empty base, so every path the two sides hold differently is a
  conflict, never a silent overwrite. (Measured: in `cqrs-resilience demo --writers 64
  --updates 50`, a conflicting command's base lags the latest by at most a few dozen
  versions; 100 leaves room for twice that.) `None` keeps every version.
- `keep_commands_s` (default 7 days, a common queue redelivery window): idempotency records
  older than this are pruned, a batch at a time, at most once a minute, with a write. A resend
  within the window gets its first outcome (the latest state if its own version was pruned);
  a resend after it is applied as a new command. `None` keeps them forever.
"""

from __future__ import annotations

import math

from ._checks import setting
from ._errors import ConfigurationError

DEFAULT_KEEP_VERSIONS = 100
DEFAULT_KEEP_COMMANDS_S = 7 * 24 * 3600.0
PRUNE_EVERY_S = 60.0
"""How often, at most, a store prunes expired idempotency records (with a write)."""
PRUNE_BATCH = 1000
"""How many expired records of each table one pruning deletes, at most."""
PRUNE_VERSIONS_EVERY = 16
"""Versions pruned a batch at a time: on every n-th version (fewer for a small keep_versions)."""


class Retention:
    """A store's retention settings, checked, and when its next record pruning is due."""

    __slots__ = ("keep_commands_s", "keep_versions", "next_prune")

    def __init__(self, keep_versions: int | None, keep_commands_s: float | None) -> None:
        if keep_versions is not None and (
            isinstance(keep_versions, bool) or not isinstance(keep_versions, int)
        ):
            raise ConfigurationError(f"keep_versions must be an int or None, got {keep_versions!r}")
        if keep_versions is not None and keep_versions < 1:
            raise ConfigurationError(f"keep_versions must be >= 1, got {keep_versions}")
        if keep_commands_s is not None:
            setting(
                "keep_commands_s",
                keep_commands_s,
                "a finite number of seconds > 0 or None",
                lambda v: 0 < v < math.inf,
            )
        self.keep_versions = keep_versions
        self.keep_commands_s = keep_commands_s
        self.next_prune = -math.inf

    def oldest_kept(self, latest: int) -> int:
        """The oldest version kept when `latest` is the newest (1 when all are kept)."""
        return 1 if self.keep_versions is None else max(1, latest - self.keep_versions + 1)

    def versions_to_prune(self, latest: int) -> int | None:
        """The version below which a write storing `latest` prunes, when a batch is due; else
        None. It never prunes one of the newest `keep_versions`, and each write of a multiple
        of the batch prunes all older ones, so at most `batch - 1` more than that stay."""
        keep = self.keep_versions
        if keep is None or latest <= keep:
            return None
        batch = max(1, min(PRUNE_VERSIONS_EVERY, keep // 4))
        return latest - keep + 1 if latest % batch == 0 else None

    def records_cutoff(self, now: float) -> float | None:
        """The time before which idempotency records go, if a pruning is due now; else None."""
        if self.keep_commands_s is None or now < self.next_prune:
            return None
        self.next_prune = now + min(PRUNE_EVERY_S, self.keep_commands_s / 10)
        return now - self.keep_commands_s

    def __repr__(self) -> str:
        return (
            f"Retention(keep_versions={self.keep_versions}, keep_commands_s={self.keep_commands_s})"
        )
