"""The `cqrs-resilience` command (also `python -m cqrs_resilience`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a rate in [0, 1)")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _dsn(text: str) -> str:
    # libpq takes URLs and "key=value" connection strings alike.
    if not text.startswith(("postgresql://", "postgres://")) and "=" not in text:
        raise argparse.ArgumentTypeError(
            "expected a PostgreSQL URL such as postgresql://user:password@host:5432/dbname "
            "(or a libpq string such as 'host=... dbname=...')"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cqrs-resilience",
        description="Retry and conflict resolution for CQRS command handlers.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="many concurrent writers on a few hot orders, with injected faults",
        description=(
            "Run N concurrent writers that add line items to a few hot orders through a "
            "ResilientCommandHandler with a three-way MERGE, while the store injects "
            "transient faults and commit-then-timeout faults. Ends with a table and a check "
            "that every update is in the final state exactly once; exits 1 if not."
        ),
    )
    demo.add_argument(
        "--writers", type=_positive, default=32, help="concurrent writers (default 32)"
    )
    demo.add_argument(
        "--updates", type=_positive, default=25, help="commands per writer (default 25)"
    )
    demo.add_argument("--orders", type=_positive, default=3, help="hot orders (default 3)")
    demo.add_argument(
        "--transient-rate",
        type=_rate,
        default=0.1,
        help="share of writes that fail before writing (default 0.1)",
    )
    demo.add_argument(
        "--timeout-rate",
        type=_rate,
        default=0.02,
        help="share of writes that commit, then time out (default 0.02)",
    )
    demo.add_argument(
        "--dsn",
        type=_dsn,
        default=None,
        help="PostgreSQL URL or libpq string (default: a SQLite file in a temporary folder)",
    )
    demo.add_argument(
        "--sqlite",
        metavar="PATH",
        default=None,
        help="SQLite file to use instead of a temporary one",
    )
    demo.add_argument(
        "--processes",
        type=_positive,
        default=1,
        help="worker processes sharing the database (default 1)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed for faults (default 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "demo":
        parser.print_help()
        return 2
    if args.processes > args.writers:
        parser.error(f"--processes ({args.processes}) cannot exceed --writers ({args.writers})")
    if args.dsn and args.sqlite:
        parser.error("give --dsn or --sqlite, not both")

    from ._demo import default_options, format_report, run_demo
    from ._errors import TransientError
    from .stores import StoreError

    options = default_options(
        writers=args.writers,
        updates=args.updates,
        orders=args.orders,
        transient_rate=args.transient_rate,
        timeout_rate=args.timeout_rate,
        processes=args.processes,
        dsn=args.dsn,
        sqlite_path=args.sqlite,
        seed=args.seed,
    )
    print(
        f"cqrs-resilience demo: {options.writers} writers x {options.updates} commands on "
        f"{options.orders} hot orders, {options.transient_rate:.0%} transient faults, "
        f"{options.timeout_rate:.0%} commit-then-timeout",
        flush=True,
    )
    try:
        report = run_demo(options)
    except (StoreError, TransientError, ImportError, OSError) as exc:
        print(f"cqrs-resilience: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
