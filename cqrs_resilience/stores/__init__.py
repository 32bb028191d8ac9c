"""Durable repositories: SQLite (stdlib) and PostgreSQL (`pip install 'cqrs-resilience[postgres]'`).

Both keep the `Repository` contract of `InMemoryRepository`: the version check and the command
id record happen in the database, in the transaction that writes. Driver failures come out as
`TransientError` when a retry may help and as a `StoreError` subclass when it will not.
"""

from .._errors import (
    CorruptStateError,
    IdempotencyKeyReuseError,
    InvalidStateError,
    SchemaError,
    StoreClosedError,
    StoreConfigurationError,
    StoreError,
    VersionPrunedError,
)
from ._postgres import PostgresRepository
from ._sqlite import SQLiteRepository

__all__ = [
    "CorruptStateError",
    "IdempotencyKeyReuseError",
    "InvalidStateError",
    "PostgresRepository",
    "SQLiteRepository",
    "SchemaError",
    "StoreClosedError",
    "StoreConfigurationError",
    "StoreError",
    "VersionPrunedError",
]
