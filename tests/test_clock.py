"""The fake clock and the testing switch that users test their own handlers with."""

from __future__ import annotations

import asyncio

import pytest

from cqrs_resilience import FakeClock, SystemClock, is_testing, set_testing


async def test_autojump_clock_moves_time_by_each_sleep() -> None:
    """An autojump sleep returns at once and advances time by its length."""
    clock = FakeClock(start=100.0)
    await clock.sleep(1.5)
    clock.sleep_sync(0.5)
    assert clock.monotonic() == 102.0
    assert clock.sleeps == [1.5, 0.5]


async def test_manual_clock_wakes_sleepers_in_deadline_order() -> None:
    """Without autojump, sleepers wake when advance() passes their deadline."""
    clock = FakeClock(autojump=False)
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper("late", 2)), asyncio.create_task(sleeper("early", 1))]
    await clock.wait_for_sleepers(2)
    clock.advance(1)
    await asyncio.sleep(0)
    assert woke == ["early"]
    clock.advance(1)
    await asyncio.gather(*tasks)
    assert woke == ["early", "late"]
    assert clock.pending == 0


def test_clock_cannot_go_back() -> None:
    """advance() refuses negative time."""
    with pytest.raises(ValueError, match="back"):
        FakeClock().advance(-1)


def test_set_testing_switches_and_restores() -> None:
    """set_testing() applies at once; as a context manager it restores the previous state."""
    assert not is_testing()
    with set_testing():
        assert is_testing()
        with set_testing(False):
            assert not is_testing()
        assert is_testing()
    assert not is_testing()


async def test_system_clock_sleeps_for_real_but_zero_is_instant() -> None:
    """The real clock's zero sleep yields and returns."""
    clock = SystemClock()
    before = clock.monotonic()
    await clock.sleep(0)
    clock.sleep_sync(0)
    assert clock.monotonic() >= before


async def test_shipped_fake_clock_fixture_records_backoff(fake_clock: FakeClock) -> None:
    """The plugin's fake_clock fixture is a FakeClock users can hand to retry()."""
    from cqrs_resilience import FixedRetryPolicy, TransientError, retry

    calls = 0

    async def flaky() -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise TransientError("x")
        return calls

    assert await retry(FixedRetryPolicy(delay_ms=40, jitter=False), clock=fake_clock)(flaky)() == 3
    assert fake_clock.sleeps == [0.04, 0.04]


@pytest.mark.usefixtures("no_backoff")
def test_shipped_no_backoff_fixture_switches_testing_on() -> None:
    """The plugin's no_backoff fixture turns testing mode on for the test."""
    assert is_testing()
