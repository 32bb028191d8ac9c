"""OpenTelemetry metrics and traces: `instrument()`.

    pip install 'cqrs-resilience[otel]'

    from cqrs_resilience.otel import instrument
    undo = instrument()  # the global providers, or instrument(meter_provider, tracer_provider)

Records, under the instrumentation scope "cqrs_resilience":

- `cqrs_resilience.events` (counter, `{event}`): one per announced event (a retry scheduled, a
  conflict resolved, a circuit opened, ...), with attributes `event.name`, `handler.type`,
  `command.type` and, when an error caused it, `exception.type`.
- `cqrs_resilience.command.duration` (histogram, s): one per handled command: a call of
  `PipelinedCommandHandler.handle()`, or of the outermost `retry()` / `resolve_conflicts()`
  around a function taking a command (the one that opens the command's idempotency scope).
  Retries, backoff sleeps and resolution attempts included. Attributes `handler.type`,
  `command.type`, and `exception.type` when it failed.
- `cqrs_resilience.attempt.duration` (histogram, s): one per run of the innermost handler
  (`process`, or the decorated function): the first attempt, each retry, each call after
  resolving a conflict. Backoff sleeps and merges between attempts belong to none. Same
  attributes, `exception.type` naming the failure that ended the attempt.
- A span `handle <command type>` (kind INTERNAL) per handled command, current while it runs
  (spans the handler starts become its children), with attributes `handler.type`,
  `command.type` and `command.id`. Each event is added to the current span as a span event
  named after it, carrying its hook context (`error` as `exception.type` and
  `exception.message`). A failed command records its exception, sets `error.type` and status
  ERROR; a successful one leaves the status unset.

Telemetry never changes a command's outcome. Every call into OpenTelemetry on the command path
(starting, ending and marking spans, span events, counter adds, histogram records) is guarded
as hooks are: what raises an `Exception` there (a span processor or an exporter called inline, a
view, a provider's instruments) is ignored, so a command returns its result, or raises its own
error, as without telemetry. Each kind of failure (what was being done, the error's type) is
logged once at WARNING on the `cqrs_resilience.otel` logger, until `instrument()` is called
again: a storm of commands gives one line, not one per command. A `BaseException` raised there
(cancellation, `KeyboardInterrupt`) passes through.

A call about no command (a `retry()` around `fetch(url)`) is no handled command: its events
are counted and added to the current span, but it has no span or durations of its own.
Durations come from `time.perf_counter()`. With a tracer that can only make no-op spans (no
SDK), no span is started at all. The core holds only an empty slot until `instrument()`
fills it (see `cqrs_resilience._telemetry`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "cqrs_resilience.otel needs opentelemetry-api: pip install 'cqrs-resilience[otel]'"
    ) from exc

from . import _telemetry

__all__ = [
    "ATTEMPT_DURATION",
    "COMMAND_DURATION",
    "DURATION_BUCKETS_S",
    "EVENTS_COUNTER",
    "SCOPE",
    "instrument",
]

SCOPE = "cqrs_resilience"
"""The instrumentation scope (tracer and meter name)."""
EVENTS_COUNTER = "cqrs_resilience.events"
ATTEMPT_DURATION = "cqrs_resilience.attempt.duration"
COMMAND_DURATION = "cqrs_resilience.command.duration"
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    30.0,
    60.0,
)
"""Histogram bucket boundaries advised to the SDK: OpenTelemetry's HTTP duration buckets, from
a millisecond up to the longest wait a retry may be asked for (60 s)."""

_now = time.perf_counter
logger = logging.getLogger(__name__)

TRACER_LOOKUP_INTERVAL_S = 1.0
"""Instrumented with the global providers before the application set its tracer provider,
spans start within this long of it being set."""

_undo: Callable[[], None] | None = None


def instrument(
    meter_provider: metrics.MeterProvider | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> Callable[[], None]:
    """Record OpenTelemetry metrics and spans for every command, attempt and event.

    Uses the global providers unless given others (a global tracer provider set later is
    picked up). Returns a function that undoes it. Calling `instrument()` again replaces the
    earlier instrumentation (with the new providers); the earlier undo function then does
    nothing.
    """
    global _undo
    if _undo is not None:
        _undo()
    instrumentation = _Instrumentation(meter_provider, tracer_provider)
    remove_measure = _telemetry.set_measure(instrumentation)
    remove_sink = _telemetry.add_event_sink(instrumentation.event)

    def undo() -> None:
        global _undo
        remove_measure()
        remove_sink()
        if _undo is undo:
            _undo = None

    _undo = undo
    return undo


def _exception_type(error: BaseException) -> str:
    """As OpenTelemetry's SDK records it: the qualified class name, builtins bare."""
    kind = type(error)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _with_error(attributes: dict[str, str], error: BaseException) -> dict[str, str]:
    return {**attributes, "exception.type": _exception_type(error)}


def _event_attributes(context: Mapping[str, Any]) -> dict[str, Any]:
    """A hook context as span event attributes: primitives as they are, the error as
    `exception.type` and `exception.message`, other objects by their repr."""
    attributes: dict[str, Any] = {}
    for key, value in context.items():
        if value is None or key == "event":
            continue
        if key == "error" and isinstance(value, BaseException):
            attributes["exception.type"] = _exception_type(value)
            attributes["exception.message"] = str(value)
        elif isinstance(value, str):
            attributes[key] = str(value)  # a StrEnum member as its value
        elif isinstance(value, bool | int | float):
            attributes[key] = value
        else:
            attributes[key] = repr(value)
    return attributes


def _histogram(meter: metrics.Meter, name: str, description: str) -> metrics.Histogram:
    try:
        return meter.create_histogram(
            name,
            unit="s",
            description=description,
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
        )
    except TypeError:  # pragma: no cover - opentelemetry-api < 1.23 takes no advice
        return meter.create_histogram(name, unit="s", description=description)


class _Nothing:
    """Stands in for the API's no-op instruments, whose calls cost a few hundred ns each."""

    def add(self, amount: float, attributes: Any = None, context: Any = None) -> None:
        pass

    def record(self, amount: float, attributes: Any = None, context: Any = None) -> None:
        pass


class _Instrumentation:
    """The `_telemetry.Measure` and event sink that `instrument()` installs."""

    def __init__(
        self,
        meter_provider: metrics.MeterProvider | None,
        tracer_provider: trace.TracerProvider | None,
    ) -> None:
        from . import __version__

        self.version = __version__
        meter = metrics.get_meter(SCOPE, __version__, meter_provider)
        self.events = meter.create_counter(
            EVENTS_COUNTER,
            unit="{event}",
            description="Resilience events: retries, conflicts, circuit state changes.",
        )
        self.command_duration = _histogram(
            meter, COMMAND_DURATION, "Duration of handled commands, retries included."
        )
        self.attempt_duration = _histogram(
            meter, ATTEMPT_DURATION, "Duration of each attempt at a command."
        )
        if isinstance(meter, metrics.NoOpMeter):
            nothing = cast(Any, _Nothing())
            self.events = self.command_duration = self.attempt_duration = nothing
        self.failures: set[tuple[str, type[Exception]]] = set()  # the kinds logged
        # (handler type, command type) -> (span name, attributes): built once per pair.
        self.names: dict[tuple[str, type], tuple[str, dict[str, str]]] = {}
        self.tracer: trace.Tracer | None = None
        # While the global tracer provider is unset (no SDK yet), look again now and then.
        self.look_again_at: float | None = -math.inf
        self._find_tracer(tracer_provider, _now())

    def _find_tracer(
        self, provider: trace.TracerProvider | None, now: float
    ) -> trace.Tracer | None:
        """The tracer to start spans with, or None when it could only make no-op spans (then
        no span is started at all: a no-op span costs a microsecond and records nothing)."""
        try:
            if provider is None:
                provider = trace.get_tracer_provider()
                if isinstance(provider, trace.ProxyTracerProvider):
                    self.look_again_at = now + TRACER_LOOKUP_INTERVAL_S
                    return None
            tracer = provider.get_tracer(SCOPE, self.version)
        except Exception as exc:
            self.failed("get a tracer", exc)
            self.tracer, self.look_again_at = None, now + TRACER_LOOKUP_INTERVAL_S
            return None
        self.tracer = None if isinstance(tracer, trace.NoOpTracer) else tracer
        self.look_again_at = None
        return self.tracer

    def failed(self, doing: str, error: Exception) -> None:
        """OpenTelemetry (the SDK, a span processor, a view, an exporter it calls inline, a
        provider's instruments) raised while the library was `doing` something: telemetry never
        changes a command's outcome, so it is ignored, and logged at WARNING once per kind
        (what was being done, and the error's type), not once per command in a storm."""
        kind = (doing, type(error))
        if kind in self.failures or len(self.failures) >= 1000:
            return
        self.failures.add(kind)
        logger.warning(
            "OpenTelemetry failed to %s (%s); ignored, the command goes on. Further %s "
            "failures to %s are not logged until instrument() is called again.",
            doing,
            _exception_type(error),
            type(error).__name__,
            doing,
            exc_info=error,
        )

    def command(self, handler_type: str, command: Any, *, attempts: bool) -> _Command:
        key = (handler_type, type(command))
        names = self.names.get(key)
        if names is None:
            if len(self.names) > 10_000:  # types made on the fly must not grow this forever
                self.names.clear()
            command_type = type(command).__name__
            names = self.names[key] = (
                f"handle {command_type}",
                {"handler.type": handler_type, "command.type": command_type},
            )
        now = _now()
        tracer = self.tracer
        if self.look_again_at is not None and now >= self.look_again_at:
            tracer = self._find_tracer(None, now)
        return _Command(self, names, attempts, tracer, command, now)

    def event(self, name: str, context: Mapping[str, Any]) -> None:
        attributes = {"event.name": name}
        for key in ("handler.type", "command.type"):
            if context.get(key) is not None:
                attributes[key] = context[key]
        error = context.get("error")
        if isinstance(error, BaseException):
            attributes["exception.type"] = _exception_type(error)
        try:
            self.events.add(1, attributes)
        except Exception as exc:
            self.failed("count an event", exc)
        try:
            span = trace.get_current_span()
            if span.is_recording():
                span.add_event(name, _event_attributes(context))
        except Exception as exc:
            self.failed("add an event to a span", exc)


class _Command:
    """One handled command: its span, its start, and the attempt in progress."""

    __slots__ = (
        "attempt_start",
        "attempts",
        "attributes",
        "context_token",
        "instrumentation",
        "span",
        "start",
        "trying",
    )

    def __init__(
        self,
        instrumentation: _Instrumentation,
        names: tuple[str, dict[str, str]],
        attempts: bool,
        tracer: trace.Tracer | None,
        command: Any,
        now: float,
    ) -> None:
        self.instrumentation = instrumentation
        self.attributes = attributes = names[1]
        self.attempts = attempts
        self.span: trace.Span | None = None
        self.context_token: object = None
        if tracer is not None:
            span_attributes = dict(attributes)
            command_id = getattr(command, "command_id", None)
            if isinstance(command_id, str):
                span_attributes["command.id"] = command_id
            try:
                span = self.span = tracer.start_span(
                    names[0], kind=SpanKind.INTERNAL, attributes=span_attributes
                )
                # Current while the command runs: events, and the spans the handler starts, go
                # under it (even unsampled, so its children share the sampling decision).
                self.context_token = otel_context.attach(trace.set_span_in_context(span))
            except Exception as exc:
                instrumentation.failed("start a span", exc)
            now = _now()  # what starting the span took is no part of the command
        self.trying = True  # the first attempt starts with the command
        self.start = self.attempt_start = now

    def attempt_failed(self, error: BaseException) -> None:
        if self.trying:
            self.trying = False
            elapsed = _now() - self.attempt_start
            if self.attempts:
                attributes = _with_error(self.attributes, error)
                try:
                    self.instrumentation.attempt_duration.record(elapsed, attributes)
                except Exception as exc:
                    self.instrumentation.failed("record a duration", exc)

    def attempt_started(self) -> None:
        self.trying = True
        self.attempt_start = _now()

    def abandon(self) -> None:
        if self.context_token is not None:
            self._detach()
        # The span is left unended, so never exported: nothing ran under it.

    def _detach(self) -> None:
        try:
            otel_context.detach(self.context_token)  # type: ignore[arg-type]
        except Exception as exc:
            self.instrumentation.failed("detach the span", exc)
        self.context_token = None

    def finish(self, error: BaseException | None) -> None:
        # Every call into OpenTelemetry is guarded: the command's outcome (its result, or its
        # own error) is decided, and telemetry failing must not change it.
        instrumentation = self.instrumentation
        end = _now()
        if self.context_token is not None:
            self._detach()
        attributes = self.attributes if error is None else _with_error(self.attributes, error)
        if self.trying and self.attempts:
            try:
                instrumentation.attempt_duration.record(end - self.attempt_start, attributes)
            except Exception as exc:
                instrumentation.failed("record a duration", exc)
        try:
            instrumentation.command_duration.record(end - self.start, attributes)
        except Exception as exc:
            instrumentation.failed("record a duration", exc)
        span = self.span
        if span is None:
            return
        if error is not None:
            try:
                if span.is_recording():
                    span.record_exception(error)
                    span.set_attribute("error.type", attributes["exception.type"])
                    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            except Exception as exc:
                instrumentation.failed("mark a span as failed", exc)
        try:
            span.end()
        except Exception as exc:
            instrumentation.failed("end a span", exc)
