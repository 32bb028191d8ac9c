"""What each of our guarantees costs the raw driver, on SQLite: the floor, then one more each.

`bench_peers.py` measures our library against the floor (the raw driver: read the row,
update it in place) and against the floor keeping our records. This takes the second apart:
the hot row's workload (one order, starting with 50 items, one writer adding an item per
command) written by hand with stdlib `sqlite3` on one thread, no asyncio, no library, each
rung adding one guarantee to the one before:

1. **floor**: read the row, `UPDATE ... WHERE version = ?` (autocommit), msgspec JSON.
2. **+ states checked**: msgpack, as our stores keep states; the state decoded back from its
   encoding before it is written (never a stored value that cannot be read back); the
   command's fingerprint (a digest of its encoding); an explicit transaction.
3. **+ history**: each version a new row instead of an update in place (three-way merges read
   the version a command started from), older ones pruned 16 at a time past 100.
4. **+ idempotency records**: the write recorded under the command's id with its fingerprint,
   and the command id's own row, in one insert; looked up before writing (a resend is not
   applied twice, another command reusing the id is refused). These are our stores' records.

SQLite in WAL mode, `synchronous=FULL`, a file per rung; rungs alternate, medians of `--runs`.

    python benchmarks/bench_records.py [--commands 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec
from _peers_common import LineItem, seed_items, sqlite_connect
from _peers_records import fingerprint_of, next_state, schema, sqlite_attempt
from _peers_sides import FloorOrder, Order, appended

HOT = "hot"
_encode = msgspec.msgpack.Encoder().encode


def floor(conn: sqlite3.Connection, item: LineItem, command_id: str) -> None:
    version, state = conn.execute(
        "SELECT version, state FROM orders WHERE id = ?", (HOT,)
    ).fetchone()
    conn.execute(
        "UPDATE orders SET state = ?, version = version + 1 WHERE id = ? AND version = ?",
        (appended(state, item), HOT, version),
    )


def checked(conn: sqlite3.Connection, item: LineItem, command_id: str) -> None:
    (state,) = conn.execute("SELECT state FROM orders WHERE id = ?", (HOT,)).fetchone()
    version, encoded = next_state(state, item)
    fingerprint_of(HOT, item, command_id)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(
        "UPDATE orders SET state = ?, version = version + 1 WHERE id = ? AND version = ?",
        (encoded, HOT, version),
    )
    conn.execute("COMMIT")


def history(conn: sqlite3.Connection, item: LineItem, command_id: str) -> None:
    sqlite_attempt(conn, HOT, item, command_id, records=False)


def records(conn: sqlite3.Connection, item: LineItem, command_id: str) -> None:
    sqlite_attempt(conn, HOT, item, command_id)


Attempt = Callable[[sqlite3.Connection, LineItem, str], None]
RUNGS: list[tuple[str, Attempt]] = [
    ("1. floor", floor),
    ("2. + states checked", checked),
    ("3. + history", history),
    ("4. + idempotency records (ours)", records),
]


def seeded(path: str, attempt: Attempt) -> sqlite3.Connection:
    conn = sqlite_connect(path)
    if attempt in (floor, checked):
        conn.execute(
            "CREATE TABLE orders"
            " (id TEXT PRIMARY KEY, version INTEGER NOT NULL, state BLOB NOT NULL)"
        )
        if attempt is floor:
            state = msgspec.json.encode(FloorOrder(items=seed_items()))
        else:
            state = _encode(Order(id=HOT, version=1, items=seed_items()))
        conn.execute("INSERT INTO orders VALUES (?, 1, ?)", (HOT, state))
    else:
        for statement in schema("BLOB", " WITHOUT ROWID"):
            conn.execute(statement)
        state = _encode(Order(id=HOT, version=1, items=seed_items()))
        conn.execute("INSERT INTO aggregate_versions VALUES (?, 1, ?)", (HOT, state))
    return conn


def run(folder: str, attempt: Attempt, commands: int) -> float:
    """Commands per second of one run on a fresh file."""
    path = os.path.join(folder, f"{attempt.__name__}.sqlite3")
    for name in (path, path + "-wal", path + "-shm"):
        if os.path.exists(name):
            os.remove(name)
    conn = seeded(path, attempt)
    try:
        began = time.perf_counter()
        for n in range(commands):
            attempt(conn, LineItem(id=f"item-{n}", sku=f"sku-{n}", quantity=1), f"command-{n}")
        return commands / (time.perf_counter() - began)
    finally:
        conn.close()


def main(args: argparse.Namespace) -> None:
    rates: dict[str, list[float]] = {name: [] for name, _ in RUNGS}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.runs):
            for name, attempt in RUNGS:
                rates[name].append(run(folder, attempt, args.commands))
    base = statistics.median(rates[RUNGS[0][0]])
    print(
        f"\nSQLite, one order (50 items to start), one writer, {args.commands:,} commands; "
        f"medians of {args.runs} alternating runs (lowest-highest)\n"
    )
    print("| rung | commands/s | µs per command | ÷ the floor |\n|---|---:|---:|---:|")
    for name, _ in RUNGS:
        median = statistics.median(rates[name])
        spread = f"{min(rates[name]):,.0f}-{max(rates[name]):,.0f}"
        print(f"| {name} | {median:,.0f} ({spread}) | {1e6 / median:,.0f} | {median / base:.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=1_000, help="commands per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per rung (median)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parsed = parser.parse_args()
    if parsed.quick:
        parsed.commands, parsed.runs = 100, 1
    main(parsed)
