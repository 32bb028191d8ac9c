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


def test_timers_fire_in_order_as_advance_passes_them() -> None:
    """call_at() callbacks run, in deadline order, when time reaches them; cancel() stops one."""
    clock = FakeClock()
    fired: list[tuple[str, float]] = []
    clock.call_at(2, lambda: fired.append(("late", clock.now)))
    clock.call_at(1, lambda: fired.append(("early", clock.now)))
    clock.call_at(1.5, lambda: fired.append(("cancelled", clock.now))).cancel()
    clock.advance(0.5)
    assert fired == []
    clock.advance(2)
    assert fired == [("early", 1), ("late", 2)]
    assert clock.now == 2.5


def test_sync_sleeps_fire_timers_they_pass() -> None:
    """A sync sleep moves time like any other, so it fires timers too."""
    clock = FakeClock()
    fired: list[float] = []
    clock.call_at(1, lambda: fired.append(clock.now))
    clock.sleep_sync(3)
    assert fired == [1]
    assert clock.now == 3


async def test_an_autojump_sleep_stops_at_a_timer_that_cancels_it() -> None:
    """A timer that cancels the sleeping task cuts its sleep short, at the timer's time."""
    clock = FakeClock()
    task = asyncio.current_task()
    assert task is not None
    clock.call_at(2, task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await clock.sleep(10)
    task.uncancel()
    assert clock.now == 2
    assert clock.sleeps == [10]


async def test_an_autojump_sleep_runs_through_timers_that_do_not_cancel_it() -> None:
    """Other timers fire on the way; the sleep still takes its full length."""
    clock = FakeClock()
    fired: list[float] = []
    clock.call_at(1, lambda: fired.append(clock.now))
    await clock.sleep(4)
    assert fired == [1]
    assert clock.now == 4
