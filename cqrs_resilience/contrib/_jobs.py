"""Commands as jobs of a durable queue, whatever the queue: what a job carries, how it runs,
and what the queue should do with its outcome. The adapters (`contrib.procrastinate`, and a
Celery, arq or Dramatiq one later) only translate this to their engine.

- **What a job carries**: the command, encoded as msgspec JSON. Its `command_id` is inside,
  so every run of the job (the engine's retry, a stalled job recovered, a retry by hand) is
  the same command to the stores, whose idempotency makes its effect happen once.
- **How it runs**: decoded as the registered command type, then handed to the handler (a
  handler class's `handle`, or any async function taking the command: a `pipeline()`).
  A payload that does not decode is `UndecodableCommandError`: the job fails at once, and the
  queue goes on.
- **What the queue should do** when the handler raised (`JobRetry.decide`): short transient
  failures are the in-process `retry()`'s; what outlived it and may pass with time is retried
  by the engine, with its backoff, at least the error's `retry_after`, up to `max_retries`
  runs in all; anything else fails the job at once, never retried.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import msgspec

from .._checks import MORE_CALLS, setting
from .._errors import (
    BrokenCircuitError,
    CommandInProgressError,
    ConcurrencyError,
    StoreClosedError,
    TransientError,
    UndecodableCommandError,
)
from .._pipeline import async_only, name_of

C = TypeVar("C")

PASSES_WITH_TIME: tuple[type[BaseException], ...] = (
    TransientError,  # outlived the in-process retries (a longer outage)
    ConnectionError,
    TimeoutError,  # `CommandTimeoutError` too
    BrokenCircuitError,  # the dependency is down: ask again after the break
    CommandInProgressError,  # another worker has this command in flight
    ConcurrencyError,  # a hot aggregate outlasted the conflict resolutions
    StoreClosedError,  # this worker is shutting down; another picks the job up
)
"""What a job that raised is retried for by its engine: failures that may pass with time."""


class JobRetry(msgspec.Struct, frozen=True, kw_only=True):
    """How the queue retries a job whose command failed in a way that may pass with time:
    at most `max_retries` more runs of the job after the first, waiting `wait_s`, then twice
    as long each time, at most `max_wait_s` (and never less than the error's `retry_after`).

    `max_retries` counts as a retry policy's `max_retries` and procrastinate's own
    `RetryStrategy(max_attempts=N)` do: N more runs after the first.
    """

    max_retries: int = 10
    """Runs of the job: at most N more calls after the first (10: at most 11 runs in all);
    0 never retries."""
    wait_s: float = 1.0
    """Seconds to wait before the second run; each later wait doubles it."""
    max_wait_s: float = 300.0
    """The longest wait before a run, in seconds."""

    def __post_init__(self) -> None:
        setting(
            "max_retries",
            self.max_retries,
            f"an int >= 0 ({MORE_CALLS})",
            _at_least_zero,
            integer=True,
        )
        setting("wait_s", self.wait_s, "a finite number of seconds >= 0", _finite)
        setting("max_wait_s", self.max_wait_s, "a finite number of seconds >= 0", _finite)

    def decide(self, error: BaseException, attempts: int) -> float | None:
        """Seconds to wait before the next run of a job that raised `error` on its
        `attempts`-th run (1 for the first), or None: fail it now."""
        if not isinstance(error, PASSES_WITH_TIME) or attempts > self.max_retries:
            return None
        wait: float = min(self.wait_s * 2.0 ** (attempts - 1), self.max_wait_s)
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, int | float) and math.isfinite(retry_after):
            wait = max(wait, min(float(retry_after), self.max_wait_s))
        return wait


class CommandJobs(Generic[C]):
    """Commands of one type, as jobs: `encode` what a job carries, `run` a job."""

    def __init__(self, handler: Any, command_type: type[C]) -> None:
        if not isinstance(command_type, type):
            raise TypeError(f"the command type must be a class, got {command_type!r}")
        handle = getattr(handler, "handle", handler)
        if not callable(handle):
            raise TypeError(
                f"a queued command is handled by a handler (with a `handle` method) or an async "
                f"function taking the command, got {handler!r}"
            )
        self.handle: Callable[[C], Awaitable[Any]] = async_only(
            handle, f"a queued {command_type.__name__}'s handler"
        )
        self.command_type = command_type
        self.name = f"{name_of(handle)}({command_type.__name__})"
        self._encode = msgspec.json.Encoder().encode
        self._decode = msgspec.json.Decoder(command_type).decode

    def encode(self, command: C) -> str:
        """What a job carries: the command as JSON text."""
        if not isinstance(command, self.command_type):
            raise TypeError(
                f"this queue takes {self.command_type.__name__} commands, "
                f"got {type(command).__name__}"
            )
        return self._encode(command).decode()

    def decode(self, payload: object) -> C:
        """The command a job carries; `UndecodableCommandError` if it carries none."""
        if not isinstance(payload, str):
            raise UndecodableCommandError(
                self.command_type.__name__, f"the job carries {type(payload).__name__}, not JSON"
            )
        try:
            return self._decode(payload)
        except msgspec.DecodeError as exc:
            raise UndecodableCommandError(self.command_type.__name__, str(exc)) from exc

    async def run(self, payload: object) -> Any:
        """Decode the job's command and handle it; what the handler raises, raised (for the
        engine to decide with `JobRetry.decide`)."""
        return await self.handle(self.decode(payload))


def _at_least_zero(value: float) -> bool:
    return value >= 0


def _finite(value: float) -> bool:
    return 0 <= value < math.inf
