"""Versioned routing policy: score weights per preference, retries, error actions, circuit breaker.

The policy is data (`config/policy.yaml`) validated into frozen pydantic models. Backoff delays are
deterministic: the jitter comes from a hash of a caller-supplied seed (for instance the attempt id),
so replaying a job's log yields exactly the same delays.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from domain.catalogue import load_yaml_model
from domain.errors import ERROR_POLICY, ErrorCode
from domain.messages import Preference

ErrorAction = Literal["retry", "fallback", "fail"]
PREFERENCES: tuple[Preference, ...] = ("balanced", "cost", "latency", "reliability")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Weights(_Frozen):
    """Relative weight of each score component; only their ratios matter."""

    cost: float = Field(ge=0.0, le=1000.0)
    latency: float = Field(ge=0.0, le=1000.0)
    reliability: float = Field(ge=0.0, le=1000.0)

    @model_validator(mode="after")
    def _not_all_zero(self) -> Weights:
        if self.total() <= 0:
            raise ValueError("at least one weight must be positive")
        return self

    def total(self) -> float:
        """Return the sum of the weights, used to bring a weighted score back into 0..1."""
        return self.cost + self.latency + self.reliability


class RetryPolicy(_Frozen):
    """Attempt budgets and the backoff between attempts of one job."""

    max_attempts_per_job: int = Field(ge=1, le=100)
    max_attempts_per_provider: int = Field(ge=1, le=100)
    base_backoff_ms: int = Field(ge=0)
    max_backoff_ms: int = Field(ge=0)
    multiplier: float = Field(ge=1.0, le=100.0)
    jitter: float = Field(ge=0.0, le=1.0)
    honour_retry_after: bool = True
    max_retry_after_ms: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> RetryPolicy:
        if self.base_backoff_ms > self.max_backoff_ms:
            raise ValueError(
                f"base_backoff_ms ({self.base_backoff_ms}) exceeds "
                f"max_backoff_ms ({self.max_backoff_ms})"
            )
        if self.max_attempts_per_provider > self.max_attempts_per_job:
            raise ValueError("max_attempts_per_provider exceeds max_attempts_per_job")
        return self

    def backoff_ms(self, *, retry_no: int, seed: str, retry_after_s: float | None) -> int:
        """Compute the delay before retry `retry_no` (1 = first retry), the same on every replay.

        delay = min(max_backoff_ms, base_backoff_ms * multiplier ** (retry_no - 1)), scaled by a
        factor in [1 - jitter, 1 + jitter] drawn from sha256(seed, retry_no), then capped again at
        max_backoff_ms. When honour_retry_after is set and the provider sent a Retry-After, the
        result is max(delay, min(retry_after, max_retry_after_ms)).
        """
        if retry_no < 1:
            raise ValueError(f"retry_no starts at 1, got {retry_no}")
        cap = self.max_backoff_ms
        try:
            raw = self.base_backoff_ms * self.multiplier ** (retry_no - 1)
        except OverflowError:
            raw = math.inf
        delay = min(float(cap), raw)
        digest = hashlib.sha256(f"{seed}\x00{retry_no}".encode()).digest()
        unit = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
        factor = 1.0 - self.jitter + 2.0 * self.jitter * unit
        result = min(cap, round(delay * factor))
        if (
            self.honour_retry_after
            and retry_after_s is not None
            and math.isfinite(retry_after_s)
            and retry_after_s > 0
        ):
            seconds = min(retry_after_s, self.max_retry_after_ms / 1000)  # no float overflow
            asked = min(math.ceil(seconds * 1000), self.max_retry_after_ms)
            result = max(result, asked)
        return int(result)


class CircuitPolicy(_Frozen):
    """When a provider's circuit opens, and how long it stays open before a probe."""

    failure_threshold: int = Field(ge=1)
    error_rate_threshold: float = Field(gt=0.0, le=1.0)
    min_samples: int = Field(ge=1)
    cooldown_ms: int = Field(ge=0)
    ewma_alpha: float = Field(gt=0.0, le=1.0)


class RoutingPolicy(_Frozen):
    """A versioned routing policy; every preference has weights."""

    version: str = Field(min_length=1, max_length=64)
    weights: dict[Preference, Weights]
    retry: RetryPolicy
    error_actions: dict[ErrorCode, ErrorAction] = Field(default_factory=dict)
    default_max_output_tokens: int = Field(ge=1, le=1_000_000)
    #: How long a provider has to answer an attempt, counted from its `started` result.
    attempt_timeout_ms: int = Field(gt=0)
    #: How long a dispatched attempt may wait to be started (queued behind its provider's
    #: backlog); unset: the attempt timeout, counted from the dispatch.
    start_timeout_ms: int | None = Field(default=None, gt=0)
    circuit: CircuitPolicy

    @field_validator("weights")
    @classmethod
    def _every_preference(cls, value: dict[Preference, Weights]) -> dict[Preference, Weights]:
        missing = [p for p in PREFERENCES if p not in value]
        if missing:
            raise ValueError(f"missing weights for preference(s): {', '.join(missing)}")
        return value

    def weights_for(self, preference: Preference) -> Weights:
        """Return the score weights of a request preference."""
        return self.weights[preference]

    def action_for(self, code: ErrorCode) -> ErrorAction:
        """Decide what a failed attempt with `code` leads to: the YAML first, else ERROR_POLICY."""
        configured = self.error_actions.get(code)
        if configured is not None:
            return configured
        default = ERROR_POLICY[code]
        if default.retryable:
            return "retry"
        if default.fallback:
            return "fallback"
        return "fail"


def load_policy(source: str | Path) -> RoutingPolicy:
    """Load and validate a routing policy from YAML text or a file path."""
    return load_yaml_model(source, RoutingPolicy, "policy")
