"""Observed provider health as a pure fold over attempt outcomes, with a circuit breaker.

`observe` folds one outcome into a `ProviderHealth`; it never reads the clock (the outcome's time is
passed in). The circuit opens after `failure_threshold` consecutive failures, or when the EWMA error
rate reaches `error_rate_threshold` with at least `min_samples` outcomes since the circuit last
closed. An open circuit reads as half-open once `cooldown_ms` has passed (`effective_circuit`); the
next outcome then closes it (success) or reopens it (failure).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from domain.policy import CircuitPolicy

CircuitState = Literal["closed", "open", "half_open"]


class ProviderHealth(BaseModel):
    """What the control plane has observed of one provider, as a frozen JSON-serializable value."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: str = Field(min_length=1)
    latency_ewma_ms: float | None = Field(default=None, ge=0.0)
    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    samples: int = Field(default=0, ge=0)
    samples_since_close: int = Field(default=0, ge=0)
    consecutive_failures: int = Field(default=0, ge=0)
    circuit: CircuitState = "closed"
    opened_at: AwareDatetime | None = None
    updated_at: AwareDatetime | None = None


HealthSnapshot = dict[str, ProviderHealth]


def initial_health(provider: str) -> ProviderHealth:
    """Return the health of a provider nothing has been observed of yet."""
    return ProviderHealth(provider=provider)


def _ewma(previous: float | None, value: float, alpha: float) -> float:
    return value if previous is None else alpha * value + (1.0 - alpha) * previous


def effective_circuit(health: ProviderHealth, now: datetime, policy: CircuitPolicy) -> CircuitState:
    """Return the circuit state at `now`: an open circuit turns half-open after the cooldown."""
    if health.circuit != "open":
        return health.circuit
    if health.opened_at is None:
        return "half_open"
    if now - health.opened_at >= timedelta(milliseconds=policy.cooldown_ms):
        return "half_open"
    return "open"


def observe(
    health: ProviderHealth,
    *,
    ok: bool,
    latency_ms: int | None,
    at: datetime,
    policy: CircuitPolicy,
) -> ProviderHealth:
    """Fold one attempt outcome of the provider into its health, moving the circuit as needed."""
    if at.tzinfo is None:
        raise ValueError("observe needs an aware datetime")
    alpha = policy.ewma_alpha
    error_rate = alpha * (0.0 if ok else 1.0) + (1.0 - alpha) * health.error_rate
    error_rate = min(1.0, max(0.0, error_rate))
    latency = health.latency_ewma_ms
    if latency_ms is not None:
        latency = _ewma(latency, float(max(0, latency_ms)), alpha)
    consecutive = 0 if ok else health.consecutive_failures + 1
    since_close = health.samples_since_close + 1

    state = effective_circuit(health, at, policy)
    circuit: CircuitState = state
    opened_at = health.opened_at
    if state == "half_open":
        if ok:
            circuit, opened_at, since_close = "closed", None, 0
        else:
            circuit, opened_at = "open", at
    elif state == "closed" and not ok:
        too_many = consecutive >= policy.failure_threshold
        too_often = since_close >= policy.min_samples and error_rate >= policy.error_rate_threshold
        if too_many or too_often:
            circuit, opened_at = "open", at
    # An outcome arriving while the circuit is still cooling down updates the statistics only.

    return ProviderHealth(
        provider=health.provider,
        latency_ewma_ms=latency,
        error_rate=error_rate,
        samples=health.samples + 1,
        samples_since_close=since_close,
        consecutive_failures=consecutive,
        circuit=circuit,
        opened_at=opened_at,
        updated_at=at,
    )


def observe_in(
    snapshot: HealthSnapshot,
    provider: str,
    *,
    ok: bool,
    latency_ms: int | None,
    at: datetime,
    policy: CircuitPolicy,
) -> HealthSnapshot:
    """Return a new snapshot with one outcome of `provider` folded in; the input is not mutated."""
    current = snapshot.get(provider) or initial_health(provider)
    updated = observe(current, ok=ok, latency_ms=latency_ms, at=at, policy=policy)
    return {**snapshot, provider: updated}


def reliability(health: ProviderHealth | None) -> float:
    """Return 1 - EWMA error rate, or 1.0 when nothing has been observed."""
    return 1.0 if health is None else 1.0 - health.error_rate
