"""What a SQLite store reads, on either of its reading connections.

Reads run on the reader thread, or on the event loop itself: a read of one aggregate whose
state is at most `INLINE_READ_BYTES` is an index probe and a small row, cheaper than the two
thread switches it saves. On the loop a read passes `cap=INLINE_READ_BYTES` and gets
`Elsewhere` for a bigger state (whose bytes it never loads); on the thread it passes `NO_CAP`.
Every read sees the last commit (WAL): reads never wait for a writer, and hold nothing.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import nullcontext

from . import _sql
from ._sqlite_commit import transaction

INLINE_READ_BYTES = 64 * 1024
"""The largest state read on the event loop; bigger ones are read on the reader thread."""
NO_CAP = 2**62

# Reads that leave a state out (NULL) when it is bigger than :cap, without loading it.
_LATEST_CAPPED = """SELECT version, CASE WHEN length(state) <= :cap THEN state END
    FROM aggregate_versions WHERE aggregate_id = :id ORDER BY version DESC LIMIT 1"""
_ONE_VERSION_CAPPED = """SELECT CASE WHEN length(state) <= :cap THEN state END
    FROM aggregate_versions WHERE aggregate_id = :id AND version = :version"""


class Elsewhere(Exception):
    """A read the event loop leaves to the reader thread (a state over the cap, several ids)."""


def latest(conn: sqlite3.Connection, keys: list[str], cap: int) -> dict[str, tuple[int, bytes]]:
    """The latest (version, state) of each stored key among `keys`: an index probe each."""
    unique = list(dict.fromkeys(keys))
    if len(unique) > 1 and cap != NO_CAP:
        raise Elsewhere  # a snapshot of several: in a transaction, on a thread
    found: dict[str, tuple[int, bytes]] = {}
    # Several queries read one snapshot only inside a transaction.
    with transaction(conn, "BEGIN") if len(unique) > 1 else nullcontext():
        for key in unique:
            row = conn.execute(_LATEST_CAPPED, {"id": key, "cap": cap}).fetchone()
            if row is not None:
                found[key] = (row[0], _within_cap(row[1]))
    return found


def one_version(
    conn: sqlite3.Connection, key: str, version: int, cap: int
) -> tuple[object, int | None]:
    """The state at `version`, or (None, the oldest version kept) if it was pruned."""
    args = {"id": key, "version": version, "cap": cap}
    row = conn.execute(_ONE_VERSION_CAPPED, args).fetchone()
    if row is not None:
        return _within_cap(row[0]), None
    oldest, newest = conn.execute(_sql.VERSION_RANGE, args).fetchone()
    pruned = oldest is not None and 0 < version < oldest and version <= newest
    return None, oldest if pruned else None


# A command's response (left out when over :cap, its length telling), or its live claim.
_RESPONSE_CAPPED = """SELECT fingerprint, CASE WHEN length(response) <= :cap THEN response END,
        length(response), owner, expires_at
    FROM command_responses
    WHERE command_id = :command_id AND (expires_at IS NULL OR expires_at > :now)"""


def response_of(
    conn: sqlite3.Connection, command_id: str, now: float, cap: int
) -> tuple[bytes, bytes | None, str | None, float | None] | None:
    """(fingerprint, response, owner, expires_at) recorded for `command_id`, or None."""
    args = {"command_id": command_id, "now": now, "cap": cap}
    row = conn.execute(_RESPONSE_CAPPED, args).fetchone()
    if row is None:
        return None
    fingerprint, response, size, owner, expires_at = row
    if response is None and size is not None:
        raise Elsewhere  # recorded, and bigger than the cap
    return fingerprint, response, owner, expires_at


def was_processed(conn: sqlite3.Connection, command_id: str, key: str, cap: int) -> bool:
    """Whether `command_id` wrote the aggregate stored under `key`."""
    args = {"command_id": command_id, "id": key}
    return conn.execute(_sql.WAS_PROCESSED, args).fetchone() is not None


def _within_cap(state: bytes | None) -> bytes:
    """A state a capped read returned; None (left out for its size) reads elsewhere."""
    if state is None:
        raise Elsewhere
    return state


class LoopReader:
    """The event loop's read-only connection to `path`, which never waits for a lock.

    It belongs to the first thread that asks and is used by that thread only; on any other
    `connection()` is None (and the caller reads on the reader thread), as when it could not
    be opened or the reader was closed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._thread: int | None = None
        self._lock = threading.Lock()  # only for the first call, which picks the thread

    def connection(self) -> sqlite3.Connection | None:
        if self._thread is not None:
            return self._conn if threading.get_ident() == self._thread else None
        with self._lock:
            if self._thread is not None:
                return self._conn if threading.get_ident() == self._thread else None
            try:
                conn = sqlite3.connect(
                    self.path, timeout=0, isolation_level=None, check_same_thread=False
                )
                conn.execute("PRAGMA query_only = ON")
            except sqlite3.Error:
                conn = None
            self._conn = conn
            self._thread = threading.get_ident()
            return conn

    def close(self) -> None:
        """No more reads here. The connection is closed now on its own thread; from another
        thread, which may be reading on it this moment, it is let go (and closed when that
        read is over)."""
        with self._lock:
            conn, self._conn = self._conn, None
            owner, self._thread = self._thread, -1
        if conn is not None and owner == threading.get_ident():
            conn.close()
