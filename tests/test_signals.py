"""Stop signals: the first of SIGINT, SIGTERM, SIGHUP stops a run, later ones wait or go."""

from __future__ import annotations

import asyncio
import signal
import threading

import pytest

from cqrs_resilience._signals import signals_held, stop_on_signals


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_raises_keyboard_interrupt_and_is_remembered(signum: int) -> None:
    """SIGTERM and SIGHUP stop a run the way Ctrl-C does, and the run knows which came."""
    with stop_on_signals() as stop, pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signum)
    assert stop.signum == signum


def test_signals_after_the_first_do_not_cut_the_stop_short() -> None:
    """Once a run is stopping, another signal neither raises again nor changes the status."""
    cleaned_up = False
    with stop_on_signals() as stop:
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            signal.raise_signal(signal.SIGTERM)
            cleaned_up = True
    assert cleaned_up
    assert stop.signum == signal.SIGINT


def test_in_an_event_loop_the_stop_comes_between_callbacks() -> None:
    """Inside asyncio.run a stop signal ends the run, and the tasks' cleanup still runs."""
    closed = []

    async def run() -> None:
        try:
            signal.raise_signal(signal.SIGTERM)
            await asyncio.Event().wait()  # until cancelled
        finally:
            closed.append(True)

    with stop_on_signals() as stop, pytest.raises(KeyboardInterrupt):
        asyncio.run(run())
    assert closed == [True]
    assert stop.signum == signal.SIGTERM


def test_handlers_are_put_back_afterwards() -> None:
    """After the run, each signal has the handler it had before."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals():
        pass
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_a_signal_ignored_from_the_start_stays_ignored() -> None:
    """`nohup` (SIGHUP ignored) and background jobs (SIGINT ignored) keep their choice."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stop_on_signals() as stop:
            signal.raise_signal(signal.SIGHUP)
        assert stop.signum is None
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_signal_during_a_held_block_comes_when_it_ends() -> None:
    """Lines that must run whole (starting a worker, removing a folder) finish first; the
    signal then stops the run."""
    finished = []

    def held_block() -> None:
        with signals_held():
            signal.raise_signal(signal.SIGTERM)
            finished.append(True)

    with stop_on_signals() as stop, pytest.raises(KeyboardInterrupt):
        held_block()
    assert finished == [True]
    assert stop.signum == signal.SIGTERM


def test_a_held_signal_is_dropped_when_the_run_is_stopping_anyway() -> None:
    """A signal held while the block raised (or with deliver=False) is not raised again."""

    def failing_block() -> None:
        with signals_held():
            signal.raise_signal(signal.SIGTERM)
            raise RuntimeError("stopping")

    with stop_on_signals() as stop:
        with pytest.raises(RuntimeError, match="stopping"):
            failing_block()
        with signals_held(deliver=False):
            signal.raise_signal(signal.SIGTERM)
    assert stop.signum is None


def test_off_the_main_thread_nothing_is_installed() -> None:
    """From another thread (where Python allows no signal handlers) both are no-ops."""
    errors: list[BaseException] = []
    before = signal.getsignal(signal.SIGTERM)

    def run() -> None:
        try:
            with stop_on_signals() as stop, signals_held():
                assert signal.getsignal(signal.SIGTERM) == before
            assert stop.signum is None
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == []
