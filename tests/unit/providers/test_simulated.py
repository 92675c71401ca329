"""The simulated provider: scripted outcomes, seeded dice, hangs and usage shapes."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import pytest

from domain.messages import Simulate
from domain.usage import estimate_tokens
from providers import (
    Completed,
    Failed,
    NoAnswer,
    ProviderAdapter,
    SimulatedProvider,
    SimulationProfile,
)

if TYPE_CHECKING:
    from tests.unit.providers.conftest import MakeDispatch

FAST = SimulationProfile(latency_ms=0, latency_jitter_ms=0, error_rate=0.0)


def scripted(*outcomes: str, provider: str = "fake", **fields: Any) -> Simulate:
    return Simulate(outcomes={provider: list(outcomes)}, **fields)


async def test_is_a_provider_adapter() -> None:
    provider = SimulatedProvider("fake", FAST)
    assert isinstance(provider, ProviderAdapter)
    assert provider.kind == "simulated"


async def test_scripted_outcomes_follow_provider_attempt_no_and_last_repeats(
    make_dispatch: MakeDispatch,
) -> None:
    provider = SimulatedProvider("fake", FAST)
    simulate = scripted("rate_limited", "overloaded", "ok")
    seen = []
    for attempt_no in range(1, 6):
        outcome = await provider.call(
            make_dispatch(provider_attempt_no=attempt_no, simulate=simulate)
        )
        seen.append(outcome.error.code if isinstance(outcome, Failed) else type(outcome).__name__)
    assert seen == ["rate_limited", "overloaded", "Completed", "Completed", "Completed"]


async def test_scripted_error_is_a_simulated_raw_error(make_dispatch: MakeDispatch) -> None:
    provider = SimulatedProvider("fake", FAST)
    outcome = await provider.call(make_dispatch(simulate=scripted("rate_limited")))
    assert isinstance(outcome, Failed)
    assert outcome.error.kind == "simulated"
    assert outcome.error.code == "rate_limited"
    assert outcome.error.retry_after is None
    assert outcome.error.http_status is None


async def test_script_for_another_provider_is_ignored(make_dispatch: MakeDispatch) -> None:
    provider = SimulatedProvider("fake", FAST)
    outcome = await provider.call(
        make_dispatch(simulate=scripted("provider_internal", provider="other"))
    )
    assert isinstance(outcome, Completed)


async def test_ok_echoes_the_prompt_with_openai_shaped_estimated_usage(
    make_dispatch: MakeDispatch,
) -> None:
    provider = SimulatedProvider("fake", FAST)
    prompt = "Explain the difference between a queue and a log in one paragraph."
    outcome = await provider.call(make_dispatch(model="sim-1", messages=[("user", prompt)]))
    assert isinstance(outcome, Completed)
    assert outcome.output.text == f"simulated answer from fake/sim-1 to: {prompt[:40]}"
    assert outcome.output.finish_reason == "stop"
    assert outcome.model == "sim-1"
    assert outcome.repeat == 1
    assert outcome.usage_shape == "openai_chat"
    assert outcome.raw_usage == {
        "prompt_tokens": estimate_tokens(prompt),
        "completion_tokens": estimate_tokens(outcome.output.text),
        "total_tokens": estimate_tokens(prompt) + estimate_tokens(outcome.output.text),
    }


async def test_scripted_usage_is_reported_in_canonical_shape(make_dispatch: MakeDispatch) -> None:
    provider = SimulatedProvider("fake", FAST)
    usage = {"input_tokens": 1200, "output_tokens": 300, "cache_read_tokens": 1000}
    outcome = await provider.call(make_dispatch(simulate=scripted("ok", usage=usage)))
    assert isinstance(outcome, Completed)
    assert outcome.usage_shape == "canonical"
    assert outcome.raw_usage == usage


async def test_duplicate_completes_with_repeat_two(make_dispatch: MakeDispatch) -> None:
    provider = SimulatedProvider("fake", FAST)
    outcome = await provider.call(make_dispatch(simulate=scripted("duplicate")))
    assert isinstance(outcome, Completed)
    assert outcome.repeat == 2


async def test_hang_returns_no_answer_after_the_attempt_timeout(
    make_dispatch: MakeDispatch,
) -> None:
    provider = SimulatedProvider("fake", FAST, hang_margin_ms=20)
    started = time.monotonic()
    outcome = await provider.call(make_dispatch(timeout_ms=30, simulate=scripted("hang")))
    assert isinstance(outcome, NoAnswer)
    assert time.monotonic() - started >= 0.045


async def test_hang_is_cancellable(make_dispatch: MakeDispatch) -> None:
    provider = SimulatedProvider("fake", FAST)
    task = asyncio.create_task(
        provider.call(make_dispatch(timeout_ms=60_000, simulate=scripted("hang")))
    )
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_close_wakes_a_hanging_attempt(make_dispatch: MakeDispatch) -> None:
    provider = SimulatedProvider("fake", FAST)
    task = asyncio.create_task(
        provider.call(make_dispatch(timeout_ms=60_000, simulate=scripted("hang")))
    )
    await asyncio.sleep(0.01)
    await provider.close()
    assert isinstance(await asyncio.wait_for(task, 1.0), NoAnswer)


async def test_scripted_latency_is_slept(make_dispatch: MakeDispatch) -> None:
    provider = SimulatedProvider("fake", FAST)
    outcome = await provider.call(make_dispatch(simulate=scripted("ok", latency_ms=50)))
    assert isinstance(outcome, Completed)
    assert outcome.latency_ms >= 45


async def test_profile_latency_stays_within_jitter(make_dispatch: MakeDispatch) -> None:
    profile = SimulationProfile(latency_ms=30, latency_jitter_ms=20, error_rate=0.0)
    provider = SimulatedProvider("fake", profile)
    outcomes = [await provider.call(make_dispatch(idempotency_key=f"k-{i}")) for i in range(5)]
    for outcome in outcomes:
        assert isinstance(outcome, Completed)
        assert 5 <= outcome.latency_ms <= 150


async def test_error_rate_one_always_fails_with_the_profile_code(
    make_dispatch: MakeDispatch,
) -> None:
    profile = SimulationProfile(
        latency_ms=0, latency_jitter_ms=0, error_rate=1.0, error_code="overloaded"
    )
    provider = SimulatedProvider("fake", profile)
    for i in range(20):
        outcome = await provider.call(make_dispatch(idempotency_key=f"k-{i}"))
        assert isinstance(outcome, Failed)
        assert outcome.error.kind == "simulated"
        assert outcome.error.code == "overloaded"


async def test_error_rate_zero_never_fails(make_dispatch: MakeDispatch) -> None:
    provider = SimulatedProvider("fake", FAST)
    for i in range(20):
        assert isinstance(await provider.call(make_dispatch(idempotency_key=f"k-{i}")), Completed)


async def test_script_wins_over_error_rate(make_dispatch: MakeDispatch) -> None:
    profile = SimulationProfile(latency_ms=0, latency_jitter_ms=0, error_rate=1.0)
    provider = SimulatedProvider("fake", profile)
    assert isinstance(await provider.call(make_dispatch(simulate=scripted("ok"))), Completed)


async def test_unscripted_outcomes_are_deterministic_per_idempotency_key(
    make_dispatch: MakeDispatch,
) -> None:
    profile = SimulationProfile(latency_ms=0, latency_jitter_ms=0, error_rate=0.5)

    async def run(seed: int) -> list[bool]:
        provider = SimulatedProvider("fake", profile, seed=seed)
        keys = [f"job-{i}:att-1" for i in range(40)]
        return [
            isinstance(await provider.call(make_dispatch(idempotency_key=k)), Failed) for k in keys
        ]

    first, again = await run(seed=7), await run(seed=7)
    assert first == again
    assert 0 < sum(first) < len(first), "a 50% error rate should mix outcomes over 40 keys"
    assert await run(seed=8) != first


async def test_model_profile_overrides_the_default(make_dispatch: MakeDispatch) -> None:
    failing = SimulationProfile(latency_ms=0, latency_jitter_ms=0, error_rate=1.0)
    provider = SimulatedProvider("fake", FAST, model_profiles={"flaky": failing})
    assert isinstance(await provider.call(make_dispatch(model="flaky")), Failed)
    assert isinstance(await provider.call(make_dispatch(model="steady")), Completed)


async def test_dispatch_for_another_provider_is_a_programmer_error(
    make_dispatch: MakeDispatch,
) -> None:
    provider = SimulatedProvider("fake", FAST)
    with pytest.raises(ValueError, match="other"):
        await provider.call(make_dispatch(provider="other"))


async def test_call_after_close_is_a_programmer_error(make_dispatch: MakeDispatch) -> None:
    provider = SimulatedProvider("fake", FAST)
    await provider.close()
    with pytest.raises(RuntimeError, match="closed"):
        await provider.call(make_dispatch())


@pytest.mark.parametrize(
    "fields",
    [
        {"latency_ms": -1, "latency_jitter_ms": 0, "error_rate": 0.0},
        {"latency_ms": 0, "latency_jitter_ms": -1, "error_rate": 0.0},
        {"latency_ms": 0, "latency_jitter_ms": 0, "error_rate": 1.5},
        {"latency_ms": 0, "latency_jitter_ms": 0, "error_rate": 0.1, "error_code": "nope"},
    ],
)
def test_profile_rejects_nonsense(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimulationProfile(**fields)
