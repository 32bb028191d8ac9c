"""Fixtures for the store tests: a real PostgreSQL, a fresh database per test, any store kind.

Loaded from `tests/conftest.py` with `pytest_plugins = ["tests.conftest_stores"]`. Without a
server, PostgreSQL tests skip locally and fail in CI (`CI=true`), where skipping would hide them.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from contextlib import AbstractContextManager, ExitStack, closing, contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from cqrs_resilience._repository import A, InMemoryRepository, Repository
from cqrs_resilience.stores import PostgresRepository, SQLiteRepository
from tests import pg_server

STORE_KINDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]

MakeStore = Callable[[type[A]], Repository[A]]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A superuser DSN of a real PostgreSQL server, started once per session when needed."""
    with ExitStack() as stack:
        try:
            import psycopg

            dsn = stack.enter_context(pg_server.postgres_dsn())
            with psycopg.connect(dsn, connect_timeout=10) as conn:
                conn.execute("SELECT 1")
        except Exception as exc:  # no binaries, no psycopg, cannot start or connect
            if in_ci() or os.environ.get(pg_server.ENV_DSN):
                pytest.fail(f"PostgreSQL is required here but unavailable: {exc}", pytrace=False)
            pytest.skip(f"no PostgreSQL server ({exc}); set {pg_server.ENV_DSN} or install it")
        yield dsn


@pytest.fixture(scope="session")
def pg_binaries() -> None:
    """PostgreSQL server binaries, for tests that start a throwaway server themselves (the
    demo's); like `pg_dsn`, they skip locally and fail in CI without them."""
    try:
        pg_server.find_bin_dir()
    except pg_server.PostgresUnavailableError as exc:
        if in_ci() and not os.environ.get(pg_server.ENV_DSN):
            pytest.fail(f"PostgreSQL server binaries are required here: {exc}", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture
def pg_database(pg_dsn: str) -> Iterator[str]:
    """The DSN of a new, empty database, dropped after the test: tests never see each other."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    name = f"cqrs_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    try:
        yield make_conninfo(pg_dsn, dbname=name)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    """A path for a fresh SQLite store file."""
    return tmp_path / "store.sqlite3"


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """Each repository implementation in turn: the contract is the same for all."""
    kind: str = request.param
    return kind


@pytest.fixture
async def make_store(
    store_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[MakeStore[Any]]:
    """Build repositories of `store_kind` on one shared database; all closed after the test.

    Two calls give two clients of the same data (for "someone else wrote" cases); for the
    in-memory store, whose object is the data, both calls give the same object.
    """
    built: list[Any] = []
    memory: dict[type[Any], InMemoryRepository[Any]] = {}
    target = (
        request.getfixturevalue("pg_database")
        if store_kind == "postgres"
        else str(tmp_path / "store.sqlite3")
    )

    def make(aggregate_type: type[A], **options: Any) -> Repository[A]:
        """A repository of the kind under test; `options` are store arguments every kind takes
        (retention, clock, max_state_bytes). In memory, the first call's options stand."""
        if store_kind == "memory":
            if aggregate_type not in memory:
                memory[aggregate_type] = InMemoryRepository(aggregate_type, **options)
            return memory[aggregate_type]
        store: Repository[A] = (
            PostgresRepository(target, aggregate_type, max_size=4, **options)
            if store_kind == "postgres"
            else SQLiteRepository(target, aggregate_type, **options)
        )
        built.append(store)
        return store

    yield make
    for store in built:
        await store.close()


class DurableStore:
    """A database of one kind, opened as repositories and poked at with its raw driver."""

    def __init__(self, kind: str, target: str) -> None:
        self.kind = kind
        self.target = target
        self.opened: list[Any] = []

    def open(self, aggregate_type: type[A], **options: Any) -> Repository[A]:
        """A new repository client on this database, closed after the test."""
        store: Repository[A] = (
            PostgresRepository(self.target, aggregate_type, **options)
            if self.kind == "postgres"
            else SQLiteRepository(self.target, aggregate_type, **options)
        )
        self.opened.append(store)
        return store

    def execute(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement (`%s` placeholders) with the driver, outside any repository."""
        if self.kind == "postgres":
            import psycopg

            with psycopg.connect(self.target, autocommit=True) as conn:
                cur = conn.execute(statement, params)
                return cur.fetchall() if cur.description else []
        with closing(sqlite3.connect(self.target, isolation_level=None)) as conn:
            return conn.execute(statement.replace("%s", "?"), params).fetchall()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def durable_target(request: pytest.FixtureRequest, sqlite_path: Path) -> tuple[str, str]:
    """("sqlite", a fresh file path) or ("postgres", the DSN of a fresh database)."""
    kind: str = request.param
    if kind == "postgres":
        return kind, request.getfixturevalue("pg_database")
    return kind, str(sqlite_path)


@pytest.fixture
async def durable_store(durable_target: tuple[str, str]) -> AsyncIterator[DurableStore]:
    """A fresh SQLite file or PostgreSQL database, with raw access for breaking it on purpose."""
    store = DurableStore(*durable_target)
    yield store
    for repository in store.opened:
        await repository.close()


@contextmanager
def thread_blocked(worker: Executor) -> Iterator[None]:
    """Keep a store's worker thread (`store._executor` writes, `store._reader` reads) busy
    until the block ends: its jobs queue up meanwhile."""
    release = threading.Event()
    worker.submit(release.wait, 30)
    try:
        yield
    finally:
        release.set()


def writer_thread_blocked(store: SQLiteRepository[Any]) -> AbstractContextManager[None]:
    return thread_blocked(store._executor)


def reader_thread_blocked(store: SQLiteRepository[Any]) -> AbstractContextManager[None]:
    return thread_blocked(store._reader)


async def cancel_after_steps(task: asyncio.Task[Any], steps: int) -> bool:
    """Let `task` run `steps` event-loop steps (not a wait for time), cancel it and wait for
    it to end; whether the cancel caught it (False: it had finished first)."""
    for _ in range(steps):
        await asyncio.sleep(0)
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
    return task.cancelled()
