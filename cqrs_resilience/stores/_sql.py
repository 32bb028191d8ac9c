"""The SQL both durable stores run, written once with `:name` parameters.

SQLite takes the statements as they are; `for_psycopg` turns `:name` into `%(name)s`. Only the
column type of a state (BLOB / BYTEA), SQLite's WITHOUT ROWID (for the small rows of the
record tables only) and the many-ids lookup differ.

Tables:
- `aggregate_versions`: one row per stored version of each aggregate (`namespace:id`).
- `processed_writes`: one row per write a command made: (command, aggregate, n-th write) with
  the fingerprint of its request and the version it stored. A repeat finds it. A command
  (not a bare id given to `persist`) also has a row of its own there, (command, `COMMAND_ROW`,
  0), with its fingerprint, written with its first write: a different command reusing the id
  is refused on any aggregate. It sits beside the command's writes in the primary key and is
  recorded at the same time, so a write rarely dirties a page more for it; and two commands racing
  for one id meet on that key.
- `command_keys`: where stores made before 0.1.0 kept those command rows. Still read (its rows
  are honored until retention prunes them), never written.
- `command_responses`: one row per command id that `idempotent()` answers for: the fingerprint
  and the first response (msgpack), kept until `expires_at` (NULL: for good). While the
  command runs, its writes keep a *claim* there instead (no response, an `owner`, and when
  the claim lapses), so a resend in another process waits for the response rather than
  running the command too.

Retention (see `cqrs_resilience._retention`): a write prunes its aggregate's versions older
than `keep_versions` in the same transaction; now and then a write also prunes a batch of
idempotency records older than `keep_commands_s` (indexed by `recorded_at`).
"""

from __future__ import annotations

import re
from typing import Any

from .._idempotency import WriteKey

COMMAND_ROW = ""
"""The `aggregate_id` of a command's own row in `processed_writes`; no aggregate's key is empty
(keys are `namespace:id`)."""
TABLES = ("aggregate_versions", "processed_writes", "command_keys", "command_responses")
INDEXES = (
    "processed_writes_recorded_at",
    "command_keys_recorded_at",
    "command_responses_expires_at",
)


def schema(blob: str, record_table_options: str = "") -> tuple[str, ...]:
    """CREATE TABLE statements, with the database's binary type and the record tables' options.

    `aggregate_versions` takes no options: in SQLite a WITHOUT ROWID table keeps about 1 KB of
    a row in its b-tree and the rest in overflow pages, so each version of a bigger state
    would read and write pages more than a rowid table and its primary-key index do. (Files
    made before 0.1.0 have a WITHOUT ROWID one; the same statements serve both.)
    """
    return (
        f"""CREATE TABLE IF NOT EXISTS aggregate_versions (
            aggregate_id TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version > 0),
            state {blob} NOT NULL,
            PRIMARY KEY (aggregate_id, version)
        )""",
        f"""CREATE TABLE IF NOT EXISTS processed_writes (
            command_id TEXT NOT NULL,
            aggregate_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            fingerprint {blob} NOT NULL,
            version INTEGER NOT NULL,
            recorded_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (command_id, aggregate_id, seq)
        ){record_table_options}""",
        f"""CREATE TABLE IF NOT EXISTS command_keys (
            command_id TEXT NOT NULL PRIMARY KEY,
            fingerprint {blob} NOT NULL,
            recorded_at DOUBLE PRECISION NOT NULL
        ){record_table_options}""",
        f"""CREATE TABLE IF NOT EXISTS command_responses (
            command_id TEXT NOT NULL PRIMARY KEY,
            fingerprint {blob} NOT NULL,
            response {blob},
            owner TEXT,
            expires_at DOUBLE PRECISION
        ){record_table_options}""",
        "CREATE INDEX IF NOT EXISTS processed_writes_recorded_at ON processed_writes (recorded_at)",
        "CREATE INDEX IF NOT EXISTS command_keys_recorded_at ON command_keys (recorded_at)",
        "CREATE INDEX IF NOT EXISTS command_responses_expires_at ON command_responses (expires_at)",
    )


# Inserts nothing unless :expected is still the latest version; the primary key backs this up
# against a writer whose insert is not committed yet.
INSERT_NEXT = """INSERT INTO aggregate_versions (aggregate_id, version, state)
    SELECT :id, :expected + 1, :state
    WHERE COALESCE((SELECT MAX(version) FROM aggregate_versions WHERE aggregate_id = :id), 0)
        = :expected"""
# A bare MAX or MIN over one aggregate's rows is one index probe in both databases; wrapped in
# an expression (COALESCE(MAX(...))) SQLite would read every version, states and all.
LATEST_VERSION = (
    "SELECT COALESCE((SELECT MAX(version) FROM aggregate_versions WHERE aggregate_id = :id), 0)"
)
ONE_VERSION = "SELECT state FROM aggregate_versions WHERE aggregate_id = :id AND version = :version"
VERSION_RANGE = """SELECT
    (SELECT MIN(version) FROM aggregate_versions WHERE aggregate_id = :id),
    (SELECT MAX(version) FROM aggregate_versions WHERE aggregate_id = :id)"""
LATEST_STATE = """SELECT version, state FROM aggregate_versions WHERE aggregate_id = :id
    ORDER BY version DESC LIMIT 1"""
PRUNE_VERSIONS = "DELETE FROM aggregate_versions WHERE aggregate_id = :id AND version < :oldest"
# Twice the batch: the table holds each command's own row beside its writes' rows, so a
# pruning still takes a batch of commands with a write each, as when they had a table apiece.
PRUNE_WRITES = """DELETE FROM processed_writes WHERE (command_id, aggregate_id, seq) IN (
    SELECT command_id, aggregate_id, seq FROM processed_writes WHERE recorded_at < :cutoff
    LIMIT 2 * :batch)"""
PRUNE_COMMANDS = """DELETE FROM command_keys WHERE command_id IN (
    SELECT command_id FROM command_keys WHERE recorded_at < :cutoff LIMIT :batch)"""
# The fingerprint recorded for a command id, from its row or a store's older `command_keys`.
COMMAND_FINGERPRINT = f"""COALESCE(
        (SELECT fingerprint FROM processed_writes
            WHERE command_id = :command_id AND aggregate_id = '{COMMAND_ROW}' AND seq = 0),
        (SELECT fingerprint FROM command_keys WHERE command_id = :command_id))"""
# One row, always: the command's recorded fingerprint, and this write's first outcome if any.
LOOKUP_WRITE = f"""SELECT {COMMAND_FINGERPRINT}, w.fingerprint, w.version, v.state
    FROM (SELECT 1 AS one) AS q
    LEFT JOIN processed_writes AS w
        ON w.command_id = :command_id AND w.aggregate_id = :id AND w.seq = :seq
    LEFT JOIN aggregate_versions AS v
        ON v.aggregate_id = w.aggregate_id AND v.version = w.version"""
RECORD_WRITE = """INSERT INTO processed_writes
        (command_id, aggregate_id, seq, fingerprint, version, recorded_at)
    VALUES (:command_id, :id, :seq, :fingerprint, :expected + 1, :now)"""
# A command's first write: the write's row and the command's own, in one statement.
RECORD_FIRST_WRITE = f"""{RECORD_WRITE},
        (:command_id, '{COMMAND_ROW}', 0, :fingerprint, 0, :now)"""
# A command's response, or its live claim; an expired one is as good as none.
RESPONSE = """SELECT fingerprint, response, owner, expires_at FROM command_responses
    WHERE command_id = :command_id AND (expires_at IS NULL OR expires_at > :now)"""
# Taken by each write of a command that idempotent() runs: a claim replaces another claim (the
# same command, run again) or an expired response, never a live response.
CLAIM = """INSERT INTO command_responses (command_id, fingerprint, owner, expires_at)
    VALUES (:command_id, :fingerprint, :claim_owner, :claim_expires)
    ON CONFLICT (command_id) DO UPDATE SET fingerprint = excluded.fingerprint,
        response = NULL, owner = excluded.owner, expires_at = excluded.expires_at
    WHERE command_responses.response IS NULL OR command_responses.expires_at <= :now"""
# The first response wins: it replaces a claim or an expired response, never a live response.
RECORD_RESPONSE = """INSERT INTO command_responses
        (command_id, fingerprint, response, owner, expires_at)
    VALUES (:command_id, :fingerprint, :response, NULL, :keep_until)
    ON CONFLICT (command_id) DO UPDATE SET fingerprint = excluded.fingerprint,
        response = excluded.response, owner = NULL, expires_at = excluded.expires_at
    WHERE command_responses.response IS NULL OR command_responses.expires_at <= :now"""
RECORDED_RESPONSE = (
    "SELECT fingerprint, response FROM command_responses WHERE command_id = :command_id"
)
RELEASE_CLAIM = """DELETE FROM command_responses
    WHERE command_id = :command_id AND owner = :owner AND response IS NULL"""
PRUNE_RESPONSES = """DELETE FROM command_responses WHERE command_id IN (
    SELECT command_id FROM command_responses WHERE expires_at <= :now LIMIT :batch)"""
WAS_PROCESSED = (
    "SELECT 1 FROM processed_writes WHERE command_id = :command_id AND aggregate_id = :id LIMIT 1"
)


def write_args(
    key: str, expected: int, state: bytes, recorded: WriteKey | None, now: float
) -> dict[str, Any]:
    """The parameters of a write's statements (the idempotency ones only with a key)."""
    args: dict[str, Any] = {"id": key, "expected": expected, "state": state, "now": now}
    if recorded is not None:
        args.update(
            command_id=recorded.command_id,
            seq=recorded.seq,
            fingerprint=recorded.fingerprint,
        )
    return args


_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")


def for_psycopg(statement: str) -> str:
    """The statement with psycopg's `%(name)s` parameters instead of `:name`."""
    return _PARAMETER.sub(r"%(\1)s", statement.replace("%", "%%"))
