"""A real PostgreSQL for the tests: the one `CQRS_RESILIENCE_PG_DSN` names, or a throwaway one
(`cqrs_resilience._pg_server`, which the demo uses too).

Run `python tests/pg_server.py` to get a server by hand; it stops when you press Enter.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

if __name__ == "__main__":  # run as a script: make the repository's package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cqrs_resilience._pg_server import (
    PostgresServer,
    PostgresUnavailableError,
    find_bin_dir,
)

__all__ = ["ENV_DSN", "PostgresServer", "PostgresUnavailableError", "find_bin_dir", "postgres_dsn"]

ENV_DSN = "CQRS_RESILIENCE_PG_DSN"


@contextmanager
def postgres_dsn() -> Iterator[str]:
    """The DSN in `CQRS_RESILIENCE_PG_DSN`, else one of a server started for the block."""
    given = os.environ.get(ENV_DSN)
    if given:
        yield given
        return
    try:
        server = PostgresServer()
    except PostgresUnavailableError as exc:
        raise PostgresUnavailableError(f"{exc}; or run .ci/postgres.sh, or set {ENV_DSN}") from exc
    with server as dsn:
        yield dsn


if __name__ == "__main__":
    with PostgresServer() as dsn:
        print(dsn, flush=True)
        input("PostgreSQL is running; press Enter to stop it. ")
