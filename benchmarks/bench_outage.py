"""An outage on the test clock: what retries do to a failing dependency, with and without a
retry budget and a circuit breaker.

1,000 commands/s for 60 s through
``pipeline(retry(ExponentialBackoffPolicy(max_retries=5), budget=...), circuit_breaker())``
(retry outside the breaker, as Polly recommends). The dependency is healthy for 20 s, down for
20 s (every call fails), then fails 10% of calls at random. Time is a `FakeClock` the loop
moves by one command's interval (1 ms), so a minute of traffic runs in seconds, the same way
every run.

Reported per side: calls per first attempt during the outage (what the failing dependency
sees for each command sent), when the breaker opened and how many calls reached the
dependency after that (with how many trials its breaks allow), and the success rate in the
10% phase. Targets: at most 1.35 calls per
first attempt with the budget (6 without); with the breaker, calls during the outage drop to
the trial calls within ``break_duration_s`` of opening; in the 10% phase the budget keeps the
success rate of plain retries (at least 99.9%).

    python benchmarks/bench_outage.py           # full run (about a minute)
    python benchmarks/bench_outage.py --quick   # smoke run
    python benchmarks/bench_outage.py --failure-ratio 0.5   # a breaker that tolerates 10%
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from cqrs_resilience import (
    CIRCUIT_OPENED,
    ExponentialBackoffPolicy,
    FakeClock,
    HookRegistry,
    RetryBudget,
    TransientError,
    circuit_breaker,
    pipeline,
    retry,
)


class Timeline(msgspec.Struct, frozen=True):
    healthy_s: float = 20.0
    outage_s: float = 20.0
    faulty_s: float = 20.0
    fault_rate: float = 0.1
    rate_per_s: int = 1000

    def phase(self, now: float) -> str:
        if now < self.healthy_s:
            return "healthy"
        return "outage" if now < self.healthy_s + self.outage_s else "faulty"

    @property
    def total_s(self) -> float:
        return self.healthy_s + self.outage_s + self.faulty_s


class Result(msgspec.Struct):
    side: str
    first_attempts: dict[str, int]
    calls: dict[str, int]
    succeeded: dict[str, int]
    calls_while_open: int  # outage calls that reached the dependency after the breaker opened
    opened_at: float | None
    break_duration_s: float


async def simulate(
    timeline: Timeline, *, budget: bool, breaker: bool, seed: int, failure_ratio: float
) -> Result:
    clock = FakeClock(autojump=False)
    hooks = HookRegistry()
    rng = random.Random(seed)
    phases = ("healthy", "outage", "faulty")
    first = dict.fromkeys(phases, 0)
    calls = dict.fromkeys(phases, 0)
    succeeded = dict.fromkeys(phases, 0)
    late = [0]
    opened: list[float] = []

    @hooks.hook(CIRCUIT_OPENED)
    def on_open(context: dict[str, Any]) -> None:
        opened.append(clock.now)

    async def dependency() -> str:
        now = clock.now
        phase = timeline.phase(now)
        calls[phase] += 1
        if phase == "outage":
            if opened:
                late[0] += 1
            raise TransientError("dependency down")
        if phase == "faulty" and rng.random() < timeline.fault_rate:
            raise TransientError("dependency blip")
        return "ok"

    behaviors: list[Callable[[Any], Any]] = [
        retry(
            ExponentialBackoffPolicy(max_retries=5),
            budget=RetryBudget(clock=clock) if budget else None,
            clock=clock,
            hooks=hooks,
        )
    ]
    guard = circuit_breaker(failure_ratio=failure_ratio, clock=clock, hooks=hooks)
    if breaker:
        behaviors.append(guard)
    handler = pipeline(*behaviors)(dependency)

    async def command() -> None:
        phase = timeline.phase(clock.now)
        first[phase] += 1
        try:
            await handler()
        except Exception:
            return
        succeeded[phase] += 1

    step = 1.0 / timeline.rate_per_s  # one command per step
    tasks: set[asyncio.Task[None]] = set()
    for _ in range(round(timeline.total_s * timeline.rate_per_s)):
        task = asyncio.create_task(command())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        for _ in range(4):  # let every runnable task reach its next sleep or its end
            await asyncio.sleep(0)
        clock.advance(step)
    while tasks:  # drain: the last commands' retries
        for _ in range(4):
            await asyncio.sleep(0)
        clock.advance(step)
    name = " + ".join(["retry"] + (["budget"] if budget else []) + (["breaker"] if breaker else []))
    first_open = opened[0] if opened else None
    return Result(name, first, calls, succeeded, late[0], first_open, guard.break_duration_s)


def table(results: list[Result], timeline: Timeline) -> list[str]:
    lines = [
        "| side | calls per first attempt, outage | breaker opened | calls while open "
        "(trials possible) | success, 10% phase | success, healthy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        per_first = r.calls["outage"] / r.first_attempts["outage"]
        faulty = r.succeeded["faulty"] / r.first_attempts["faulty"]
        healthy = r.succeeded["healthy"] / r.first_attempts["healthy"]
        if r.opened_at is None:
            opened, while_open = "never", "-"
        else:
            opened = f"{r.opened_at - timeline.healthy_s:.2f} s in"
            end = timeline.healthy_s + timeline.outage_s
            trials = math.ceil((end - r.opened_at) / r.break_duration_s)
            while_open = f"{r.calls_while_open:,} ({trials})"
        lines.append(
            f"| {r.side} | {per_first:.2f} | {opened} | {while_open} | {faulty:.2%} "
            f"| {healthy:.2%} |"
        )
    return lines


async def main_async(timeline: Timeline, seed: int, failure_ratio: float) -> list[Result]:
    sides = [(False, False), (True, False), (False, True), (True, True)]
    return [
        await simulate(
            timeline, budget=budget, breaker=breaker, seed=seed, failure_ratio=failure_ratio
        )
        for budget, breaker in sides
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a 10x shorter timeline")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--failure-ratio",
        type=float,
        default=0.1,
        help="the breaker's failure_ratio (default: 0.1, the breaker's own default)",
    )
    args = parser.parse_args()
    timeline = Timeline()
    if args.quick:
        timeline = Timeline(healthy_s=12.0, outage_s=12.0, faulty_s=2.0, rate_per_s=100)
    logging.getLogger("cqrs_resilience").setLevel(logging.ERROR)  # the openings are in the table
    results = asyncio.run(main_async(timeline, args.seed, args.failure_ratio))
    print(
        f"{timeline.rate_per_s:,} commands/s: {timeline.healthy_s:g} s healthy, "
        f"{timeline.outage_s:g} s down, {timeline.faulty_s:g} s with "
        f"{timeline.fault_rate:.0%} faults; test clock, seed {args.seed}; breaker "
        f"failure_ratio={args.failure_ratio:g}\n"
    )
    print("\n".join(table(results, timeline)))
    by = {r.side: r for r in results}
    budgeted = by["retry + budget"]
    plain = by["retry"]
    guarded = [r for r in results if r.opened_at is not None]
    end = timeline.healthy_s + timeline.outage_s
    checks = [
        (
            "with the budget, at most 1.35 calls per first attempt in the outage",
            budgeted.calls["outage"] / budgeted.first_attempts["outage"] <= 1.35,
        ),
        (
            "in the 10% phase the budget keeps plain retry's success rate (>= 99.9%)",
            budgeted.succeeded["faulty"] / budgeted.first_attempts["faulty"] >= 0.999
            and budgeted.succeeded["faulty"] >= plain.succeeded["faulty"] * 0.999,
        ),
        (
            "with the breaker, only trial calls reach the dependency once it opened",
            bool(guarded)
            and all(
                r.calls_while_open <= math.ceil((end - (r.opened_at or 0.0)) / r.break_duration_s)
                for r in guarded
            ),
        ),
    ]
    print()
    for what, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
    return 0 if args.quick or all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
