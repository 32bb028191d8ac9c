"""The `cqrs-resilience` command (also `python -m cqrs_resilience`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import textwrap
from collections.abc import Sequence

from ._demo import (
    DEMO_POLICY,
    MAX_RETRIES_LIMIT,
    DemoOptions,
    Report,
    default_options,
    format_report,
    plural,
    run_demo,
    temporary_sqlite,
)
from ._errors import TransientError
from ._pg_server import PostgresUnavailableError
from ._signals import stop_on_signals
from .stores import StoreError

ENGINES = ("inline", "procrastinate")
DEFAULT_WORKERS = 2

# Exit statuses of `demo`, one place for the code and its --help.
EXIT_OK = 0
EXIT_LOST_OR_DOUBLED = 1
EXIT_USAGE = 2
EXIT_FAILED_VISIBLY = 3
# 128 + the signal's number, as shells report a process a signal ended.
EXIT_HUNG_UP = 129  # SIGHUP
EXIT_INTERRUPTED = 130  # SIGINT
EXIT_TERMINATED = 143  # SIGTERM

_EXIT_CODES = f"""\
exit status:
  {EXIT_OK}    every update in its order exactly once, every command acknowledged
  {EXIT_LOST_OR_DOUBLED}    an acknowledged update was lost, an update doubled, or versions
       inconsistent (the exactly-once check failed)
  {EXIT_USAGE}    bad options, or the store could not be opened
  {EXIT_FAILED_VISIBLY}    some commands failed visibly (their caller got the error) but
       nothing was lost or doubled
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
  {EXIT_TERMINATED}  interrupted by SIGTERM ({EXIT_HUNG_UP}: by SIGHUP), which stops the demo
       as Ctrl-C does: worker processes stopped, temporary folder (or
       throwaway server) removed
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cqrs-resilience")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from . import __version__

        return __version__


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a rate in [0, 1)")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _positive(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _retries(text: str) -> int:
    value = _whole(text)
    if not 0 <= value <= MAX_RETRIES_LIMIT:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and {MAX_RETRIES_LIMIT}")
    return value


def _dsn(text: str) -> str:
    # libpq takes URLs and "key=value" connection strings alike.
    if not text.startswith(("postgresql://", "postgres://")) and "=" not in text:
        raise argparse.ArgumentTypeError(
            "expected a PostgreSQL URL such as postgresql://user:password@host:5432/dbname "
            "(or a libpq string such as 'host=... dbname=...')"
        )
    return text


def _sqlite_path(text: str) -> str:
    # Said here, before the run, rather than as SQLite's "unable to open database file".
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, got an empty string")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.exists(directory):
        raise argparse.ArgumentTypeError(f"directory {directory} does not exist")
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"{directory} is not a directory")
    # SQLite writes its log and lock files next to the database, so the folder must be
    # writable even when the file exists.
    if not os.access(directory, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"directory {directory} is not writable")
    if os.path.exists(text) and not os.access(text, os.R_OK | os.W_OK):
        raise argparse.ArgumentTypeError(f"file {text} is not readable and writable")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cqrs-resilience",
        description="Retry and conflict resolution for CQRS command handlers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="many concurrent writers on a few hot orders, with injected faults",
        # Wrapped here: the raw formatter keeps the exit-status table's layout.
        description=textwrap.fill(
            "Run N concurrent writers that add line items to a few hot orders through a "
            "ResilientCommandHandler with a three-way MERGE, while the store injects "
            "transient faults and commit-then-timeout faults. Ends with a table and a check "
            "that every update is in the final state exactly once. With --engine "
            "procrastinate the updates are jobs of a PostgreSQL queue, run by --workers "
            "worker processes.",
            width=78,
        ),
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Errors found after parsing are the demo's, told with the demo's usage.
    demo.set_defaults(command_parser=demo)
    demo.add_argument(
        "--writers",
        type=_positive,
        default=32,
        metavar="N",
        help="concurrent writers, 1 or more (default 32)",
    )
    demo.add_argument(
        "--updates",
        type=_positive,
        default=25,
        metavar="N",
        help="commands per writer, 1 or more (default 25)",
    )
    demo.add_argument(
        "--orders", type=_positive, default=3, metavar="N", help="hot orders, 1 or more (default 3)"
    )
    demo.add_argument(
        "--transient-rate",
        type=_rate,
        default=0.1,
        metavar="R",
        help="share of writes that fail before writing, 0 <= R < 1 (default 0.1)",
    )
    demo.add_argument(
        "--timeout-rate",
        type=_rate,
        default=0.02,
        metavar="R",
        help="share of writes that commit, then time out, 0 <= R < 1 (default 0.02)",
    )
    demo.add_argument(
        "--max-retries",
        type=_retries,
        default=DEMO_POLICY.max_retries,
        metavar="N",
        help=(
            f"retries of a command after a transient failure, 0 to {MAX_RETRIES_LIMIT} "
            f"(default {DEMO_POLICY.max_retries}); with too few, commands fail visibly"
        ),
    )
    demo.add_argument(
        "--dsn",
        type=_dsn,
        default=None,
        help=(
            "PostgreSQL URL or libpq string (default: a SQLite file in a temporary folder; "
            "with --engine procrastinate, a throwaway PostgreSQL server)"
        ),
    )
    demo.add_argument(
        "--sqlite",
        type=_sqlite_path,
        metavar="PATH",
        default=None,
        help="SQLite file to use instead of a temporary one (kept after the run)",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary SQLite folder after the run and print where it is",
    )
    demo.add_argument(
        "--processes",
        type=_positive,
        default=None,
        metavar="K",
        help="worker processes sharing the database, 1 to --writers (default 1)",
    )
    demo.add_argument(
        "--engine",
        choices=ENGINES,
        default="inline",
        help=(
            "inline: the writers call the handler themselves; procrastinate: they send "
            "their updates as jobs of a PostgreSQL queue (procrastinate), run by worker "
            "processes (default inline)"
        ),
    )
    demo.add_argument(
        "--workers",
        type=_positive,
        default=None,
        metavar="N",
        help=(
            f"with --engine procrastinate: worker processes running the jobs, 1 to --writers "
            f"(default {DEFAULT_WORKERS}); PostgreSQL from --dsn, else a throwaway server"
        ),
    )
    demo.add_argument(
        "--kill-worker",
        action="store_true",
        help=(
            "with --engine procrastinate: SIGKILL one worker process in the middle of a job "
            "(another takes its place; its jobs are recovered and run again)"
        ),
    )
    demo.add_argument(
        "--lock-orders",
        action="store_true",
        help=(
            "with --engine procrastinate: run each order's jobs one at a time, in the order "
            "sent (procrastinate's job locks), so they never conflict"
        ),
    )
    demo.add_argument(
        "--seed",
        type=_whole,
        default=0,
        metavar="N",
        help="random seed for faults, any whole number (default 0)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    command_parser: argparse.ArgumentParser = getattr(args, "command_parser", parser)
    if unknown:
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command != "demo":
        parser.print_help()
        return EXIT_USAGE
    problem = _engine_problem(args)
    if problem:
        command_parser.error(problem)
    if args.processes is not None and args.processes > args.writers:
        command_parser.error(
            f"--processes ({args.processes}) cannot exceed --writers ({args.writers})"
        )
    if args.dsn and args.sqlite:
        command_parser.error("give --dsn or --sqlite, not both")
    # Off the main thread no signal handlers can be set: signals keep their defaults there.
    with stop_on_signals() as stop:
        try:
            with contextlib.ExitStack() as cleanup:
                status = _run_demo(args, cleanup)
        except KeyboardInterrupt:
            pass  # workers stopped, store closed, temporary folder removed: no traceback
        else:
            if stop.signum is None:
                return status
            # Else a signal came too late to stop the run (as asyncio.run closed its loop).
        if stop.signum in (None, signal.SIGINT):
            print(f"{_fresh_line()}cqrs-resilience: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        name = signal.Signals(stop.signum).name
        print(f"{_fresh_line()}cqrs-resilience: interrupted by {name}", file=sys.stderr)
        return 128 + stop.signum


def _engine_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the options for the engine chosen, if anything."""
    if args.engine != "procrastinate":
        for option, given in (
            ("--workers", args.workers),
            ("--kill-worker", args.kill_worker),
            ("--lock-orders", args.lock_orders),
        ):
            if given:
                return (
                    f"{option} needs --engine procrastinate (the inline engine takes --processes)"
                )
        return None
    for option, given, why in (
        ("--processes", args.processes, "its worker processes are --workers"),
        (
            "--sqlite",
            args.sqlite,
            "the queue runs on PostgreSQL (give --dsn, or neither for a throwaway server)",
        ),
        ("--keep", args.keep, "there is no temporary SQLite folder to keep"),
    ):
        if given:
            return f"{option} does not go with --engine procrastinate: {why}"
    workers = args.workers or DEFAULT_WORKERS
    if workers > args.writers:
        return f"--workers ({workers}) cannot exceed --writers ({args.writers})"
    if args.kill_worker and not hasattr(signal, "SIGKILL"):
        return "--kill-worker needs SIGKILL, which this system does not have"
    from ._demo_queue import queue_unavailable

    return queue_unavailable()


def _run_demo(args: argparse.Namespace, cleanup: contextlib.ExitStack) -> int:
    if args.engine == "procrastinate":
        return _run_queue_demo(args, cleanup)
    sqlite_path = args.sqlite
    if not args.dsn and sqlite_path is None:
        sqlite_path = cleanup.enter_context(temporary_sqlite(keep=args.keep))
        if args.keep:
            cleanup.callback(print, f"cqrs-resilience: kept {sqlite_path}", file=sys.stderr)
    options = default_options(
        writers=args.writers,
        updates=args.updates,
        orders=args.orders,
        transient_rate=args.transient_rate,
        timeout_rate=args.timeout_rate,
        processes=args.processes or 1,
        dsn=args.dsn,
        sqlite_path=sqlite_path,
        sqlite_removed=not args.dsn and args.sqlite is None and not args.keep,
        seed=args.seed,
        max_retries=args.max_retries,
    )
    _announce(options, "")
    try:
        report = run_demo(options)
    except (StoreError, TransientError, ImportError, OSError) as exc:
        print(f"cqrs-resilience: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _finish(report)


def _run_queue_demo(args: argparse.Namespace, cleanup: contextlib.ExitStack) -> int:
    from ._demo_queue import QueueOptions, run_queue_demo, throwaway_server

    dsn = args.dsn
    try:
        if dsn is None:
            dsn = cleanup.enter_context(throwaway_server())
        options = default_options(
            writers=args.writers,
            updates=args.updates,
            orders=args.orders,
            transient_rate=args.transient_rate,
            timeout_rate=args.timeout_rate,
            dsn=dsn,
            server_removed=args.dsn is None,
            seed=args.seed,
            max_retries=args.max_retries,
            lock_orders=args.lock_orders,
        )
        engine = QueueOptions(workers=args.workers or DEFAULT_WORKERS, kill_worker=args.kill_worker)
        _announce(options, f", as jobs run by {plural(engine.workers, 'worker')}")
        report = run_queue_demo(options, engine)
    except (StoreError, TransientError, ImportError, OSError, PostgresUnavailableError) as exc:
        print(f"cqrs-resilience: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _finish(report)


def _announce(options: DemoOptions, how: str) -> None:
    print(
        f"cqrs-resilience demo: {plural(options.writers, 'writer')} x "
        f"{plural(options.updates, 'command')} on {plural(options.orders, 'hot order')}, "
        f"{options.transient_rate:.0%} transient faults, "
        f"{options.timeout_rate:.0%} commit-then-timeout{how}",
        flush=True,
    )


def _finish(report: Report) -> int:
    """Print the table; the exit status it calls for."""
    print(format_report(report))
    if not report.exactly_once:
        return EXIT_LOST_OR_DOUBLED
    return EXIT_FAILED_VISIBLY if report.failed_visibly else EXIT_OK


def _fresh_line() -> str:
    # A progress bar on a terminal leaves the cursor mid-line.
    return "\n" if sys.stderr.isatty() else ""


if __name__ == "__main__":
    sys.exit(main())
