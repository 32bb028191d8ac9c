"""What retry costs: the happy path and the retry path, against tenacity, stamina and backoff.

One process, one event loop, every contender in the same run. Happy path: ns per call of a
trivial async handler that succeeds. Retry path: a handler that fails twice with a transient
error and then succeeds, with zero delay, against a hand-written loop doing the same.
`timeout()` and `retry(budget=...)` are timed the same way, side by side with plain `retry()`. The
circuit breaker has a happy-path row (closed) and its own table for refusing calls (open). A
table of sync functions (legacy code wrapped in place) times `retry()` and the breaker there.
With the `otel` extra installed, a last table times `cqrs_resilience.otel.instrument()` on the
happy path: with the API's no-op providers (our own cost) and with the SDK's providers
exporting to memory (what a traced, metered service pays).

    python benchmarks/bench_overhead.py           # full run (about a minute)
    python benchmarks/bench_overhead.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import backoff
import stamina
import tenacity

from cqrs_resilience import (
    Command,
    CommandResponse,
    FixedRetryPolicy,
    HookRegistry,
    ResilientCommandHandler,
    RetryableCommandHandler,
    RetryBudget,
    TransientError,
    circuit_breaker,
    pipeline,
    retry,
    timeout,
)

try:
    from cqrs_resilience.otel import instrument
except ImportError:  # the otel extra is not installed: no OpenTelemetry table
    instrument = None  # type: ignore[assignment]

Call = Callable[[Any], Awaitable[Any]]
ZERO = FixedRetryPolicy(max_retries=3, delay_ms=0, jitter=False)
OURS = "cqrs_resilience retry()"
BUDGET = "cqrs_resilience retry(budget=RetryBudget(ratio=2))"
TIMEOUT = "cqrs_resilience timeout(10)"


class Ping(Command[str]):
    pass


async def ok(command: Any) -> str:
    return "ok"


def flaky_handler() -> Call:
    """Fails twice with a transient error, then succeeds; again and again."""
    calls = 0

    async def flaky(command: Any) -> str:
        nonlocal calls
        calls += 1
        if calls % 3:
            raise TransientError("blip")
        return "ok"

    return flaky


def noop_behavior(handler: Call) -> Call:
    async def wrapped(command: Any) -> Any:
        return await handler(command)

    return wrapped


async def failing(command: Any) -> str:
    raise TransientError("down")


def passthrough(handler: Callable[..., Awaitable[Any]]) -> Call:
    """The least any behaviour that keeps every signature does: forward *args, **kwargs."""

    async def forward(*args: Any, **kwargs: Any) -> Any:
        return await handler(*args, **kwargs)

    return forward


def hand_written(handler: Call) -> Call:
    """The loop a careful engineer writes by hand: the baseline for the retry path."""

    async def loop(command: Any) -> Any:
        for attempt in range(4):
            try:
                return await handler(command)
            except TransientError:
                if attempt == 3:
                    raise
                await asyncio.sleep(0)
        raise AssertionError("unreachable")

    return loop


class OkHandler(RetryableCommandHandler[str]):
    retry_policy = ZERO

    async def process(self, command: Any) -> CommandResponse[str]:
        return await self.dispatcher(command)  # type: ignore[no-any-return]


class OkResilientHandler(ResilientCommandHandler[str]):
    """Retry around conflict resolution around `process`: the full class, on the happy path."""

    retry_policy = ZERO

    async def process(self, command: Any) -> CommandResponse[str]:
        return await self.dispatcher(command)  # type: ignore[no-any-return]

    async def fetch_latest_state(self, command: Any) -> dict[str, Any] | None:
        return None

    def get_incoming_state(self, command: Any) -> dict[str, Any]:
        return {}

    def update_command(self, command: Any, merged_state: dict[str, Any]) -> Any:
        return command


def contenders() -> dict[str, Callable[[Call], Call]]:
    # stamina logs every retry by default; switch that off so only its machinery is timed.
    stamina.instrumentation.set_on_retry_hooks([])
    return {
        "bare (no retry)": lambda h: h,
        "hand-written loop": hand_written,
        OURS: retry(ZERO),
        "cqrs_resilience pipeline(retry(), 2 no-ops)": pipeline(
            retry(ZERO), noop_behavior, noop_behavior
        ),
        # ratio=2 lets the retry path (two retries per first attempt) run for ever; a deposit
        # costs the same whatever the ratio.
        BUDGET: retry(ZERO, budget=RetryBudget(ratio=2.0)),
        TIMEOUT: timeout(10),
        "cqrs_resilience pipeline(timeout(10), retry())": pipeline(timeout(10), retry(ZERO)),
        "cqrs_resilience RetryableCommandHandler.handle": lambda h: OkHandler(h).handle,
        "cqrs_resilience ResilientCommandHandler.handle": lambda h: OkResilientHandler(h).handle,
        "a no-op async wrapper (the floor for any behaviour)": passthrough,
        "cqrs_resilience circuit_breaker() (closed)": circuit_breaker(),
        "tenacity.retry": tenacity.retry(
            stop=tenacity.stop_after_attempt(4),
            wait=tenacity.wait_none(),
            retry=tenacity.retry_if_exception_type(TransientError),
            reraise=True,
        ),
        "stamina.retry": stamina.retry(
            on=TransientError, attempts=4, wait_initial=0, wait_max=0, wait_jitter=0
        ),
        "backoff.on_exception": backoff.on_exception(
            backoff.constant, TransientError, interval=0, jitter=None, max_tries=4
        ),
    }


async def per_call_ns(fns: dict[str, Call], calls: int, rounds: int) -> dict[str, float]:
    """Best of `rounds` timings of `calls` sequential awaits each, in ns per call.

    Rounds go round-robin over the contenders, so a slow spell of the machine hits all alike.
    """
    command = Ping()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter_ns()
            for _ in range(calls):
                await fn(command)
            best[name] = min(best[name], (time.perf_counter_ns() - start) / calls)
    return best


NOT_RETRYING = {
    "bare (no retry)",
    "a no-op async wrapper (the floor for any behaviour)",
    "cqrs_resilience circuit_breaker() (closed)",
    TIMEOUT,
}
"""Contenders that do not retry: they have no retry-path figure."""


async def refusal_ns(calls: int, rounds: int) -> dict[str, float]:
    """What a failed call costs the caller: raised by the handler, or refused by an open
    breaker without calling it. Best of `rounds`, ns per call."""
    breaker = circuit_breaker(minimum_throughput=2, break_duration_s=1e9)
    refusing: Call = breaker(failing)
    quiet = logging.getLogger("cqrs_resilience")
    level, quiet.level = quiet.level, logging.ERROR  # the opening's WARNING is not news here
    for _ in range(2):
        with contextlib.suppress(TransientError):
            await refusing(None)
    quiet.level = level
    assert breaker.state == "open"
    fns: dict[str, Call] = {
        "the handler raises (no breaker)": failing,
        "a no-op wrapper around the raising handler": passthrough(failing),
        "open circuit_breaker() refuses (handler not called)": refusing,
    }
    command = Ping()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter_ns()
            for _ in range(calls):
                try:  # noqa: SIM105 - suppress() would time its own context manager
                    await fn(command)
                except Exception:
                    pass
            best[name] = min(best[name], (time.perf_counter_ns() - start) / calls)
    return best


def ok_sync(command: Any) -> str:
    return "ok"


def passthrough_sync(handler: Callable[..., Any]) -> Callable[..., Any]:
    """The floor for a sync behaviour: forward *args, **kwargs."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        return handler(*args, **kwargs)

    return forward


def sync_ns(calls: int, rounds: int) -> dict[str, float]:
    """The happy path of a sync function (legacy code wrapped in place), bare and wrapped;
    best of `rounds`, ns per call, round-robin."""
    fns: dict[str, Callable[[Any], Any]] = {
        "bare sync function": ok_sync,
        "a no-op sync wrapper (the floor)": passthrough_sync(ok_sync),
        "cqrs_resilience retry() (sync)": retry(ZERO)(ok_sync),
        "cqrs_resilience circuit_breaker() (closed, sync)": circuit_breaker()(ok_sync),
    }
    command = Ping()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter_ns()
            for _ in range(calls):
                fn(command)
            best[name] = min(best[name], (time.perf_counter_ns() - start) / calls)
    return best


def clock_read_ns(calls: int) -> float:
    """What one `time.monotonic()` costs here (a few tens of ns on bare metal, more in VMs)."""
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter_ns()
        for _ in range(calls):
            time.monotonic()
        best = min(best, (time.perf_counter_ns() - start) / calls)
    return best


async def emit_ns(calls: int, rounds: int) -> tuple[float, float]:
    """What emitting an event nobody listens to costs: the guard alone, and a bare emit()."""
    hooks = HookRegistry()
    hooks.subscribe("handler.conflict.*", lambda context: None)  # someone listens elsewhere
    event, context = "handler.retry.scheduled", {"attempt": 1}
    guard = emit = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(calls):
            if hooks.wants(event):
                await hooks.emit(event, context)
        guard = min(guard, (time.perf_counter_ns() - start) / calls)
        start = time.perf_counter_ns()
        for _ in range(calls):
            await hooks.emit(event, context)
        emit = min(emit, (time.perf_counter_ns() - start) / calls)
    return guard, emit


async def otel_ns(calls: int, rounds: int) -> dict[str, dict[str, float]] | None:
    """The happy path per call uninstrumented, instrumented with the API's no-op providers,
    and with the SDK's (metrics to an in-memory reader, spans to an in-memory exporter);
    best of `rounds`, the three interleaved round by round. None without the otel extra."""
    if instrument is None:
        return None
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        return None
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    fns: dict[str, Call] = {
        OURS: retry(ZERO)(ok),
        "cqrs_resilience ResilientCommandHandler.handle": OkResilientHandler(ok).handle,
    }
    modes: dict[str, Callable[[], Callable[[], None] | None]] = {
        "off": lambda: None,
        "api": lambda: instrument(),  # the global providers, which no SDK has replaced
        "sdk": lambda: instrument(meter_provider, tracer_provider),
    }
    command = Ping()
    best = {mode: dict.fromkeys(fns, float("inf")) for mode in modes}
    # Many short rounds, the three modes side by side: differences of a microsecond need the
    # same quiet spell of the machine for all three.
    for _ in range(rounds * 5):
        for mode, start in modes.items():
            undo = start()
            n = max(calls // 10, 100) if mode != "sdk" else max(calls // 200, 50)
            for name, fn in fns.items():
                begin = time.perf_counter_ns()
                for _ in range(n):
                    await fn(command)
                best[mode][name] = min(best[mode][name], (time.perf_counter_ns() - begin) / n)
            if undo is not None:
                undo()
            exporter.clear()
    return best


def fmt_ns(ns: float) -> str:
    return f"{ns / 1000:,.2f} µs" if ns >= 10_000 else f"{ns:,.0f} ns"


async def main(quick: bool) -> None:
    calls, rounds = (2_000, 3) if quick else (50_000, 7)
    retry_calls = calls // 5
    makers = contenders()
    happy = await per_call_ns({name: make(ok) for name, make in makers.items()}, calls, rounds)
    path = await per_call_ns(
        {name: make(flaky_handler()) for name, make in makers.items() if name not in NOT_RETRYING},
        retry_calls,
        rounds,
    )
    bare = happy["bare (no retry)"]
    ours = happy[OURS] - bare
    hand = path["hand-written loop"]

    versions = ", ".join(
        f"{pkg} {importlib.metadata.version(pkg)}"
        for pkg in ("cqrs-resilience", "tenacity", "stamina", "backoff")
    )
    print(f"# Retry overhead ({versions}; {calls:,} calls x best of {rounds})\n")
    print(
        "| contender | happy path per call | overhead vs bare | overhead vs ours "
        "| retry path (2 failures) | vs hand-written loop |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in makers:
        overhead = happy[name] - bare
        ratio = f"{overhead / ours:,.1f}x" if name != "bare (no retry)" and ours > 0 else "-"
        retry_cell = fmt_ns(path[name]) if name in path else "-"
        retry_ratio = f"{path[name] / hand:.2f}x" if name in path else "-"
        print(
            f"| {name} | {fmt_ns(happy[name])} | {fmt_ns(max(overhead, 0))} | {ratio} "
            f"| {retry_cell} | {retry_ratio} |"
        )
    tenacity_overhead = happy["tenacity.retry"] - bare
    print(
        f"\nretry() happy-path overhead: {fmt_ns(ours)}; tenacity's is "
        f"{tenacity_overhead / ours:,.0f}x larger (target >= 50x). Retry path: "
        f"{path[OURS] / hand:.2f}x the hand-written loop (target <= 2x)."
    )
    print(
        f"timeout() happy-path overhead: {fmt_ns(happy[TIMEOUT] - bare)} (target <= 2 µs). "
        f"retry(budget=...): {fmt_ns(happy[BUDGET])} per call, "
        f"{happy[BUDGET] / happy[OURS]:.2f}x plain retry()'s {fmt_ns(happy[OURS])} "
        f"(target <= 1.3x); the deposit itself costs {fmt_ns(happy[BUDGET] - happy[OURS])}."
    )
    breaker = happy["cqrs_resilience circuit_breaker() (closed)"] - bare
    floor = happy["a no-op async wrapper (the floor for any behaviour)"] - bare
    print(
        f"circuit_breaker() closed, happy path: {fmt_ns(breaker)} per call (target <= 300 ns), "
        f"of which {fmt_ns(floor)} is the wrapper itself and {fmt_ns(clock_read_ns(calls))} "
        "the one clock read that places the outcome in its bucket."
    )
    sync = sync_ns(calls, rounds)
    print("\n| a sync function (happy path) | per call | overhead vs bare |\n|---|---:|---:|")
    for name, ns in sync.items():
        print(f"| {name} | {fmt_ns(ns)} | {fmt_ns(max(ns - sync['bare sync function'], 0))} |")
    refusal = await refusal_ns(calls, rounds)
    print("\n| a failing call | per call |\n|---|---:|")
    for name, ns in refusal.items():
        print(f"| {name} | {fmt_ns(ns)} |")
    print(
        f"\nAn open breaker refuses in {fmt_ns(refusal[name])} (target <= 1 µs), raising "
        "BrokenCircuitError with retry_after and the opening failure as its cause.\n"
    )
    guard, emit = await emit_ns(calls * 4, rounds)
    print(
        f"Emitting an event nobody listens to: {fmt_ns(guard)} with the wants() guard the "
        f"behaviours use, {fmt_ns(emit)} for a bare `await emit()`."
    )
    otel = await otel_ns(calls, rounds)
    if otel is None:
        print(
            "\n(OpenTelemetry table skipped: pip install 'cqrs-resilience[otel]' opentelemetry-sdk)"
        )
        return
    off, api, sdk = otel["off"], otel["api"], otel["sdk"]
    print(
        "\n# OpenTelemetry: cqrs_resilience.otel.instrument(), happy path\n\n"
        "| contender | uninstrumented | API only (no-op providers) | overhead "
        "| SDK, in-memory exporters | overhead |\n|---|---:|---:|---:|---:|---:|"
    )
    for name in off:
        print(
            f"| {name} | {fmt_ns(off[name])} | {fmt_ns(api[name])} "
            f"| {fmt_ns(api[name] - off[name])} | {fmt_ns(sdk[name])} "
            f"| {fmt_ns(sdk[name] - off[name])} |"
        )
    handle = "cqrs_resilience ResilientCommandHandler.handle"
    print(
        f"\nInstrumented handle(), API only: {fmt_ns(api[handle] - off[handle])} per command "
        "over uninstrumented (target <= 1.5 µs): two clock reads and two histogram records; "
        "no span is started with a no-op tracer. With the SDK, what the SDK itself takes to "
        "start and end a span and record two histograms dominates."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    asyncio.run(main(parser.parse_args().quick))
