"""Provider health fold and circuit breaker transitions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.health import (
    ProviderHealth,
    effective_circuit,
    initial_health,
    observe,
    observe_in,
    reliability,
)
from domain.policy import CircuitPolicy

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
POLICY = CircuitPolicy(
    failure_threshold=5,
    error_rate_threshold=0.5,
    min_samples=10,
    cooldown_ms=30_000,
    ewma_alpha=0.2,
)


def _fold(outcomes: list[bool], *, start: ProviderHealth | None = None) -> ProviderHealth:
    health = start or initial_health("sim-a")
    for i, ok in enumerate(outcomes):
        at = T0 + timedelta(milliseconds=i)
        health = observe(health, ok=ok, latency_ms=100, at=at, policy=POLICY)
    return health


def test_first_observation_sets_latency_and_counts() -> None:
    health = observe(initial_health("p"), ok=True, latency_ms=250, at=T0, policy=POLICY)
    assert health.latency_ewma_ms == 250
    assert health.samples == 1
    assert health.error_rate == 0
    assert health.updated_at == T0
    nxt = observe(health, ok=False, latency_ms=None, at=T0, policy=POLICY)
    assert nxt.latency_ewma_ms == 250
    assert nxt.error_rate == pytest.approx(0.2)
    assert nxt.consecutive_failures == 1


def test_latency_is_an_ewma() -> None:
    health = observe(initial_health("p"), ok=True, latency_ms=100, at=T0, policy=POLICY)
    health = observe(health, ok=True, latency_ms=200, at=T0, policy=POLICY)
    assert health.latency_ewma_ms == pytest.approx(120)


def test_consecutive_failures_open_the_circuit() -> None:
    assert _fold([False] * 4).circuit == "closed"
    opened = _fold([False] * 5)
    assert opened.circuit == "open"
    assert opened.opened_at == T0 + timedelta(milliseconds=4)


def test_a_success_resets_the_consecutive_count() -> None:
    health = _fold([False, False, False, False, True, False, False, False, False])
    assert health.circuit == "closed"
    assert health.consecutive_failures == 4


def test_error_rate_opens_only_with_min_samples() -> None:
    pattern = [True, False] * 3 + [False, False]  # 8 samples, high rate, < 5 in a row
    early = _fold(pattern)
    assert early.error_rate >= 0.5
    assert early.circuit == "closed"
    later = _fold([True, False, False, True, False, False, True, False, False, True, False])
    assert later.samples >= POLICY.min_samples
    assert later.circuit == "open"
    assert later.consecutive_failures < POLICY.failure_threshold


def test_cooldown_turns_open_into_half_open() -> None:
    opened = _fold([False] * 5)
    assert opened.opened_at is not None
    assert effective_circuit(opened, opened.opened_at, POLICY) == "open"
    just_before = opened.opened_at + timedelta(milliseconds=29_999)
    assert effective_circuit(opened, just_before, POLICY) == "open"
    after = opened.opened_at + timedelta(milliseconds=30_000)
    assert effective_circuit(opened, after, POLICY) == "half_open"
    assert effective_circuit(initial_health("p"), after, POLICY) == "closed"


def test_success_in_half_open_closes() -> None:
    opened = _fold([False] * 5)
    assert opened.opened_at is not None
    probe_at = opened.opened_at + timedelta(seconds=31)
    closed = observe(opened, ok=True, latency_ms=90, at=probe_at, policy=POLICY)
    assert closed.circuit == "closed"
    assert closed.opened_at is None
    assert closed.consecutive_failures == 0
    assert closed.samples_since_close == 0


def test_failure_in_half_open_reopens_with_a_new_cooldown() -> None:
    opened = _fold([False] * 5)
    assert opened.opened_at is not None
    probe_at = opened.opened_at + timedelta(seconds=31)
    reopened = observe(opened, ok=False, latency_ms=None, at=probe_at, policy=POLICY)
    assert reopened.circuit == "open"
    assert reopened.opened_at == probe_at
    assert effective_circuit(reopened, probe_at + timedelta(seconds=29), POLICY) == "open"


def test_outcome_during_cooldown_keeps_the_circuit_open() -> None:
    opened = _fold([False] * 5)
    assert opened.opened_at is not None
    late = observe(
        opened, ok=True, latency_ms=50, at=opened.opened_at + timedelta(seconds=1), policy=POLICY
    )
    assert late.circuit == "open"
    assert late.opened_at == opened.opened_at


def test_observe_rejects_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="aware"):
        observe(
            initial_health("p"),
            ok=True,
            latency_ms=1,
            at=datetime(2026, 1, 1),
            policy=POLICY,
        )


def test_observe_in_returns_a_new_snapshot() -> None:
    snapshot: dict[str, ProviderHealth] = {}
    updated = observe_in(snapshot, "p", ok=False, latency_ms=10, at=T0, policy=POLICY)
    assert snapshot == {}
    assert updated["p"].samples == 1
    assert reliability(updated["p"]) == pytest.approx(0.8)
    assert reliability(None) == 1.0


def test_health_round_trips_through_json() -> None:
    health = _fold([False] * 5)
    assert ProviderHealth.model_validate_json(health.model_dump_json()) == health


@given(st.lists(st.tuples(st.booleans(), st.none() | st.integers(0, 100_000)), max_size=60))
def test_fold_invariants(outcomes: list[tuple[bool, int | None]]) -> None:
    health = initial_health("p")
    for i, (ok, latency) in enumerate(outcomes):
        at = T0 + timedelta(seconds=i)
        health = observe(health, ok=ok, latency_ms=latency, at=at, policy=POLICY)
        assert 0.0 <= health.error_rate <= 1.0
        assert (health.circuit == "open") == (health.opened_at is not None)
        if health.consecutive_failures >= POLICY.failure_threshold:
            assert health.circuit == "open"
    assert health.samples == len(outcomes)
