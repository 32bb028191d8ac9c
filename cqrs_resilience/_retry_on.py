"""What a behavior counts as a failure worth retrying (or, for a breaker, worth counting),
and which argument of a call is its command. Shared by `retry()` and `circuit_breaker()`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias, cast

import tenacity

from ._errors import TransientError
from ._idempotency import is_command

RetryOn: TypeAlias = (
    type[Exception]
    | tuple[type[Exception], ...]
    | Callable[[BaseException], bool]
    | tenacity.retry_base
)
DEFAULT_RETRY_ON: tuple[type[Exception], ...] = (TransientError, ConnectionError, TimeoutError)
"""Retried when `on` is not given. `asyncio.TimeoutError` is `TimeoutError` on 3.11+."""


def predicate(on: RetryOn | None) -> Callable[[Exception], bool]:
    """Turn `on` into a test; only `Exception`s ever reach it, so cancellation never retries."""
    if on is None:
        on = DEFAULT_RETRY_ON
    if isinstance(on, tenacity.retry_base):
        strategy = on  # tenacity's retry_if_exception_type(...) and friends read the outcome

        def tenacity_says(exc: BaseException) -> bool:
            state = tenacity.RetryCallState(cast(Any, None), None, (), {})
            state.outcome = tenacity.Future.construct(1, exc, has_exception=True)
            return bool(strategy(state))

        return tenacity_says
    if isinstance(on, type) and issubclass(on, BaseException):
        on = (on,)
    if isinstance(on, tuple):
        for kind in on:
            if not (isinstance(kind, type) and issubclass(kind, BaseException)):
                raise TypeError(f"retry(on=...) takes exception types, got {kind!r}")
        kinds = on
        return lambda exc: isinstance(exc, kinds)
    if callable(on):
        return cast(Callable[[Exception], bool], on)
    raise TypeError(f"retry(on=...) takes exception types or a predicate, got {on!r}")


def command_of(args: tuple[Any, ...]) -> Any:
    """The command a call is about: its first argument, or its second after a `self`."""
    for arg in args[:2]:
        if is_command(arg):
            return arg
    return args[0] if args else None


def command_type(command: Any) -> str | None:
    """`command.type` in hooks and logs: the class name of a command (a value with a
    `command_id`), or None for anything else, such as a plain function's first argument
    (`charge("o1", 5)` is about no command of type `str`)."""
    return type(command).__name__ if is_command(command) else None
