"""The one place driver errors are sorted into retry-or-not.

A driver error becomes `TransientError` when a retry may help (locked, busy, deadlock,
connection lost) and a `StoreError` subclass (see `cqrs_resilience._errors`) when it will not.
Errors are mapped, never swallowed: the store raises `map_*_error(exc, doing)` with `from exc`,
so the original stays on `__cause__`. Messages name what was being done and never include a
password.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .._errors import (
    SchemaError,
    StoreClosedError,
    StoreConfigurationError,
    StoreError,
    TransientError,
)

_MISSING_TABLES = "tables are created when a repository opens; were they dropped since?"

# --- SQLite -----------------------------------------------------------------------------------

_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26


def map_sqlite_error(exc: sqlite3.Error, doing: str) -> Exception:
    """The error to raise (chained `from exc`) for a sqlite3 error met while `doing`."""
    text = str(exc)
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED) or any(
        phrase in text for phrase in ("database is locked", "database is busy", "table is locked")
    ):
        return TransientError(f"{doing}: {text} (another connection holds the lock; retry)")
    if isinstance(exc, sqlite3.ProgrammingError) and "closed" in text:
        return StoreClosedError(f"{doing}: the SQLite connection is closed")
    if "no such table" in text:
        return SchemaError(f"{doing}: {text} ({_MISSING_TABLES})")
    if primary in (_SQLITE_CANTOPEN, _SQLITE_NOTADB):
        return StoreConfigurationError(f"{doing}: {text}")
    return StoreError(f"{doing}: {type(exc).__name__}: {text}")


@contextmanager
def sqlite_errors(doing: str) -> Iterator[None]:
    """Re-raise sqlite3 errors from the block as mapped store errors."""
    try:
        yield
    except sqlite3.Error as exc:
        raise map_sqlite_error(exc, doing) from exc


# --- PostgreSQL -------------------------------------------------------------------------------

# Retrying these is safe (persist is one transaction, repeats are idempotent) and may succeed.
_PG_TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "40003",  # statement_completion_unknown
        "55P03",  # lock_not_available
        "57014",  # query_canceled (statement or lock timeout)
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now
        "57P05",  # idle_session_timeout
        "25P03",  # idle_in_transaction_session_timeout
        "53300",  # too_many_connections
    }
)
# A server that refuses a connection with FATAL means the DSN is wrong, unless it is one of these.
_PG_TRANSIENT_FATAL = (
    "starting up",
    "shutting down",
    "in recovery",
    "too many clients",
    "remaining connection slots",
    "not yet accepting connections",
)


def map_postgres_error(exc: Exception, doing: str) -> Exception:
    """The error to raise (chained `from exc`) for a psycopg/psycopg_pool error met while `doing`.

    Only call this with psycopg installed: it sorts by psycopg's exception classes.
    """
    import psycopg
    from psycopg_pool import PoolClosed, PoolTimeout

    # The first line is the server's message; the rest quotes SQL with a caret under it.
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, PoolClosed):
        return StoreClosedError(f"{doing}: the connection pool is closed")
    if isinstance(exc, PoolTimeout):
        return TransientError(f"{doing}: no pooled connection came free in time ({text}; retry)")
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate in _PG_TRANSIENT_SQLSTATES or (sqlstate or "").startswith("08"):
        return TransientError(f"{doing}: {text} [{sqlstate}] (retry)")
    if sqlstate in ("42P01", "42703"):  # undefined table or column
        return SchemaError(f"{doing}: {text} [{sqlstate}] ({_MISSING_TABLES})")
    if sqlstate == "42501":
        return SchemaError(f"{doing}: {text} [{sqlstate}] (grant the role rights on the tables)")
    if isinstance(exc, psycopg.OperationalError) and sqlstate is None:
        # No SQLSTATE: the connection itself failed (refused, reset, server gone).
        return TransientError(f"{doing}: {text} (connection problem; retry)")
    if isinstance(exc, psycopg.InterfaceError) and "closed" in text:
        return StoreClosedError(f"{doing}: the PostgreSQL connection is closed")
    return StoreError(f"{doing}: {text} [{sqlstate or type(exc).__name__}]")


def map_postgres_connect_error(exc: Exception, target: str) -> Exception:
    """The error to raise when a first connection to `target` (password-free) fails.

    libpq gives no SQLSTATE here, so a server's FATAL refusal (unknown database, role or bad
    password) is told apart from an unreachable server by its text.
    """
    import psycopg

    text = str(exc).strip()
    doing = f"connecting to PostgreSQL {target}"
    refused = isinstance(exc, psycopg.OperationalError) and "FATAL" in text
    if refused and not any(phrase in text for phrase in _PG_TRANSIENT_FATAL):
        return StoreConfigurationError(f"{doing}: the server refused: {_fatal(text)}")
    return map_postgres_error(exc, doing)


def _fatal(text: str) -> str:
    _, _, reason = text.partition("FATAL:")
    return " ".join(reason.split()) or text


@contextmanager
def postgres_errors(doing: str) -> Iterator[None]:
    """Re-raise psycopg errors from the block (sync or async code) as mapped store errors."""
    import psycopg

    try:
        yield
    except psycopg.Error as exc:
        raise map_postgres_error(exc, doing) from exc


def safe_target(params: dict[str, Any]) -> str:
    """`user@host:port/dbname` from parsed connection parameters, without the password."""
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    user = params.get("user")
    where = f"{user}@" if user else ""
    return f"{where}{host}:{port}/{params.get('dbname') or '<default database>'}"
