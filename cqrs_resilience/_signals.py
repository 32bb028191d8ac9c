"""How the command line stops: SIGINT (Ctrl-C), SIGTERM and SIGHUP all end a run one way.

`stop_on_signals()` turns the first of them into `KeyboardInterrupt`, so one path stops
worker processes, closes the store and removes the temporary folder whatever the signal, and
remembers the signal for the exit status (128 + its number, as shells report it). In an
event loop the exception is raised between two callbacks, where `asyncio.run` can cancel its
tasks and let their `finally` blocks run. Later signals are ignored: the stop under way
is bounded (worker processes that do not end in time are killed), and a second Ctrl-C must
not cut it short. A signal the process was started with ignored (`nohup`, a background job
of a script) stays ignored.

`signals_held()` holds stop signals back while a few lines must run whole whoever handles
the signals: starting worker processes (a worker started must be a worker tracked), stopping
them, creating and removing the temporary folder. A signal held there is delivered when the
block ends; if the block ends with an exception, the run is stopping already and the signal
is dropped. The kernel's signal mask is set too, so worker processes started inside inherit
the signals blocked until `follow_parent()` decides what they do with them.

In a worker process, `follow_parent()` ignores Ctrl-C and hang-ups (they reach the whole
process group, and the parent stops its workers itself), keeps SIGTERM deadly (the parent's
`terminate()`), and exits the worker as soon as the parent is gone, even killed by SIGKILL.

Signal handlers belong to the main thread: called from any other thread, `stop_on_signals()`
and `signals_held()` change nothing, and the signals keep their default (SIGTERM and SIGHUP
end the process at once, Ctrl-C raises `KeyboardInterrupt` in the main thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import Any

STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)
"""The signals that stop a run (SIGHUP only where the platform has it)."""
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Stop:
    """The first stop signal that came while `stop_on_signals()` was on, if any."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            return  # stopping already
        self.signum = signum
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise KeyboardInterrupt from None
        loop.call_soon_threadsafe(_interrupt)


def _interrupt() -> None:
    raise KeyboardInterrupt


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Stop]:
    """The first SIGINT, SIGTERM or SIGHUP raises `KeyboardInterrupt`; later ones are ignored."""
    stop = Stop()
    if not _in_main_thread():
        yield stop
        return
    previous: dict[signal.Signals, _Handler] = {}
    try:
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) != signal.SIG_IGN:
                previous[signum] = signal.signal(signum, stop._on_signal)
        yield stop
    finally:
        _restore(previous)


@contextlib.contextmanager
def signals_held(*, deliver: bool = True) -> Iterator[None]:
    """Stop signals wait until the block ends; then the first is delivered, unless the block
    raised or `deliver` is false."""
    if not _in_main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    mask = _block(STOP_SIGNALS)  # first, so none slips in while the handlers change
    previous: dict[signal.Signals, _Handler] = {}
    try:
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) != signal.SIG_IGN:
                previous[signum] = signal.signal(signum, hold)
        yield
    finally:
        _unblock(mask)  # signals that came meanwhile run `hold` here
        _restore(previous)
    if held and deliver:
        signal.raise_signal(held[0])


def follow_parent() -> None:
    """In a worker process: leave Ctrl-C and hang-ups to the parent, and exit when it is gone."""
    for signum in STOP_SIGNALS:
        if signum != signal.SIGTERM:
            signal.signal(signum, signal.SIG_IGN)  # also drops any that came while blocked
    if hasattr(signal, "pthread_sigmask"):  # the parent started us with them blocked
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(
            target=_exit_with, args=(parent,), name="cqrs-resilience-parent", daemon=True
        ).start()


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    # multiprocessing keeps a pipe to the parent that closes only when the parent ends.
    parent.join()
    os._exit(1)  # nobody is left to read the status, or the results


def _block(signums: tuple[signal.Signals, ...]) -> set[int | signal.Signals] | None:
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, signums)


def _unblock(mask: set[int | signal.Signals] | None) -> None:
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _restore(previous: Mapping[signal.Signals, _Handler]) -> None:
    for signum, handler in previous.items():
        # None: a handler set outside Python, which cannot be put back from here.
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)
