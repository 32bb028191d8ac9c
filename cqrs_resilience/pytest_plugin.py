"""pytest fixtures for testing code that uses cqrs_resilience; loaded automatically by pytest.

- `fake_clock`: a `FakeClock` (autojump): pass it as `clock=` to `retry()` or a handler and
  read the backoff schedule from `fake_clock.sleeps`, without waiting.
- `no_backoff`: `set_testing()` for one test: retries happen, sleeps do not.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._clock import FakeClock, set_testing


@pytest.fixture
def fake_clock() -> FakeClock:
    """A fake clock that jumps through every backoff at once and records it."""
    return FakeClock()


@pytest.fixture
def no_backoff() -> Iterator[None]:
    """Remove every backoff sleep for the duration of the test."""
    with set_testing():
        yield
