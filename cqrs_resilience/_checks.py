"""Settings checked where they are made: a wrong one fails at once, naming the argument."""

from __future__ import annotations

from collections.abc import Callable

from ._errors import ConfigurationError

# What a count of calls means, in the same words wherever a setting or its error states it.
MORE_CALLS = "at most N more calls after the first"
"""`max_retries=N` (a retry policy, a queue's `JobRetry`), `max_attempts=N` (a
`ConflictConfig`): every count of calls is of calls after the first."""


def setting(
    name: str,
    value: object,
    allowed: str,
    ok: Callable[[float], bool],
    *,
    kind: str | None = None,
    integer: bool = False,
) -> float:
    """`value` as a float, if it is a number (an int with `integer`) for which `ok` holds.

    Otherwise a `ConfigurationError`: "`name` must be `kind`" for a value of the wrong type
    (`kind` defaults to `allowed`), "`name` must be `allowed`" for one out of range. NaN fails
    an `ok` made of comparisons, and an integer too big for a float fails too (it would
    overflow later, in arithmetic on the setting).
    """
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ConfigurationError(f"{name} must be {kind or allowed}, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        bits = value.bit_length() if isinstance(value, int) else "?"
        raise ConfigurationError(
            f"{name} must be {allowed}, got an integer of {bits} bits"
        ) from None
    if not ok(number):
        raise ConfigurationError(f"{name} must be {allowed}, got {value!r}")
    return number
