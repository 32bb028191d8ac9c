"""Many processes updating few aggregates through flaky calls: no update lost, none doubled.

Each of WORKERS processes (spawned, each with its own repository) makes UPDATES updates, each
a command appending a unique token to one of three ledgers: read the latest, append, persist
inside the command's scope; on ConcurrencyError or TransientError read again and retry. Faults
are injected: some persists fail with TransientError before writing, and some raise TimeoutError
after the write committed, so the worker retries the same command and must get the first
outcome back, whether it resends the stale write or reads again and rebuilds it.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import random
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import msgspec

from cqrs_resilience import Aggregate, Command, ConcurrencyError, TransientError, command_scope
from cqrs_resilience.stores import PostgresRepository, SQLiteRepository

WORKERS = 8
UPDATES = 200
LEDGERS = ("ledger-0", "ledger-1", "ledger-2")
TRANSIENT_BEFORE_WRITE = 0.10
TIMEOUT_AFTER_COMMIT = 0.05
# Short, so some writers really find the file locked and take the TransientError path.
BUSY_TIMEOUT = 0.05
DEADLINE = 120.0  # seconds for the whole run; a hang fails instead of blocking CI


class Ledger(Aggregate, kw_only=True):
    tokens: list[str] = msgspec.field(default_factory=list)


class AppendToken(Command[None]):
    ledger_id: str
    token: str


def open_store(kind: str, target: str) -> SQLiteRepository[Ledger] | PostgresRepository[Ledger]:
    # Every version is kept: the test checks that each is the one before plus one token.
    if kind == "postgres":
        return PostgresRepository(target, Ledger, min_size=1, max_size=2, keep_versions=None)
    return SQLiteRepository(target, Ledger, busy_timeout=BUSY_TIMEOUT, keep_versions=None)


_start: Any = None  # the barrier every worker waits at, so they all begin together


def _init_worker(start: Any) -> None:
    global _start
    _start = start


def run_worker(kind: str, target: str, index: int) -> dict[str, Any]:
    """One process's share of the updates; returns what each token's persist answered."""
    _start.wait(timeout=60)
    return asyncio.run(_updates(kind, target, index))


async def _updates(kind: str, target: str, index: int) -> dict[str, Any]:
    rng = random.Random(index)
    stats: Counter[str] = Counter()
    answered: dict[str, tuple[str, int]] = {}
    store = open_store(kind, target)
    try:
        for n in range(UPDATES):
            token = f"w{index}-u{n}"
            ledger_id = rng.choice(LEDGERS)
            command = AppendToken(command_id=uuid.uuid4().hex, ledger_id=ledger_id, token=token)
            committed: Ledger | None = None  # set when a commit was followed by a timeout
            resend: Ledger | None = None
            while True:
                if resend is None:
                    [latest] = await store.retrieve([ledger_id])
                    attempt = msgspec.structs.replace(latest, tokens=[*latest.tokens, token])
                else:  # the same call again, its read version stale by now
                    attempt, resend = resend, None
                roll = rng.random()
                try:
                    if roll < TRANSIENT_BEFORE_WRITE:
                        stats["injected transient"] += 1
                        raise TransientError("injected: failed before writing")
                    with command_scope(command):  # one attempt of the command
                        stored = await store.persist(attempt)
                    if committed is None and roll < TRANSIENT_BEFORE_WRITE + TIMEOUT_AFTER_COMMIT:
                        committed = stored
                        stats["injected timeout after commit"] += 1
                        raise TimeoutError("injected: committed, then timed out")
                except ConcurrencyError:
                    stats["conflicts"] += 1
                    continue
                except TransientError:
                    stats["transient"] += 1
                    continue
                except TimeoutError:
                    # Half the retries resend the same aggregate, half read again first.
                    resend = attempt if rng.random() < 0.5 else None
                    continue
                if committed is not None:
                    stats["repeats answered"] += 1
                    if stored != committed:
                        stats["repeat answered differently"] += 1
                answered[token] = (ledger_id, stored.version)
                break
    finally:
        await store.close()
    return {"stats": stats, "answered": answered}


async def _create_ledgers(kind: str, target: str) -> None:
    store = open_store(kind, target)
    try:
        for ledger_id in LEDGERS:
            await store.persist(Ledger(id=ledger_id))
    finally:
        await store.close()


async def _history(kind: str, target: str) -> dict[str, list[Ledger]]:
    """Every stored version of every ledger, oldest first."""
    store = open_store(kind, target)
    try:
        history: dict[str, list[Ledger]] = {}
        for latest in await store.retrieve(list(LEDGERS)):
            versions = [
                await store.retrieve_version(latest.id, v) for v in range(1, latest.version + 1)
            ]
            assert all(v is not None for v in versions), f"{latest.id} lost a version"
            history[latest.id] = [v for v in versions if v is not None]
        return history
    finally:
        await store.close()


def test_contention_loses_and_doubles_no_update(durable_target):
    """8 processes x 200 flaky updates on 3 aggregates: every token stored exactly once."""
    kind, target = durable_target
    asyncio.run(_create_ledgers(kind, target))
    context = multiprocessing.get_context("spawn")
    started = time.monotonic()
    with ProcessPoolExecutor(
        WORKERS, mp_context=context, initializer=_init_worker, initargs=(context.Barrier(WORKERS),)
    ) as pool:
        futures = [pool.submit(run_worker, kind, target, i) for i in range(WORKERS)]
        results = [
            f.result(timeout=max(1.0, DEADLINE - (time.monotonic() - started))) for f in futures
        ]

    stats = sum((r["stats"] for r in results), Counter())
    answered = {token: where for r in results for token, where in r["answered"].items()}
    assert stats["repeat answered differently"] == 0, stats
    assert stats["injected timeout after commit"] > 0, stats
    assert stats["conflicts"] > 0, stats  # the workers really raced
    assert stats["repeats answered"] == stats["injected timeout after commit"], stats

    history = asyncio.run(_history(kind, target))
    stored = Counter(token for versions in history.values() for token in versions[-1].tokens)
    expected = {f"w{w}-u{n}" for w in range(WORKERS) for n in range(UPDATES)}
    assert set(stored) == expected, "lost updates"
    assert max(stored.values()) == 1, "doubled updates"
    for ledger_id, versions in history.items():
        final = versions[-1]
        assert final.version == 1 + len(final.tokens)
        # Each version is the one before plus exactly one token: no write was ever overwritten.
        assert versions[0].tokens == []
        for before, after in itertools.pairwise(versions):
            assert after.tokens[:-1] == before.tokens
        for token in final.tokens:
            assert answered[token] == (ledger_id, final.tokens.index(token) + 2)
