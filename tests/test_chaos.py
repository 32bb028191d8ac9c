"""inject_faults(): which calls fail, with what, how slowly, and that seeded runs repeat."""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any

import pytest

from cqrs_resilience import (
    Aggregate,
    ConfigurationError,
    FakeClock,
    FaultyRepository,
    FixedRetryPolicy,
    TransientError,
    circuit_breaker,
    inject_faults,
    pipeline,
    retry,
)
from cqrs_resilience.stores import SQLiteRepository, StoreClosedError


class Counter:
    """An async function that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, *args: Any) -> str:
        self.calls += 1
        return "ok"


async def fault_pattern(fn: Any, calls: int) -> list[bool]:
    pattern = []
    for _ in range(calls):
        try:
            await fn()
            pattern.append(False)
        except TransientError:
            pattern.append(True)
    return pattern


async def test_seeded_runs_repeat() -> None:
    """The same seed fails the same calls; another seed fails others; the rate holds."""
    first = await fault_pattern(inject_faults(0.3, seed=7)(Counter()), 1000)
    again = await fault_pattern(inject_faults(0.3, seed=7)(Counter()), 1000)
    other = await fault_pattern(inject_faults(0.3, seed=8)(Counter()), 1000)
    assert first == again
    assert first != other
    assert 200 < sum(first) < 400


async def test_a_fault_replaces_the_call() -> None:
    """An injected fault is raised instead of running the function, fresh each time."""
    target = Counter()
    chaos = inject_faults(1.0)
    fn = chaos(target)
    errors = []
    for _ in range(3):
        with pytest.raises(TransientError) as caught:
            await fn()
        errors.append(caught.value)
    assert target.calls == 0
    assert chaos.injected == 3
    assert len({id(e) for e in errors}) == 3
    assert any("injected by inject_faults(1.0)" in note for note in errors[0].__notes__)


def test_zero_rate_without_latency_is_the_function_itself() -> None:
    """rate=0 and no latency return the function unchanged: nothing to pay."""
    target = Counter()
    assert inject_faults(0.0)(target) is target


async def test_error_type_and_factory() -> None:
    """`error` may be an exception type or a factory making the exception."""
    with pytest.raises(ConnectionError):
        await inject_faults(1.0, error=ConnectionError)(Counter())()
    fn = inject_faults(1.0, error=lambda: TransientError("503", retry_after=2.0))(Counter())
    with pytest.raises(TransientError, match="503") as caught:
        await fn()
    assert caught.value.retry_after == 2.0


async def test_a_factory_must_make_an_exception() -> None:
    """A factory returning something else is a TypeError, not a silent pass."""
    fn = inject_faults(1.0, error=lambda: "oops")(Counter())  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="must make an exception"):
        await fn()


async def test_latency_goes_through_the_clock(clock: FakeClock) -> None:
    """Every call, failed or not, waits latency_s on the given clock."""
    target = Counter()
    fn = inject_faults(0.5, latency_s=0.25, seed=1, clock=clock)(target)
    await fault_pattern(fn, 10)
    assert clock.sleeps == [0.25] * 10
    assert clock.now == pytest.approx(2.5)


async def test_latency_alone_slows_without_failing(clock: FakeClock) -> None:
    """rate=0 with latency runs every call, late."""
    target = Counter()
    fn = inject_faults(0.0, latency_s=1.0, clock=clock)(target)
    assert await fn() == "ok"
    assert target.calls == 1 and clock.sleeps == [1.0]


def test_sync_functions(clock: FakeClock) -> None:
    """A sync function fails the same way; its latency blocks on the clock, as it would."""
    calls = 0

    @inject_faults(0.5, latency_s=0.1, seed=3, clock=clock)
    def legacy(x: int) -> int:
        """A legacy function."""
        nonlocal calls
        calls += 1
        return x

    outcomes = []
    for _ in range(20):
        try:
            outcomes.append(legacy(1))
        except TransientError:
            outcomes.append(None)
    assert calls == sum(o is not None for o in outcomes)
    assert 0 < calls < 20
    assert clock.sleeps == [0.1] * 20
    assert legacy.__name__ == "legacy" and not inspect.iscoroutinefunction(legacy)


async def test_keeps_name_signature_and_asyncness() -> None:
    """The wrapped function keeps its name, docstring and signature, and stays async."""

    async def place(order: str, *, urgent: bool = False) -> str:
        """Place an order."""
        return order

    fn = inject_faults(0.1, seed=0)(place)
    assert fn.__name__ == "place" and fn.__doc__ == "Place an order."
    assert inspect.signature(fn) == inspect.signature(place)
    assert inspect.iscoroutinefunction(fn)


async def test_retry_rides_out_injected_faults(clock: FakeClock) -> None:
    """retry() outside the chaos turns a 50% fault rate into successes."""
    target = Counter()
    policy = FixedRetryPolicy(max_retries=10, delay_ms=0, jitter=False)
    fn = pipeline(retry(policy, clock=clock), inject_faults(0.5, seed=4))(target)
    for _ in range(20):
        assert await fn() == "ok"
    assert target.calls == 20


async def test_a_breaker_opens_on_injected_faults(clock: FakeClock) -> None:
    """A drill: total failure injected under a breaker opens it."""
    cb = circuit_breaker(minimum_throughput=5, clock=clock)
    fn = cb(inject_faults(1.0)(Counter()))
    for _ in range(5):
        with pytest.raises(TransientError):
            await fn()
    assert cb.state == "open"


@pytest.mark.parametrize(
    ("field", "options"),
    [
        ("rate", {"rate": -0.1}),
        ("rate", {"rate": 1.5}),
        ("rate", {"rate": math.nan}),
        ("rate", {"rate": True}),
        ("latency_s", {"rate": 0.1, "latency_s": -1}),
        ("latency_s", {"rate": 0.1, "latency_s": math.inf}),
        ("latency_s", {"rate": 0.1, "latency_s": math.nan}),
    ],
)
def test_invalid_settings_name_the_field(field: str, options: dict[str, Any]) -> None:
    """Out-of-range settings raise a ValueError naming the field."""
    with pytest.raises(ConfigurationError, match=field):
        inject_faults(**options)


def test_error_must_be_callable() -> None:
    """`error` that is neither a type nor a factory is refused at construction."""
    with pytest.raises(TypeError, match="error"):
        inject_faults(0.5, error=TransientError("made once"))  # type: ignore[arg-type]


def test_repr_shows_the_settings() -> None:
    """The repr reads like the call that made it."""
    assert repr(inject_faults(0.2, error=ConnectionError, latency_s=0.5, seed=3)) == (
        "inject_faults(0.2, error=ConnectionError, latency_s=0.5, seed=3)"
    )


class BlockingClock(FakeClock):
    """A fake clock that tells the sleeps that block (sync) from those that await."""

    def __init__(self) -> None:
        super().__init__()
        self.blocking: list[float] = []

    def sleep_sync(self, seconds: float) -> None:
        self.blocking.append(seconds)
        super().sleep_sync(seconds)


async def test_an_async_function_behind_a_lambda_is_slowed_on_the_event_loop() -> None:
    """A lambda around an async function: once a call ran it and got a coroutine back, latency
    is awaited (the event loop runs on) and a fault is raised when the call is awaited; the
    calls until then block, as they would for a sync function."""
    clock = BlockingClock()
    target = Counter()
    fn = inject_faults(0.5, latency_s=0.25, seed=1, clock=clock)(lambda: target())
    pattern = await fault_pattern(fn, 10)
    assert any(pattern) and not all(pattern)
    assert clock.sleeps == [0.25] * 10
    assert clock.blocking == [0.25] * (pattern.index(False) + 1)
    assert target.calls == pattern.count(False)
    pending = fn()  # a fault, if any, is raised by the coroutine, not by the call
    with contextlib.suppress(TransientError):
        await pending


async def test_a_faulty_repository_opens_and_closes_its_store_with_async_with(tmp_path):
    """`async with FaultyRepository(SQLiteRepository(...))` opens the store, injects faults
    into its writes, and closes it."""
    store = SQLiteRepository(tmp_path / "notes.sqlite3", Note)
    async with FaultyRepository(store, transient_rate=1.0) as faulty:
        assert isinstance(faulty, FaultyRepository)
        with pytest.raises(TransientError, match="injected"):
            await faulty.persist(Note(id="n"))
        assert await faulty.retrieve(["n"]) == []
    with pytest.raises(StoreClosedError):
        await store.retrieve(["n"])


class Note(Aggregate):
    text: str = ""
