"""A provider that answers from the request's script or from seeded dice, never from the network.

A request's `simulate.outcomes[<provider>]` scripts the attempts on this provider: attempt n gets
the n-th outcome, the last one repeating. Without a script the provider answers "ok", or fails with
the profile's error code at the profile's error rate. Every random choice is drawn from a hash of
(seed, provider name, idempotency key), so re-delivering the same dispatch gives the same answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from domain.errors import ErrorCode
from domain.messages import Dispatch, Output, Simulate
from domain.usage import estimate_tokens
from providers.base import (
    Completed,
    Failed,
    NoAnswer,
    Outcome,
    check_dispatch,
    elapsed_ms,
    raw_error,
)

#: Characters of the prompt echoed in a simulated answer.
ECHO_CHARS = 40


@dataclass(frozen=True, slots=True)
class SimulationProfile:
    """Describe how an unscripted simulated model behaves: latency, jitter and error rate."""

    latency_ms: int
    latency_jitter_ms: int
    error_rate: float
    error_code: str = ErrorCode.PROVIDER_INTERNAL.value

    def __post_init__(self) -> None:
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms}")
        if self.latency_jitter_ms < 0:
            raise ValueError(f"latency_jitter_ms must be >= 0, got {self.latency_jitter_ms}")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be within [0, 1], got {self.error_rate}")
        if self.error_code not in {code.value for code in ErrorCode}:
            raise ValueError(f"error_code {self.error_code!r} is not a canonical error code")


@dataclass(frozen=True, slots=True)
class _Dice:
    """Two uniform draws fixed by a dispatch: one decides failure, one the latency jitter."""

    failure: float
    jitter: float

    @classmethod
    def roll(cls, seed: int, provider: str, idempotency_key: str) -> _Dice:
        digest = hashlib.sha256(f"{seed}\x00{provider}\x00{idempotency_key}".encode()).digest()
        scale = float(1 << 64)
        return cls(
            failure=int.from_bytes(digest[0:8], "big") / scale,
            jitter=int.from_bytes(digest[8:16], "big") / scale,
        )


class SimulatedProvider:
    """Answer dispatches from the request's script or from seeded dice, for tests and drills."""

    kind = "simulated"

    def __init__(
        self,
        name: str,
        profile: SimulationProfile,
        seed: int = 0,
        *,
        model_profiles: Mapping[str, SimulationProfile] | None = None,
        hang_margin_ms: int = 1_000,
    ) -> None:
        if hang_margin_ms < 0:
            raise ValueError(f"hang_margin_ms must be >= 0, got {hang_margin_ms}")
        self.name = name
        self._profile = profile
        self._model_profiles = dict(model_profiles or {})
        self._seed = seed
        self._hang_margin_ms = hang_margin_ms
        self._closed = False
        self._closing = asyncio.Event()

    async def call(self, dispatch: Dispatch) -> Outcome:
        """Play one attempt: sleep the simulated latency, then answer, fail or hang."""
        check_dispatch(self.name, self._closed, dispatch)
        started = time.monotonic()
        simulate = dispatch.request.simulate
        profile = self._model_profiles.get(dispatch.model, self._profile)
        dice = _Dice.roll(self._seed, self.name, dispatch.idempotency_key)
        outcome = self._outcome(dispatch, simulate, profile, dice)

        if outcome == "hang":
            await self._hang((dispatch.timeout_ms + self._hang_margin_ms) / 1000)
            return NoAnswer()

        await asyncio.sleep(self._latency_ms(simulate, profile, dice) / 1000)
        if outcome in ("ok", "duplicate"):
            return self._completed(
                dispatch, simulate, started, repeat=2 if outcome == "duplicate" else 1
            )
        return Failed(
            error=raw_error(
                "simulated", f"simulated {outcome} from {self.name}/{dispatch.model}", code=outcome
            ),
            latency_ms=elapsed_ms(started),
        )

    async def close(self) -> None:
        """Refuse further calls and wake any attempt still hanging."""
        self._closed = True
        self._closing.set()

    def _outcome(
        self, dispatch: Dispatch, simulate: Simulate | None, profile: SimulationProfile, dice: _Dice
    ) -> str:
        script = simulate.outcomes.get(self.name) if simulate is not None else None
        if script:
            return script[min(dispatch.provider_attempt_no, len(script)) - 1]
        return profile.error_code if dice.failure < profile.error_rate else "ok"

    @staticmethod
    def _latency_ms(simulate: Simulate | None, profile: SimulationProfile, dice: _Dice) -> int:
        if simulate is not None and simulate.latency_ms is not None:
            return simulate.latency_ms
        jitter = profile.latency_jitter_ms
        offset = min(int(dice.jitter * (2 * jitter + 1)), 2 * jitter) - jitter
        return max(0, profile.latency_ms + offset)

    async def _hang(self, seconds: float) -> None:
        """Sleep like a provider that never answers; cancellable, and cut short by `close`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    def _completed(
        self, dispatch: Dispatch, simulate: Simulate | None, started: float, *, repeat: int
    ) -> Completed:
        prompt = dispatch.request.prompt_text()
        text = f"simulated answer from {self.name}/{dispatch.model} to: {prompt[:ECHO_CHARS]}"
        if simulate is not None and simulate.usage is not None:
            raw_usage: dict[str, Any] = dict(simulate.usage)
            usage_shape = "canonical"
        else:
            prompt_tokens = estimate_tokens(prompt)
            completion_tokens = estimate_tokens(text)
            raw_usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            usage_shape = "openai_chat"
        return Completed(
            output=Output(text=text, finish_reason="stop"),
            raw_usage=raw_usage,
            usage_shape=usage_shape,
            latency_ms=elapsed_ms(started),
            model=dispatch.model,
            repeat=repeat,
        )
