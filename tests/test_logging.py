"""Logging: the "cqrs_resilience" logger, each event at its level, and no work when disabled."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import tenacity

from cqrs_resilience import (
    CIRCUIT_CLOSED,
    CIRCUIT_HALF_OPENED,
    CIRCUIT_OPENED,
    CONFLICT_DETECTED,
    CONFLICT_FAILED,
    CONFLICT_RESOLVED,
    RETRY_BUDGET_EXHAUSTED,
    RETRY_EXHAUSTED,
    RETRY_SCHEDULED,
    BrokenCircuitError,
    Command,
    ConflictConfig,
    ConflictResolutionPolicy,
    FakeClock,
    FixedRetryPolicy,
    HookRegistry,
    Retryable,
    RetryBudget,
    TransientError,
    circuit_breaker,
    pipeline,
    resolve_conflicts,
    retry,
    timeout,
)
from cqrs_resilience._demo import DemoOrder
from cqrs_resilience.stores import SQLiteRepository
from tests.observability import ONE_RETRY, Flaky, Save, SaveHandler, every_event

LOGGER = "cqrs_resilience"


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """The library's logger, its level restored after the test."""
    found = logging.getLogger(LOGGER)
    level = found.level
    yield found
    found.setLevel(level)


@pytest.fixture
def log_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the `logging.Logger` methods the library calls, in order."""
    calls: list[str] = []
    for name in ("isEnabledFor", "_log", "makeRecord"):
        original = getattr(logging.Logger, name)

        def counting(
            self: logging.Logger, *args: Any, _o: Any = original, _n: str = name, **kwargs: Any
        ) -> Any:
            if self.name == LOGGER:
                calls.append(_n)
            return _o(self, *args, **kwargs)

        monkeypatch.setattr(logging.Logger, name, counting)
    return calls


def test_the_library_adds_only_a_null_handler() -> None:
    """The application decides where logs go: the package's logger has a NullHandler only."""
    handlers = logging.getLogger(LOGGER).handlers
    assert handlers and all(isinstance(h, logging.NullHandler) for h in handlers)


async def test_each_event_is_logged_at_its_level(
    clock: FakeClock, hooks: HookRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """Routine handling at DEBUG; giving up and an opened circuit at WARNING; probing and
    recovering at INFO."""
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        await every_event(clock, hooks)
    levels: dict[str, set[int]] = {}
    for record in caplog.records:
        context: Any = record.args
        levels.setdefault(context["event"], set()).add(record.levelno)
    assert levels == {
        RETRY_SCHEDULED: {logging.DEBUG},
        RETRY_EXHAUSTED: {logging.WARNING},
        RETRY_BUDGET_EXHAUSTED: {logging.WARNING},
        CONFLICT_DETECTED: {logging.DEBUG},
        CONFLICT_RESOLVED: {logging.DEBUG},
        CONFLICT_FAILED: {logging.WARNING},
        CIRCUIT_OPENED: {logging.WARNING},
        CIRCUIT_HALF_OPENED: {logging.INFO},
        CIRCUIT_CLOSED: {logging.INFO},
    }
    assert all(record.name == LOGGER for record in caplog.records)


async def test_messages_say_who_what_and_why(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A retry's log line names the handler, the command, the retry, the delay and the error;
    the record's args are the hook context, for structured formatters."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    error = ConnectionError("reset by peer")
    with pytest.raises(ConnectionError):
        await retry(ONE_RETRY, clock=clock)(Flaky(error, error))(Save())
    scheduled, exhausted = caplog.records
    assert scheduled.getMessage() == (
        "Flaky (Save): retry 1 of 1 in 250 ms after ConnectionError('reset by peer')"
    )
    assert exhausted.getMessage() == (
        "Flaky (Save): gave up after 1 of 1 retries: all retries used (max_retries=1): "
        "ConnectionError('reset by peer')"
    )
    assert exhausted.args["error"] is error  # type: ignore[call-overload,index]


async def charge(order_id: str, amount_cents: int) -> None:
    """A legacy function: plain arguments, no command."""
    raise ConnectionError("card network down")


async def test_a_plain_function_is_named_by_itself(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A function whose arguments are no command is labelled by its name alone (`charge`),
    not by its first argument's type (`charge (str)`); `command.type` is None."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with pytest.raises(ConnectionError):
        await retry(ONE_RETRY, clock=clock)(charge)("o1", 500)
    scheduled = caplog.records[0]
    assert scheduled.getMessage() == (
        "charge: retry 1 of 1 in 250 ms after ConnectionError('card network down')"
    )
    assert scheduled.args["command.type"] is None  # type: ignore[call-overload,index]


FIVE_RETRIES = FixedRetryPolicy(max_retries=5, delay_ms=0, jitter=False)


class Resend(Command[str], Retryable):
    """A command asking for three retries of its own."""

    retry_policy: FixedRetryPolicy = FixedRetryPolicy(max_retries=3, delay_ms=0, jitter=False)


def failing() -> Flaky:
    return Flaky(*(TransientError("down") for _ in range(20)))


async def stopped_by_the_deadline(clock: FakeClock) -> None:
    every_4_s = FixedRetryPolicy(max_retries=5, delay_ms=4000, jitter=False)
    await pipeline(timeout(10, clock=clock), retry(every_4_s, clock=clock))(failing())(Save())


async def stopped_by_the_budget(clock: FakeClock) -> None:
    one_retry = RetryBudget(ratio=0, min_retries_per_s=0.1, ttl_s=10, clock=clock)
    await retry(FIVE_RETRIES, budget=one_retry, clock=clock)(failing())(Save())


async def stopped_by_the_breaker(clock: FakeClock) -> None:
    breaker = circuit_breaker(minimum_throughput=2, failure_ratio=0.5, clock=clock)
    await pipeline(retry(FIVE_RETRIES, clock=clock), breaker)(failing())(Save())


async def stopped_by_the_cap(clock: FakeClock) -> None:
    await retry(clock=clock, max_retries_cap=1)(failing())(Resend())


async def stopped_by_a_stop_strategy(clock: FakeClock) -> None:
    stop = tenacity.stop_after_attempt(10) | tenacity.stop_after_delay(30)
    await retry(stop=stop, wait=tenacity.wait_fixed(10), clock=clock)(failing())(Save())


async def stopped_when_all_retries_are_used(clock: FakeClock) -> None:
    await retry(FIVE_RETRIES, clock=clock)(failing())(Save())


@pytest.mark.parametrize(
    ("scenario", "line"),
    [
        (
            stopped_by_the_deadline,
            "Flaky (Save): gave up after 2 of 5 retries: the next wait of 4 s would end after "
            "the deadline (2 s left): TransientError('down')",
        ),
        (
            stopped_by_the_budget,
            "Flaky (Save): gave up after 1 of 5 retries: the retry budget is spent "
            "(RetryBudget(ratio=0, min_retries_per_s=0.1, ttl_s=10, balance=0)): "
            "TransientError('down')",
        ),
        (
            stopped_by_the_breaker,
            "Flaky (Save): gave up after 2 of 5 retries: the circuit breaker refused retry 2: "
            "the circuit is open; a trial call is allowed in 5.000 s: BrokenCircuitError(5.0)",
        ),
        (
            stopped_by_the_cap,
            "Flaky (Resend): gave up after 1 of 1 retries: max_retries_cap=1 caps the command's "
            "max_retries=3: TransientError('down')",
        ),
        (
            stopped_by_a_stop_strategy,
            "Flaky (Save): gave up after 3 retries: the deadline of 30 s passed "
            "(stop_after_delay): TransientError('down')",
        ),
        (
            stopped_when_all_retries_are_used,
            "Flaky (Save): gave up after 5 of 5 retries: all retries used (max_retries=5): "
            "TransientError('down')",
        ),
    ],
    ids=["deadline", "budget", "breaker", "cap", "stop", "all-used"],
)
async def test_giving_up_says_why(
    scenario: Any, line: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The line that says retrying stopped names what stopped it: the deadline, the retry
    budget, the circuit breaker, a cap on the command's policy, a stop strategy, or all
    retries used; the hook context has it as `reason`, and the error's note ends with it."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with pytest.raises((TransientError, BrokenCircuitError)) as info:
        await scenario(clock)
    [record] = [
        r
        for r in caplog.records
        if r.args["event"] in (RETRY_EXHAUSTED, RETRY_BUDGET_EXHAUSTED)  # type: ignore[call-overload,index]
    ]
    assert record.getMessage() == line
    reason = record.args["reason"]  # type: ignore[call-overload,index]
    assert reason and f": {reason}: " in line
    assert info.value.__notes__[-1].endswith(f": {reason}")


async def test_warnings_only_by_default_level(
    clock: FakeClock, hooks: HookRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """At WARNING, the DEBUG and INFO events leave no record."""
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        await every_event(clock, hooks)
    assert {record.levelno for record in caplog.records} == {logging.WARNING}
    assert len(caplog.records) == 4


async def test_reset_is_logged_at_info(caplog: pytest.LogCaptureFixture, clock: FakeClock) -> None:
    """Closing a circuit by hand says so."""
    breaker = circuit_breaker(minimum_throughput=2, clock=clock, hooks=HookRegistry())
    guarded = breaker(Flaky(TransientError("down"), TransientError("down")))
    for _ in range(2):
        with pytest.raises(TransientError):
            await guarded(Save())
    assert breaker.state == "open"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        breaker.reset()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "circuit closed by reset()")
    ]


async def test_nothing_is_formatted_when_the_logger_is_disabled(
    clock: FakeClock, logger: logging.Logger, log_calls: list[str]
) -> None:
    """With the logger off, events only ask `isEnabledFor`: no record is made or formatted."""
    logger.setLevel(logging.CRITICAL)
    await every_event(clock, HookRegistry())
    assert log_calls and set(log_calls) == {"isEnabledFor"}


async def test_the_happy_path_does_no_log_work(
    clock: FakeClock, logger: logging.Logger, log_calls: list[str]
) -> None:
    """Commands that succeed at once touch the logger not at all, even with DEBUG on."""
    logger.setLevel(logging.DEBUG)
    handler = SaveHandler(Flaky(), clock=clock)
    for _ in range(3):
        await handler.handle(Save())
        await retry(ONE_RETRY, clock=clock)(Flaky())(Save())
    assert log_calls == []


async def test_a_quiet_event_builds_no_context(
    clock: FakeClock, logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No subscriber, no sink, logger off: a retry builds no hook context at all."""
    from cqrs_resilience._retry import Retry

    built: list[int] = []
    original = Retry._context

    def counting(self: Retry, *args: Any) -> dict[str, Any]:
        built.append(1)
        return original(self, *args)

    monkeypatch.setattr(Retry, "_context", counting)
    logger.setLevel(logging.CRITICAL)
    with pytest.raises(TransientError):
        await retry(ONE_RETRY, clock=clock, hooks=HookRegistry())(
            Flaky(TransientError("a"), TransientError("b"))
        )(Save())
    assert built == []
    logger.setLevel(logging.DEBUG)
    with pytest.raises(TransientError):
        await retry(ONE_RETRY, clock=clock, hooks=HookRegistry())(
            Flaky(TransientError("a"), TransientError("b"))
        )(Save())
    assert built == [1, 1]


class Touch(Command[int]):
    """Sets an order's status, written at the version it was read at."""

    order_id: str
    version: int
    status: str = "paid"


class TouchHandler:
    """Writes the order a `Touch` names, with last-wins conflict resolution around it."""

    def __init__(self, store: SQLiteRepository[DemoOrder]) -> None:
        self.store = store

    async def __call__(self, command: Touch) -> int:
        order = DemoOrder(id=command.order_id, version=command.version, status=command.status)
        return (await self.store.persist(order)).version

    async def latest(self, command: Touch) -> dict[str, Any]:
        [order] = await self.store.retrieve([command.order_id])
        return msgspec.structs.asdict(order)


def _touch_with(state: dict[str, Any]) -> Touch:
    return Touch(order_id=state["id"], version=state["version"], status=state["status"])


async def test_meeting_another_writers_resolution_is_logged_as_that(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A write refused because another writer is resolving a conflict on the aggregate is
    logged as that (not as "version 1, expected 1"); the command then waits for that writer,
    runs again, and the line saying it was resolved counts resolution attempts."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    hooks = HookRegistry()
    detected = asyncio.Event()
    hooks.subscribe(CONFLICT_DETECTED, lambda context: detected.set())
    async with SQLiteRepository(tmp_path / "db", DemoOrder) as store:
        created = await store.persist(DemoOrder(id="o"))
        touch = TouchHandler(store)
        last_wins = ConflictConfig(policy=ConflictResolutionPolicy.LAST_WINS)
        handler = resolve_conflicts(
            touch.latest,
            lambda command: {"status": command.status},
            lambda command, state: _touch_with(state),
            config=last_wins,
            hooks=hooks,
        )(touch)
        async with store.turn("o"):  # another writer, resolving a conflict on "o"
            command = Touch(order_id="o", version=created.version)
            sent = asyncio.create_task(handler(command), context=contextvars.Context())
            await detected.wait()
            await store.persist(created)  # the other writer's write: version 2
        assert await sent == 3
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        "TouchHandler (Touch): conflict 1 of 3 (last_wins): ConcurrencyError(\"aggregate 'o': "
        "another writer is resolving a conflict on it, so this write (read at version 1) was "
        'not made")',
        "TouchHandler (Touch): conflict resolved after 1 of 3 resolution attempts (last_wins)",
    ]
