"""Routing policy: the shipped file, error actions and deterministic backoff."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.catalogue import ConfigError
from domain.errors import ERROR_POLICY, ErrorCode
from domain.policy import RetryPolicy, RoutingPolicy, load_policy

CONFIG = Path(__file__).resolve().parents[2] / "config"
SHIPPED = (CONFIG / "policy.yaml").read_text(encoding="utf-8")


def _policy() -> RoutingPolicy:
    return load_policy(SHIPPED)


def _retry(**overrides: object) -> RetryPolicy:
    return _policy().retry.model_copy(update=overrides)


def test_shipped_policy_loads() -> None:
    policy = load_policy(CONFIG / "policy.yaml")
    assert policy == _policy()
    assert policy.version == "2026-12-03.1"
    assert set(policy.weights) == {"balanced", "cost", "latency", "reliability"}
    r = policy.retry
    assert (r.max_attempts_per_job, r.max_attempts_per_provider) == (4, 2)
    assert (r.base_backoff_ms, r.max_backoff_ms, r.multiplier, r.jitter) == (200, 5000, 2.0, 0.2)
    assert r.honour_retry_after and r.max_retry_after_ms == 30_000
    assert policy.attempt_timeout_ms == 30_000
    c = policy.circuit
    assert (c.failure_threshold, c.error_rate_threshold, c.min_samples) == (5, 0.5, 10)
    assert (c.cooldown_ms, c.ewma_alpha) == (30_000, 0.2)


def test_preference_weights_favour_their_component() -> None:
    w = _policy().weights
    assert w["cost"].cost > max(w["cost"].latency, w["cost"].reliability)
    assert w["latency"].latency > max(w["latency"].cost, w["latency"].reliability)
    assert w["reliability"].reliability > max(w["reliability"].cost, w["reliability"].latency)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_action_defaults_follow_error_policy(code: ErrorCode) -> None:
    policy = _policy().model_copy(update={"error_actions": {}})
    default = ERROR_POLICY[code]
    expected = "retry" if default.retryable else "fallback" if default.fallback else "fail"
    assert policy.action_for(code) == expected


def test_action_overrides_from_yaml() -> None:
    text = SHIPPED.replace("rate_limited: retry", "rate_limited: fallback\n  timeout: fail")
    policy = load_policy(text)
    assert policy.action_for(ErrorCode.RATE_LIMITED) == "fallback"
    assert policy.action_for(ErrorCode.TIMEOUT) == "fail"
    assert policy.action_for(ErrorCode.OVERLOADED) == "retry"
    assert policy.action_for(ErrorCode.INVALID_REQUEST) == "fail"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("rate_limited: retry", "rate_limitd: retry", "error_actions.rate_limitd (key)"),
        ("rate_limited: retry", "rate_limited: maybe", "error_actions.rate_limited"),
        ("jitter: 0.2", "jitter: 1.5", "retry.jitter"),
        ("max_backoff_ms: 5000", "max_backoff_ms: 100", "exceeds max_backoff_ms"),
        ("ewma_alpha: 0.2", "ewma_alpha: 0", "circuit.ewma_alpha"),
        ("  balanced:    {cost: 1.0, latency: 1.0, reliability: 1.0}\n", "", "balanced"),
        (
            "{cost: 0.7, latency: 0.1, reliability: 0.2}",
            "{cost: 0, latency: 0, reliability: 0}",
            "weights.cost: at least one weight",
        ),
        ("attempt_timeout_ms: 30000", "attempt_timeout_ms: 30000\nretries: 3", "retries: Extra"),
    ],
)
def test_bad_policy_names_the_field(old: str, new: str, expected: str) -> None:
    assert old in SHIPPED
    with pytest.raises(ConfigError, match="invalid policy") as info:
        load_policy(SHIPPED.replace(old, new))
    assert expected in str(info.value)


def test_backoff_is_deterministic_per_seed() -> None:
    retry = _retry()
    first = [retry.backoff_ms(retry_no=n, seed="job-1:a1", retry_after_s=None) for n in range(1, 8)]
    again = [retry.backoff_ms(retry_no=n, seed="job-1:a1", retry_after_s=None) for n in range(1, 8)]
    assert first == again
    other = [retry.backoff_ms(retry_no=n, seed="job-2:a1", retry_after_s=None) for n in range(1, 8)]
    assert first != other


def test_backoff_without_jitter_is_exponential_and_capped() -> None:
    retry = _retry(jitter=0.0)
    delays = [retry.backoff_ms(retry_no=n, seed="s", retry_after_s=None) for n in range(1, 9)]
    assert delays == [200, 400, 800, 1600, 3200, 5000, 5000, 5000]


def test_backoff_survives_huge_retry_numbers() -> None:
    retry = _retry(multiplier=100.0)
    assert retry.backoff_ms(retry_no=10_000, seed="s", retry_after_s=None) <= 5000


def test_backoff_rejects_retry_zero() -> None:
    with pytest.raises(ValueError, match="retry_no"):
        _retry().backoff_ms(retry_no=0, seed="s", retry_after_s=None)


@given(retry_no=st.integers(1, 60), seed=st.text(max_size=40))
def test_backoff_within_jitter_band_and_cap(retry_no: int, seed: str) -> None:
    retry = _retry()
    delay = retry.backoff_ms(retry_no=retry_no, seed=seed, retry_after_s=None)
    nominal = min(5000.0, 200 * 2.0 ** min(retry_no - 1, 60))
    assert 0 <= delay <= 5000
    assert nominal * 0.8 - 1 <= delay <= nominal * 1.2 + 1


@given(
    retry_no=st.integers(1, 20),
    seed=st.text(max_size=20),
    retry_after=st.floats(min_value=0.001, max_value=1000, allow_nan=False),
)
def test_backoff_honours_retry_after_up_to_its_cap(
    retry_no: int, seed: str, retry_after: float
) -> None:
    retry = _retry()
    plain = retry.backoff_ms(retry_no=retry_no, seed=seed, retry_after_s=None)
    delay = retry.backoff_ms(retry_no=retry_no, seed=seed, retry_after_s=retry_after)
    assert delay >= plain
    assert delay >= min(retry_after * 1000, 30_000)
    assert delay <= max(plain, 30_000)


def test_retry_after_examples() -> None:
    retry = _retry(jitter=0.0)
    assert retry.backoff_ms(retry_no=1, seed="s", retry_after_s=7) == 7000
    assert retry.backoff_ms(retry_no=1, seed="s", retry_after_s=0.05) == 200
    assert retry.backoff_ms(retry_no=1, seed="s", retry_after_s=120) == 30_000
    ignoring = _retry(jitter=0.0, honour_retry_after=False)
    assert ignoring.backoff_ms(retry_no=1, seed="s", retry_after_s=7) == 200
    assert retry.backoff_ms(retry_no=1, seed="s", retry_after_s=float("nan")) == 200
