"""cqrs_resilience.otel: the events counter, the duration histograms, spans and span events."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import ExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.metrics.view import Aggregation, View
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider, StatusCode

from cqrs_resilience import (
    CIRCUIT_OPENED,
    CONFLICT_DETECTED,
    CONFLICT_RESOLVED,
    RETRY_SCHEDULED,
    Aggregate,
    CommandResponse,
    ConcurrencyError,
    FakeClock,
    HookRegistry,
    InMemoryRepository,
    PipelinedCommandHandler,
    TransientError,
    _telemetry,
    circuit_breaker,
    command_scope,
    pipeline,
    resolve_conflicts,
    retry,
)
from cqrs_resilience import otel as cqrs_otel
from tests.observability import (
    ONE_RETRY,
    Flaky,
    Save,
    SaveHandler,
    every_event,
    incoming,
    latest,
    rebuild,
)

TRANSIENT = "cqrs_resilience._errors.TransientError"
CONFLICT = "cqrs_resilience._errors.ConcurrencyError"


class Telemetry:
    """In-memory providers with `instrument()` in effect on them."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.undo = cqrs_otel.instrument(self.meter_provider, self.tracer_provider)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, value) of each data point of metric `name`; a histogram's value is
        (count, sum)."""
        data = self.reader.get_metrics_data()
        found: list[tuple[dict[str, Any], Any]] = []
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        value = getattr(point, "value", None)
                        if value is None:
                            value = (getattr(point, "count"), getattr(point, "sum"))  # noqa: B009
                        found.append((dict(point.attributes or {}), value))
        return found


@pytest.fixture
def telemetry(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> Iterator[Telemetry]:
    """`instrument()` on in-memory providers (never the global ones), timing on the fake
    clock, undone after the test."""
    monkeypatch.setattr(cqrs_otel, "_now", clock.monotonic)
    found = Telemetry()
    yield found
    found.undo()


class Slow(Flaky):
    """A `Flaky` whose every call takes `seconds` on the fake clock."""

    def __init__(self, clock: FakeClock, seconds: float, *errors: Exception) -> None:
        super().__init__(*errors)
        self.clock = clock
        self.seconds = seconds

    async def __call__(self, command: Any) -> str:
        await self.clock.sleep(self.seconds)
        return await super().__call__(command)


async def test_the_counter_counts_every_event_with_its_attributes(
    telemetry: Telemetry,
    clock: FakeClock,
    hooks: HookRegistry,
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    """One count per event emitted, by event.name, handler.type, command.type, exception.type."""
    await every_event(clock, hooks)
    counted: Counter[str] = Counter()
    for attributes, value in telemetry.points(cqrs_otel.EVENTS_COUNTER):
        counted[attributes["event.name"]] += value
    assert counted == Counter(name for name, _ in events)
    by_name = {a["event.name"]: a for a, _ in telemetry.points(cqrs_otel.EVENTS_COUNTER)}
    assert by_name[RETRY_SCHEDULED] == {
        "event.name": RETRY_SCHEDULED,
        "handler.type": "Flaky",
        "command.type": "Save",
        "exception.type": TRANSIENT,
    }
    assert "exception.type" not in by_name["handler.circuit.closed"]


async def test_command_and_attempt_durations(telemetry: Telemetry, clock: FakeClock) -> None:
    """Each run of `process` is one attempt (0.5 s here); the command lasts all of them plus
    the 0.25 s backoff, and each attempt names the error that ended it."""
    handler = SaveHandler(
        Slow(clock, 0.5, TransientError("blip"), ConcurrencyError(aggregate_id="a1")),
        clock=clock,
    )
    await handler.handle(Save())
    attempts = {a.get("exception.type"): v for a, v in telemetry.points(cqrs_otel.ATTEMPT_DURATION)}
    assert attempts == {TRANSIENT: (1, 0.5), CONFLICT: (1, 0.5), None: (1, 0.5)}
    [(attributes, (count, total))] = telemetry.points(cqrs_otel.COMMAND_DURATION)
    assert attributes == {"handler.type": "SaveHandler", "command.type": "Save"}
    assert (count, total) == (1, 1.75)


async def test_a_failed_command_is_an_error_span_with_its_exception(
    telemetry: Telemetry, clock: FakeClock
) -> None:
    """The command duration and the span name the error; the span records the exception."""
    handler = SaveHandler(Slow(clock, 0.1, *[TransientError("down")] * 2), clock=clock)
    with pytest.raises(TransientError):
        await handler.handle(Save())
    [span] = telemetry.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == TRANSIENT
    exception = [e for e in span.events if e.name == "exception"]
    assert exception and exception[0].attributes["exception.message"] == "down"  # type: ignore[index]
    [(attributes, (count, _))] = telemetry.points(cqrs_otel.COMMAND_DURATION)
    assert attributes["exception.type"] == TRANSIENT and count == 1
    assert telemetry.points(cqrs_otel.ATTEMPT_DURATION) == [
        (
            {"handler.type": "SaveHandler", "command.type": "Save", "exception.type": TRANSIENT},
            (2, pytest.approx(0.2)),
        )
    ]


async def test_one_span_per_handled_command_with_its_events(
    telemetry: Telemetry, clock: FakeClock
) -> None:
    """handle() makes one span, named after the command, with a span event per retry and
    conflict event carrying the hook context; a success leaves the status unset."""
    command = Save()
    handler = SaveHandler(Flaky(TransientError("blip"), ConcurrencyError()), clock=clock)
    await handler.handle(command)
    [span] = telemetry.spans()
    assert span.name == "handle Save"
    assert span.kind is trace.SpanKind.INTERNAL
    assert dict(span.attributes or {}) == {
        "handler.type": "SaveHandler",
        "command.type": "Save",
        "command.id": command.command_id,
    }
    assert span.status.status_code is StatusCode.UNSET
    assert [e.name for e in span.events] == [RETRY_SCHEDULED, CONFLICT_DETECTED, CONFLICT_RESOLVED]
    scheduled = dict(span.events[0].attributes or {})
    assert scheduled["attempt"] == 1 and scheduled["delay_ms"] == 250.0
    assert scheduled["exception.type"] == TRANSIENT and scheduled["exception.message"] == "blip"
    assert dict(span.events[2].attributes or {})["policy"] == "last_wins"


async def test_circuit_events_land_on_the_command_span(
    telemetry: Telemetry, clock: FakeClock
) -> None:
    """A breaker inside the handler opening is a span event of the command that opened it."""
    breaker = circuit_breaker(minimum_throughput=2, clock=clock, hooks=HookRegistry())

    class Guarded(SaveHandler):
        pass

    Guarded.breaker = breaker
    with pytest.raises(TransientError):
        await Guarded(Flaky(*[TransientError("down")] * 2), clock=clock).handle(Save())
    [span] = telemetry.spans()
    assert CIRCUIT_OPENED in [e.name for e in span.events]


async def test_function_pipelines_make_one_span_per_command(
    telemetry: Telemetry, clock: FakeClock
) -> None:
    """The outermost behavior that opens the command's scope makes the span; the inner ones
    add none."""
    behaviors = pipeline(
        retry(ONE_RETRY, clock=clock), resolve_conflicts(latest, incoming, rebuild)
    )
    save = behaviors(Flaky(TransientError("blip")))
    for _ in range(3):
        await save(Save())
    spans = telemetry.spans()
    assert [s.name for s in spans] == ["handle Save"] * 3
    assert dict(spans[0].attributes or {})["handler.type"] == "Flaky"
    assert [e.name for e in spans[0].events] == [RETRY_SCHEDULED]
    [(_, (count, _))] = telemetry.points(cqrs_otel.COMMAND_DURATION)
    assert count == 3


def test_sync_functions_are_handled_commands_too(telemetry: Telemetry, clock: FakeClock) -> None:
    """retry() around a sync function taking a command: a span, the durations, the events."""
    calls = 0

    def save(command: Save) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TransientError("blip")
        return "ok"

    assert retry(ONE_RETRY, clock=clock)(save)(Save()) == "ok"
    [span] = telemetry.spans()
    assert [e.name for e in span.events] == [RETRY_SCHEDULED]
    counts = sorted(v[0] for _, v in telemetry.points(cqrs_otel.ATTEMPT_DURATION))
    assert counts == [1, 1]


async def test_an_async_handler_behind_a_lambda_is_one_command(
    telemetry: Telemetry, clock: FakeClock
) -> None:
    """retry() around a lambda returning an async handler's coroutine records the command when
    it runs (awaited): one span, an error span when it fails, nothing current afterwards."""
    flaky = Flaky(TransientError("blip"), TransientError("down"))
    wrapped = retry(ONE_RETRY, clock=clock)(lambda command: flaky(command))
    with pytest.raises(TransientError, match="down"):
        await wrapped(Save())
    [span] = telemetry.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == [
        RETRY_SCHEDULED,
        "handler.retry.exhausted",
        "exception",
    ]
    assert trace.get_current_span() is trace.INVALID_SPAN
    assert await wrapped(Save()) == "ok"  # later calls, the async way from the start
    assert len(telemetry.spans()) == 2
    [(attributes, (count, _))] = [
        point
        for point in telemetry.points(cqrs_otel.COMMAND_DURATION)
        if "exception.type" in point[0]
    ]
    assert count == 1 and attributes["exception.type"] == TRANSIENT


async def test_spans_started_inside_are_children_of_the_command(
    telemetry: Telemetry, clock: FakeClock
) -> None:
    """The command's span is current while it runs: a span the handler starts nests in it."""
    tracer = telemetry.tracer_provider.get_tracer("app")

    class Traced(SaveHandler):
        async def process(self, command: Any) -> CommandResponse[str]:
            with tracer.start_as_current_span("db"):
                return CommandResponse(result="ok")

    await Traced(None, clock=clock).handle(Save())
    db, command = telemetry.spans()
    assert db.parent is not None and command.context is not None
    assert db.parent.span_id == command.context.span_id
    assert trace.get_current_span() is trace.INVALID_SPAN  # detached again


async def test_a_retry_deeper_inside_is_not_the_commands_attempts(
    telemetry: Telemetry, clock: FakeClock
) -> None:
    """A retry() around a call about something else, inside process, counts its events and
    adds them to the command's span, but its attempts are not the command's."""
    fetch = retry(ONE_RETRY, clock=clock)(Flaky(TransientError("blip")))

    class Fetching(SaveHandler):
        async def process(self, command: Any) -> CommandResponse[str]:
            return CommandResponse(result=await fetch("https://example.com"))

    await Fetching(None, clock=clock).handle(Save())
    [span] = telemetry.spans()
    assert [e.name for e in span.events] == [RETRY_SCHEDULED]
    event = dict(span.events[0].attributes or {})
    assert event["handler.type"] == "Flaky" and "command.type" not in event  # not "str"
    assert telemetry.points(cqrs_otel.ATTEMPT_DURATION) == [
        ({"handler.type": "Fetching", "command.type": "Save"}, (1, 0.25))
    ]


async def test_a_handler_argument_without_command_id(telemetry: Telemetry) -> None:
    """handle() of a plain object is still a handled command (span, duration), with no
    attempts, which nothing could report."""

    class Plain(PipelinedCommandHandler[str]):
        async def process(self, command: Any) -> CommandResponse[str]:
            return CommandResponse(result="ok")

    await Plain().handle({"x": 1})
    assert [s.name for s in telemetry.spans()] == ["handle dict"]
    assert len(telemetry.points(cqrs_otel.COMMAND_DURATION)) == 1
    assert telemetry.points(cqrs_otel.ATTEMPT_DURATION) == []


async def test_undo_stops_recording(telemetry: Telemetry, clock: FakeClock) -> None:
    """After undo() nothing is recorded; undoing twice is harmless."""
    handler = SaveHandler(Flaky(TransientError("blip")), clock=clock)
    telemetry.undo()
    telemetry.undo()
    await handler.handle(Save())
    assert telemetry.spans() == []
    assert telemetry.points(cqrs_otel.EVENTS_COUNTER) == []
    assert telemetry.points(cqrs_otel.COMMAND_DURATION) == []
    assert _telemetry.EVENT_SINKS == () and _telemetry.MEASURE is None


async def test_instrumenting_again_replaces_the_first(
    telemetry: Telemetry, clock: FakeClock
) -> None:
    """A second instrument() takes over (nothing is recorded twice); the first undo function
    then leaves it in place."""
    second = Telemetry()
    try:
        telemetry.undo()  # the first: does nothing now
        await SaveHandler(Flaky(), clock=clock).handle(Save())
        assert telemetry.spans() == [] and len(second.spans()) == 1
        assert len(_telemetry.EVENT_SINKS) == 1
    finally:
        second.undo()


async def test_a_no_op_tracer_starts_no_span(clock: FakeClock) -> None:
    """With a tracer that can only make no-op spans, metrics are still recorded."""
    reader = InMemoryMetricReader()
    undo = cqrs_otel.instrument(MeterProvider(metric_readers=[reader]), NoOpTracerProvider())
    try:
        await SaveHandler(Flaky(), clock=clock).handle(Save())
    finally:
        undo()
    data = reader.get_metrics_data()
    assert data is not None
    names = {m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics}
    assert names == {cqrs_otel.COMMAND_DURATION, cqrs_otel.ATTEMPT_DURATION}


async def test_a_global_tracer_provider_set_later_is_picked_up(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instrumented before the application sets its tracer provider: no spans (no SDK), then
    spans within TRACER_LOOKUP_INTERVAL_S of it being set."""
    monkeypatch.setattr(cqrs_otel, "_now", clock.monotonic)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    proxy = trace.ProxyTracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: proxy)
    reader = InMemoryMetricReader()
    undo = cqrs_otel.instrument(MeterProvider(metric_readers=[reader]))
    try:
        handler = SaveHandler(Flaky(), clock=clock)
        await handler.handle(Save())
        monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
        await handler.handle(Save())
        assert exporter.get_finished_spans() == ()
        clock.advance(cqrs_otel.TRACER_LOOKUP_INTERVAL_S)
        await handler.handle(Save())
        assert [s.name for s in exporter.get_finished_spans()] == ["handle Save"]
    finally:
        undo()


async def test_cancellation_ends_the_span_as_an_error(
    telemetry: Telemetry, clock: FakeClock
) -> None:
    """A command cancelled mid-way still ends its span (status ERROR) and records its
    duration."""
    import asyncio

    class Hanging(SaveHandler):
        async def process(self, command: Any) -> CommandResponse[str]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    task = asyncio.ensure_future(Hanging(None, clock=clock).handle(Save()))
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    [span] = telemetry.spans()
    assert span.status.status_code is StatusCode.ERROR
    [(attributes, _)] = telemetry.points(cqrs_otel.COMMAND_DURATION)
    assert attributes["exception.type"] == "asyncio.exceptions.CancelledError"


async def test_a_command_handled_twice_over_is_one_command(
    telemetry: Telemetry, clock: FakeClock
) -> None:
    """retry() around handle() handles the command once: one span, one duration; handle()
    inside a command_scope() of the caller's is still a handled command."""
    handler = SaveHandler(Flaky(), clock=clock)
    await retry(ONE_RETRY, clock=clock)(handler.handle)(Save())
    assert len(telemetry.spans()) == 1
    command = Save()
    with command_scope(command):
        await handler.handle(command)
        await handler.handle(command)
    assert len(telemetry.spans()) == 3


async def test_no_op_providers_record_nothing_and_break_nothing(clock: FakeClock) -> None:
    """The API's no-op providers: commands and events run as usual."""
    undo = cqrs_otel.instrument(NoOpMeterProvider(), NoOpTracerProvider())
    try:
        handler = SaveHandler(Flaky(TransientError("blip"), ConcurrencyError()), clock=clock)
        assert (await handler.handle(Save())).result == "ok"
    finally:
        undo()


# Telemetry never changes a command's outcome: OpenTelemetry failing on the command path.


class Note(Aggregate):
    text: str = ""


class Writing(SaveHandler):
    """Stores a note per command in the dispatcher (an in-memory repository), after failing
    as its `errors` say (a retry, a conflict round, or the command's own failure)."""

    def __init__(self, notes: InMemoryRepository[Note], *errors: Exception, clock: FakeClock):
        super().__init__(notes, clock=clock)
        self.errors = list(errors)

    async def process(self, command: Any) -> CommandResponse[str]:
        if self.errors:
            raise self.errors.pop(0)
        stored = await self.dispatcher.persist(Note(id=command.command_id, text="kept"))
        return CommandResponse(result=f"v{stored.version}")


class RaisingProcessor(SpanProcessor):
    """A span processor (an exporter called inline, say) that raises where it is told."""

    def __init__(self, where: str, error: BaseException | None = None) -> None:
        self.where = where
        self.error = error or RuntimeError("collector unreachable")

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.where == "on_start":
            raise self.error

    def on_end(self, span: Any) -> None:
        if self.where == "on_end":
            raise self.error


class RaisingFilter(ExemplarFilter):
    """Raises on every measurement: each counter add and histogram record."""

    def should_sample(self, *args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("metrics pipeline broken")


class RaisingAggregation(Aggregation):
    """A view's aggregation that fails on the first measurement of each attribute set."""

    def _create_aggregation(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("bad view")


def failing_providers(case: str) -> tuple[MeterProvider, TracerProvider]:
    tracer_provider = TracerProvider()
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    if case in ("on_start", "on_end"):
        tracer_provider.add_span_processor(RaisingProcessor(case))
    elif case == "exemplar filter":
        meter_provider = MeterProvider(
            metric_readers=[InMemoryMetricReader()], exemplar_filter=RaisingFilter()
        )
    else:
        meter_provider = MeterProvider(
            metric_readers=[InMemoryMetricReader()],
            views=[View(instrument_name="cqrs_resilience.*", aggregation=RaisingAggregation())],
        )
    return meter_provider, tracer_provider


FAILURES = ["on_start", "on_end", "exemplar filter", "view"]


@pytest.mark.parametrize("case", FAILURES)
async def test_failing_telemetry_leaves_the_commands_result_and_effect(
    case: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A span processor raising in on_start or on_end, a metrics pipeline or a view raising:
    each command, retried and resolved on the way, still returns its result and keeps its
    write, and each kind of failure is logged once at WARNING, not once per command."""
    undo = cqrs_otel.instrument(*failing_providers(case))
    notes = InMemoryRepository(Note)
    try:
        for _ in range(5):
            command = Save()
            handler = Writing(notes, TransientError("blip"), ConcurrencyError(), clock=clock)
            assert (await handler.handle(command)).result == "v1"
            [note] = await notes.retrieve([command.command_id])
            assert note.text == "kept"
    finally:
        undo()
    warnings = [r for r in caplog.records if r.name == "cqrs_resilience.otel"]
    assert warnings and all(r.levelname == "WARNING" for r in warnings)
    kinds = {r.getMessage().split(" (")[0] for r in warnings}
    assert len(warnings) == len(kinds) <= 4  # one per kind, whatever the number of commands
    assert "the command goes on" in warnings[0].getMessage()


@pytest.mark.parametrize("case", FAILURES)
async def test_a_failing_command_raises_its_own_error_whatever_telemetry_does(
    case: str, clock: FakeClock
) -> None:
    """With telemetry raising, a command that fails still raises its own error."""
    undo = cqrs_otel.instrument(*failing_providers(case))
    try:
        handler = Writing(InMemoryRepository(Note), *[KeyError("own")] * 3, clock=clock)
        with pytest.raises(KeyError, match="own"):
            await handler.handle(Save())
        sync = retry(ONE_RETRY, clock=clock)(lambda command: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            sync(Save())
    finally:
        undo()


async def test_cancellation_is_never_swallowed_by_failing_telemetry(clock: FakeClock) -> None:
    """A cancelled command stays cancelled when ending its span raises, and a BaseException
    raised by telemetry itself passes through."""
    import asyncio

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(RaisingProcessor("on_end"))
    undo = cqrs_otel.instrument(MeterProvider(), tracer_provider)
    try:

        class Hanging(SaveHandler):
            async def process(self, command: Any) -> CommandResponse[str]:
                await asyncio.Event().wait()
                raise AssertionError("unreachable")

        task = asyncio.ensure_future(Hanging(None, clock=clock).handle(Save()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        undo()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(RaisingProcessor("on_end", KeyboardInterrupt()))
    undo = cqrs_otel.instrument(MeterProvider(), tracer_provider)
    try:
        with pytest.raises(KeyboardInterrupt):
            await SaveHandler(Flaky(), clock=clock).handle(Save())
    finally:
        undo()


async def test_a_tracer_provider_that_fails_to_give_a_tracer(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A global tracer provider whose get_tracer raises: commands run untraced, metrics are
    still recorded, and the failure is logged once."""

    asked = 0

    class Broken(TracerProvider):
        def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
            nonlocal asked
            asked += 1
            raise RuntimeError("no tracer for you")

    monkeypatch.setattr(trace, "get_tracer_provider", lambda: Broken())
    monkeypatch.setattr(cqrs_otel, "_now", clock.monotonic)
    reader = InMemoryMetricReader()
    undo = cqrs_otel.instrument(MeterProvider(metric_readers=[reader]))
    try:
        for _ in range(3):
            assert (await SaveHandler(Flaky(), clock=clock).handle(Save())).result == "ok"
            clock.advance(cqrs_otel.TRACER_LOOKUP_INTERVAL_S)  # it is asked again, and fails
    finally:
        undo()
    assert asked == 3  # at instrument(), then by the commands a second and two seconds on
    warnings = [r for r in caplog.records if r.name == "cqrs_resilience.otel"]
    assert [r.getMessage().split(" (")[0] for r in warnings] == [
        "OpenTelemetry failed to get a tracer"
    ]
    data = reader.get_metrics_data()
    assert data is not None and data.resource_metrics
