"""RetryBudget: retries bounded by recent first attempts plus a reserve, shared by whoever
holds the budget, and what retry() does when it is spent."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cqrs_resilience import (
    RETRY_BUDGET_EXHAUSTED,
    FakeClock,
    FixedRetryPolicy,
    HookRegistry,
    RetryBudget,
    TransientError,
    retry,
)

ZERO_DELAY = FixedRetryPolicy(max_retries=3, delay_ms=0, jitter=False)


def test_a_fresh_budget_allows_the_reserve(clock: FakeClock) -> None:
    """With no traffic yet, min_retries_per_s * ttl_s retries are allowed, then no more."""
    budget = RetryBudget(min_retries_per_s=10, ttl_s=10, clock=clock)
    assert budget.balance == 100
    assert all(budget.try_withdraw() for _ in range(100))
    assert not budget.try_withdraw()
    assert budget.balance == 0


@pytest.mark.parametrize(
    ("ratio", "deposits", "retries"), [(0.2, 10, 2), (0.1, 25, 2), (2.5, 2, 5)]
)
def test_first_attempts_earn_ratio_retries_each(
    clock: FakeClock, ratio: float, deposits: int, retries: int
) -> None:
    """Each deposit is worth `ratio` retries (more than one when ratio > 1)."""
    budget = RetryBudget(ratio=ratio, min_retries_per_s=0, clock=clock)
    for _ in range(deposits):
        budget.deposit()
    assert budget.balance == retries
    assert [budget.try_withdraw() for _ in range(retries + 1)] == [True] * retries + [False]


def test_a_refused_withdrawal_changes_nothing(clock: FakeClock) -> None:
    """try_withdraw() that says no leaves the balance as it was."""
    budget = RetryBudget(ratio=0.5, min_retries_per_s=0, clock=clock)
    budget.deposit()
    assert not budget.try_withdraw()
    budget.deposit()
    assert budget.try_withdraw()


def test_ratio_and_reserve_zero_never_allow_a_retry(clock: FakeClock) -> None:
    """ratio=0 with no reserve is an empty budget, as in Finagle."""
    budget = RetryBudget(ratio=0, min_retries_per_s=0, clock=clock)
    for _ in range(100):
        budget.deposit()
    assert not budget.try_withdraw()


def test_the_budget_refills_after_ttl_s(clock: FakeClock) -> None:
    """Withdrawals and deposits expire after ttl_s: the reserve comes back, earned retries go."""
    budget = RetryBudget(ratio=1.0, min_retries_per_s=0.5, ttl_s=4, clock=clock)
    for _ in range(3):
        budget.deposit()
    assert budget.balance == 5
    while budget.try_withdraw():
        pass
    clock.advance(3.5)
    assert budget.balance == 0  # still inside the window
    clock.advance(0.5)
    assert budget.balance == 2  # the reserve again; the three deposits expired too


def test_an_old_deposit_expires_while_a_newer_one_stays(clock: FakeClock) -> None:
    """Entries live between 0.9 and 1.0 ttl_s (ten slices), each by its own age."""
    budget = RetryBudget(ratio=1.0, min_retries_per_s=0, ttl_s=10, clock=clock)
    budget.deposit()
    clock.advance(5)
    budget.deposit()
    assert budget.balance == 2
    clock.advance(5)
    assert budget.balance == 1
    clock.advance(5)
    assert budget.balance == 0


def test_a_long_quiet_spell_forgets_everything(clock: FakeClock) -> None:
    """After much more than ttl_s without traffic the budget is as fresh."""
    budget = RetryBudget(ratio=1.0, min_retries_per_s=1, ttl_s=2, clock=clock)
    budget.deposit()
    while budget.try_withdraw():
        pass
    clock.advance(3600)
    assert budget.balance == 2


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("ratio", {"ratio": -0.1}),
        ("ratio", {"ratio": 1000.5}),
        ("ratio", {"ratio": math.nan}),
        ("ratio", {"ratio": True}),
        ("ratio", {"ratio": "0.2"}),
        ("min_retries_per_s", {"min_retries_per_s": -1}),
        ("min_retries_per_s", {"min_retries_per_s": math.inf}),
        ("ttl_s", {"ttl_s": 0.5}),
        ("ttl_s", {"ttl_s": 61}),
        ("ttl_s", {"ttl_s": math.inf}),
    ],
)
def test_bad_parameters_are_rejected(field: str, kwargs: dict[str, Any]) -> None:
    """Out of range, not finite or not a number: a ValueError naming the field."""
    with pytest.raises(ValueError, match=field):
        RetryBudget(**kwargs)


def test_retry_takes_only_a_budget() -> None:
    """budget= must be a RetryBudget."""
    with pytest.raises(TypeError, match="RetryBudget"):
        retry(budget=10)  # type: ignore[call-overload]


# --- the budget as retry() uses it --------------------------------------------------------


class Failing:
    """Always fails with a transient error; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        raise TransientError("down")


async def test_a_spent_budget_stops_retrying_with_a_note_and_an_event(
    clock: FakeClock, hooks: HookRegistry, events: list[Any]
) -> None:
    """The refused retry is not made; the last error says the budget is spent, and
    `handler.retry.budget_exhausted` carries the usual context plus the budget."""
    budget = RetryBudget(ratio=0, min_retries_per_s=0.2, ttl_s=10, clock=clock)
    failing = Failing()
    with pytest.raises(TransientError) as info:
        await retry(ZERO_DELAY, budget=budget, clock=clock, hooks=hooks)(failing)()
    assert failing.calls == 3  # two retries from the reserve of 2
    assert info.value.__notes__[0].startswith("gave up after 3 attempts: the retry budget is spent")
    names = [name for name, _ in events]
    assert names == ["handler.retry.scheduled"] * 2 + [RETRY_BUDGET_EXHAUSTED]
    spent = events[-1][1]
    assert spent["budget"] is budget
    assert spent["delay_ms"] is None
    assert spent["attempt"] == 2
    assert spent["max_retries"] == 3
    assert spent["error"] is info.value
    assert spent["policy"] == ZERO_DELAY
    assert spent["handler.type"] == "Failing"
    assert spent["command.type"] is None
    assert RETRY_BUDGET_EXHAUSTED == "handler.retry.budget_exhausted"


async def test_only_budget_exhausted_is_emitted_when_the_budget_ends_retries(
    clock: FakeClock, hooks: HookRegistry
) -> None:
    """A spent budget is its own event, not also `handler.retry.exhausted`."""
    names: list[str] = []
    for name in ("handler.retry.exhausted", RETRY_BUDGET_EXHAUSTED):
        hooks.subscribe(name, lambda ctx, name=name: names.append(name))
    budget = RetryBudget(ratio=0, min_retries_per_s=0.1, ttl_s=10, clock=clock)
    with pytest.raises(TransientError):
        await retry(ZERO_DELAY, budget=budget, clock=clock, hooks=hooks)(Failing())()
    assert names == [RETRY_BUDGET_EXHAUSTED]


async def test_one_budget_shared_by_two_behaviors_is_one_budget(clock: FakeClock) -> None:
    """Retries spent through one behavior are gone for the other."""
    budget = RetryBudget(ratio=0, min_retries_per_s=0.3, ttl_s=10, clock=clock)
    first, second = Failing(), Failing()
    with pytest.raises(TransientError):
        await retry(ZERO_DELAY, budget=budget, clock=clock)(first)()
    with pytest.raises(TransientError) as info:
        await retry(ZERO_DELAY, budget=budget, clock=clock)(second)()
    assert (first.calls, second.calls) == (4, 1)
    assert "retry budget is spent" in info.value.__notes__[0]


async def test_first_attempts_deposit_and_retries_withdraw(clock: FakeClock) -> None:
    """Successful calls earn retries for later failing ones; retries themselves earn none."""
    budget = RetryBudget(ratio=0.5, min_retries_per_s=0, clock=clock)

    async def ok() -> str:
        return "ok"

    for _ in range(4):
        assert await retry(ZERO_DELAY, budget=budget, clock=clock)(ok)() == "ok"
    failing = Failing()
    with pytest.raises(TransientError):
        await retry(ZERO_DELAY, budget=budget, clock=clock)(failing)()
    assert failing.calls == 3  # 4 + 1 first attempts at 0.5 each: 2.5, so two retries


async def test_a_spent_policy_does_not_draw_on_the_budget(clock: FakeClock) -> None:
    """Giving up because the policy is spent leaves the budget untouched."""
    budget = RetryBudget(ratio=0, min_retries_per_s=1, ttl_s=10, clock=clock)
    with pytest.raises(TransientError) as info:
        await retry(FixedRetryPolicy(max_retries=2, delay_ms=0), budget=budget, clock=clock)(
            Failing()
        )()
    assert info.value.__notes__ == ["gave up after 3 attempts: all retries used (max_retries=2)"]
    assert budget.balance == 8


def test_sync_functions_use_the_budget_too(clock: FakeClock) -> None:
    """A plain function's retries are drawn from the budget the same way."""
    budget = RetryBudget(ratio=0, min_retries_per_s=0.1, ttl_s=10, clock=clock)
    calls: list[int] = []

    @retry(ZERO_DELAY, budget=budget, clock=clock)
    def legacy() -> None:
        calls.append(1)
        raise ConnectionError("reset")

    with pytest.raises(ConnectionError) as info:
        legacy()
    assert len(calls) == 2
    assert "retry budget is spent" in info.value.__notes__[0]


async def test_the_budget_shows_in_the_behaviors_repr(clock: FakeClock) -> None:
    """repr() of the behavior and of the budget say what they are."""
    budget = RetryBudget(clock=clock)
    assert repr(budget) == "RetryBudget(ratio=0.2, min_retries_per_s=10, ttl_s=10, balance=100)"
    assert "budget=RetryBudget(" in repr(retry(budget=budget))


# --- properties --------------------------------------------------------------------------

RATIOS = st.sampled_from([0, 0.1, 0.2, 0.5, 1, 2.5])
RESERVES = st.sampled_from([0, 0.1, 0.5, 1, 10])
OPS = st.lists(
    st.one_of(
        st.just("deposit"),
        st.just("withdraw"),
        st.tuples(st.just("wait"), st.floats(min_value=0, max_value=30)),
    ),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(ratio=RATIOS, reserve=RESERVES, ttl_s=st.sampled_from([10, 20, 60]), ops=OPS)
def test_the_budget_equals_its_definition_on_slice_boundaries(
    ratio: float, reserve: float, ttl_s: int, ops: list[Any]
) -> None:
    """With time moving in whole slices (ttl_s / 10), a retry is allowed exactly when the
    retries of the last ttl_s, this one included, stay within ratio * first attempts of the
    last ttl_s plus min_retries_per_s * ttl_s."""
    clock = FakeClock()
    budget = RetryBudget(ratio=ratio, min_retries_per_s=reserve, ttl_s=ttl_s, clock=clock)
    width = ttl_s / 10
    log: list[tuple[float, str]] = []
    for op in ops:
        if isinstance(op, tuple):
            clock.advance(math.floor(op[1] / 3) * width)
            continue
        if op == "deposit":
            budget.deposit()
            log.append((clock.now, op))
            continue
        live = [kind for at, kind in log if at > clock.now - ttl_s]
        deposits, retries = live.count("deposit"), live.count("withdraw")
        allowed = retries + 1 <= ratio * deposits + math.floor(reserve * ttl_s) + 1e-9
        assert budget.try_withdraw() == allowed
        if allowed:
            log.append((clock.now, op))


@settings(max_examples=200, deadline=None)
@given(ratio=RATIOS, reserve=RESERVES, ops=OPS)
def test_retries_never_exceed_the_share_over_any_window(
    ratio: float, reserve: float, ops: list[Any]
) -> None:
    """At any time moves, the retries allowed in the last 0.9 ttl_s never exceed ratio * first
    attempts of the last ttl_s plus the reserve."""
    clock = FakeClock()
    ttl_s = 10
    budget = RetryBudget(ratio=ratio, min_retries_per_s=reserve, ttl_s=ttl_s, clock=clock)
    deposits: list[float] = []
    retries: list[float] = []
    for op in ops:
        if isinstance(op, tuple):
            clock.advance(op[1] / 7)
        elif op == "deposit":
            budget.deposit()
            deposits.append(clock.now)
        elif budget.try_withdraw():
            retries.append(clock.now)
            now = clock.now
            recent = sum(1 for at in retries if at >= now - 0.9 * ttl_s)
            earned = sum(1 for at in deposits if at > now - ttl_s)
            assert recent <= ratio * earned + math.floor(reserve * ttl_s) + 1e-9
