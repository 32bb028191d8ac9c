"""A side of `bench_peers.py`: the floor keeping the records our stores keep.

The raw driver, hand-written as the floor is (SQLite: one connection on one thread, each
attempt one job; PostgreSQL: psycopg's pool, one checkout per attempt, autocommit), but
writing what our stores write for every command: a new version row instead of an update in
place (history for three-way merges, pruned 16 at a time past 100 versions), a record of the
write under the command's id with the command's fingerprint (a resend finds it and is not
applied again) and, in the same statement, the command id's own record beside it (another
command reusing it is refused), and
the state decoded back from its encoding before it is written (never a stored value that
cannot be read back). msgpack, as our stores use.

No library around it: no pipeline, no behaviors, no scope, no turns, no group commit, no
telemetry. So ours ÷ this side is what our library's own code costs, and this side ÷ the floor
is what the records cost, whoever writes them.
"""

from __future__ import annotations

import functools
import hashlib
import sqlite3
from collections.abc import Sequence
from typing import Any

import msgspec
from _one_thread import OneThread, until_applied
from _peers_common import (
    PG_POOL_SIZE,
    Database,
    LineItem,
    SQLiteDatabase,
    Stored,
    Writer,
    seed_items,
    sqlite_connect,
)
from _peers_sides import MOST_ATTEMPTS, AddItem, Order, pg_connect, pg_pool

KEEP_VERSIONS = 100  # our stores' default
PRUNE_EVERY = 16  # our SQLite store prunes old versions 16 at a time

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Order).decode
_fingerprint_encode = msgspec.msgpack.Encoder(order="deterministic").encode


def schema(blob: str, options: str) -> list[str]:
    """Our stores' tables: versions in a rowid table, the records WITHOUT ROWID (SQLite)."""
    return [
        f"""CREATE TABLE IF NOT EXISTS aggregate_versions (aggregate_id TEXT NOT NULL,
            version INTEGER NOT NULL, state {blob} NOT NULL,
            PRIMARY KEY (aggregate_id, version))""",
        f"""CREATE TABLE IF NOT EXISTS processed_writes (command_id TEXT NOT NULL,
            aggregate_id TEXT NOT NULL, seq INTEGER NOT NULL, fingerprint {blob} NOT NULL,
            version INTEGER NOT NULL, recorded_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (command_id, aggregate_id, seq)){options}""",
        "CREATE INDEX IF NOT EXISTS processed_writes_at ON processed_writes (recorded_at)",
    ]


def next_state(state: bytes, item: LineItem) -> tuple[int, bytes]:
    """The order's version read and its next state, checked to read back."""
    order = _decode(state)
    stored = msgspec.structs.replace(order, items=[*order.items, item], version=order.version + 1)
    encoded = _encode(stored)
    _decode(encoded)  # the read-back check
    return order.version, encoded


def fingerprint_of(order_id: str, item: LineItem, command_id: str) -> bytes:
    command = AddItem(order_id=order_id, item=item, command_id=command_id)
    return hashlib.blake2b(_fingerprint_encode(command), digest_size=16).digest()


def _oldest_kept(version: int) -> int | None:
    """Prune versions below this one now (every 16th version past 100), else None."""
    oldest = version - KEEP_VERSIONS + 1
    return oldest if oldest > 1 and version % PRUNE_EVERY == 0 else None


class RecordsSQLiteWriter:
    """One connection, used on one thread; each attempt one job there, one transaction."""

    def __init__(self, path: str) -> None:
        self._thread = OneThread(functools.partial(sqlite_connect, path), "records-sqlite")

    async def open(self) -> None:
        await self._thread.open()

    async def add(self, order_id: str, item: LineItem, command_id: str) -> int:
        attempt = functools.partial(self._thread.run, sqlite_attempt, order_id, item, command_id)
        return await until_applied(attempt, "records", order_id, MOST_ATTEMPTS)

    async def close(self) -> None:
        await self._thread.close()


def sqlite_attempt(
    conn: sqlite3.Connection, order_id: str, item: LineItem, command_id: str, records: bool = True
) -> bool:
    """One attempt on SQLite: read, check, write the next version; with `records`, looked up
    and recorded under the command's id. Whether it was applied (False: a version race)."""
    _, state = conn.execute(
        "SELECT version, state FROM aggregate_versions WHERE aggregate_id = ?"
        " ORDER BY version DESC LIMIT 1",
        (order_id,),
    ).fetchone()
    version, encoded = next_state(state, item)
    fingerprint = fingerprint_of(order_id, item, command_id)
    conn.execute("BEGIN IMMEDIATE")
    try:
        if records:
            known, done = conn.execute(
                "SELECT (SELECT fingerprint FROM processed_writes"
                " WHERE command_id = ? AND aggregate_id = '' AND seq = 0),"
                " (SELECT version FROM processed_writes"
                " WHERE command_id = ? AND aggregate_id = ? AND seq = 1)",
                (command_id, command_id, order_id),
            ).fetchone()
            if known not in (None, fingerprint):
                raise RuntimeError(f"records: command id {command_id!r} reused")
            if done is not None:
                conn.execute("COMMIT")
                return True  # a resend: applied already
        inserted = conn.execute(
            "INSERT INTO aggregate_versions SELECT ?, ?, ? WHERE"
            " (SELECT MAX(version) FROM aggregate_versions WHERE aggregate_id = ?) = ?",
            (order_id, version + 1, encoded, order_id, version),
        )
        if inserted.rowcount != 1:
            conn.execute("ROLLBACK")
            return False
        if records:  # the write's record and the command's own row, one statement
            conn.execute(
                "INSERT INTO processed_writes VALUES (?, ?, 1, ?, ?, 0), (?, '', 0, ?, 0, 0)",
                (command_id, order_id, fingerprint, version + 1, command_id, fingerprint),
            )
        oldest = _oldest_kept(version + 1)
        if oldest is not None:
            conn.execute(
                "DELETE FROM aggregate_versions WHERE aggregate_id = ? AND version < ?",
                (order_id, oldest),
            )
        conn.execute("COMMIT")
        return True
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


# One statement, so one round trip and atomic: insert the next version unless the write is a
# resend or the version read is no longer the latest, record it, prune.
_PG_WRITE = """WITH
    known AS (SELECT fingerprint FROM processed_writes
        WHERE command_id = %(command_id)s AND aggregate_id = '' AND seq = 0),
    done AS (SELECT version FROM processed_writes
        WHERE command_id = %(command_id)s AND aggregate_id = %(id)s AND seq = 1),
    inserted AS (INSERT INTO aggregate_versions (aggregate_id, version, state)
        SELECT %(id)s, %(version)s + 1, %(state)s
        WHERE NOT EXISTS (SELECT 1 FROM done)
        AND NOT EXISTS (SELECT 1 FROM known WHERE fingerprint <> %(fingerprint)s)
        AND (SELECT MAX(version) FROM aggregate_versions WHERE aggregate_id = %(id)s)
            = %(version)s
        RETURNING version),
    recorded AS (INSERT INTO processed_writes
        SELECT %(command_id)s, %(id)s, 1, %(fingerprint)s, version, 0 FROM inserted
        UNION ALL SELECT %(command_id)s, '', 0, %(fingerprint)s, 0, 0 FROM inserted
        WHERE NOT EXISTS (SELECT 1 FROM known)),
    pruned AS (DELETE FROM aggregate_versions
        WHERE aggregate_id = %(id)s AND version < %(oldest)s AND EXISTS (SELECT 1 FROM inserted))
SELECT EXISTS (SELECT 1 FROM inserted), EXISTS (SELECT 1 FROM done)"""


class RecordsPostgresWriter:
    """psycopg's async pool; each attempt one checkout, a read and the write (autocommit)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def add(self, order_id: str, item: LineItem, command_id: str) -> int:
        fingerprint = fingerprint_of(order_id, item, command_id)
        attempt = functools.partial(self._attempt, order_id, item, command_id, fingerprint)
        return await until_applied(attempt, "records", order_id, MOST_ATTEMPTS)

    async def _attempt(
        self, order_id: str, item: LineItem, command_id: str, fingerprint: bytes
    ) -> bool:
        import psycopg

        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT state FROM aggregate_versions WHERE aggregate_id = %s"
                " ORDER BY version DESC LIMIT 1",
                (order_id,),
            )
            (state,) = await cur.fetchone()
            version, encoded = next_state(state, item)
            args = {
                "id": order_id,
                "version": version,
                "state": encoded,
                "command_id": command_id,
                "fingerprint": fingerprint,
                "oldest": _oldest_kept(version + 1) or 0,
            }
            try:
                cur = await conn.execute(_PG_WRITE, args)
                inserted, done = await cur.fetchone()
            except psycopg.errors.UniqueViolation:  # another writer's version: a miss
                return False
            return bool(inserted or done)

    async def close(self) -> None:
        await self.pool.close()


class FloorRecords:
    name = "floor + our records"
    key = "floor_records"

    async def seed(self, db: Database, ids: Sequence[str]) -> None:
        items = seed_items()
        rows = [(i, 1, _encode(Order(id=i, version=1, items=items))) for i in ids]
        if isinstance(db, SQLiteDatabase):
            conn = sqlite_connect(db.path(self))
            try:
                for statement in schema("BLOB", " WITHOUT ROWID"):
                    conn.execute(statement)
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO aggregate_versions VALUES (?, ?, ?)", rows)
                conn.execute("COMMIT")
            finally:
                conn.close()
            return
        async with await pg_connect(db, self) as conn:
            for statement in schema("BYTEA", ""):
                await conn.execute(statement)
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany("INSERT INTO aggregate_versions VALUES (%s, %s, %s)", rows)

    async def open(self, db: Database, writers: int) -> Writer:
        if isinstance(db, SQLiteDatabase):
            writer = RecordsSQLiteWriter(db.path(self))
            await writer.open()
            return writer
        return RecordsPostgresWriter(await pg_pool(db.dsn_for(self), PG_POOL_SIZE))

    async def stored(self, db: Database, ids: Sequence[str]) -> dict[str, Stored]:
        latest = """SELECT state FROM aggregate_versions AS v WHERE aggregate_id = {mark}
            AND version = (SELECT MAX(version) FROM aggregate_versions
                WHERE aggregate_id = v.aggregate_id)"""
        states: list[bytes] = []
        if isinstance(db, SQLiteDatabase):
            conn = sqlite_connect(db.path(self))
            try:
                for i in ids:
                    row = conn.execute(latest.format(mark="?"), (i,)).fetchone()
                    if row is not None:
                        states.append(row[0])
            finally:
                conn.close()
        else:
            async with await pg_connect(db, self) as conn:
                for i in ids:
                    cur = await conn.execute(latest.format(mark="%s"), (i,))
                    row = await cur.fetchone()
                    if row is not None:
                        states.append(row[0])
        orders = [_decode(s) for s in states]
        return {o.id: Stored(version=o.version, item_ids=[i.id for i in o.items]) for o in orders}
