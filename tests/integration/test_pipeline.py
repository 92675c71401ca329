"""The pipeline end to end on the real broker: mixed outcomes, retries, fallbacks, timeouts."""

from __future__ import annotations

import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.stack import Stack, TopicReader, produce, to_json

pytestmark = pytest.mark.integration

USAGE = {"input_tokens": 100, "output_tokens": 50}

#: name -> (script of outcomes per provider, expected state, attempts, provider)
SCENARIOS: dict[str, tuple[dict[str, list[str]], str, int, str]] = {
    "ok": ({"sim-cheap": ["ok"]}, "COMPLETED", 1, "sim-cheap"),
    "rate_limited_then_ok": ({"sim-cheap": ["rate_limited", "ok"]}, "COMPLETED", 2, "sim-cheap"),
    "internal_then_fallback": (
        {"sim-cheap": ["provider_internal"], "sim-fast": ["ok"]},
        "COMPLETED",
        3,
        "sim-fast",
    ),
    "hang_timeout_fallback": (
        {"sim-cheap": ["hang"], "sim-fast": ["ok"]},
        "COMPLETED",
        3,
        "sim-fast",
    ),
    "all_fail": (
        {p: ["provider_internal"] for p in ("sim-cheap", "sim-fast", "sim-smart")},
        "FAILED",
        4,
        "sim-fast",
    ),
    "duplicate_answer": ({"sim-cheap": ["duplicate"]}, "COMPLETED", 1, "sim-cheap"),
}


def price(provider: str, model_hint: str | None = None) -> Decimal:
    """Expected cost of USAGE on a provider's first model, straight from the catalogue YAML."""
    catalogue = yaml.safe_load(Path("config/catalogue.yaml").read_text())
    spec = next(p for p in catalogue["providers"] if p["name"] == provider)
    model = (
        spec["models"][0]
        if model_hint is None
        else next(m for m in spec["models"] if m["name"] == model_hint)
    )
    prices = model["prices"]
    return (
        Decimal(prices["input_per_mtok"]) * USAGE["input_tokens"]
        + Decimal(prices["output_per_mtok"]) * USAGE["output_tokens"]
    ) / Decimal(1_000_000)


def request(tenant: str, request_id: str, outcomes: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "tenant_id": tenant,
        "messages": [{"role": "user", "content": f"question {request_id}"}],
        "preference": "cost",
        "simulate": {"outcomes": outcomes, "latency_ms": 5, "usage": USAGE},
    }


async def test_200_mixed_jobs_reach_expected_outcomes(stack: Stack) -> None:
    tenant = f"mixed-{uuid.uuid4().hex[:8]}"
    names = list(SCENARIOS)
    jobs = [(f"r{i}", names[i % len(names)]) for i in range(200)]
    await produce(
        stack.bootstrap,
        stack.topic("cp.intake"),
        [to_json(request(tenant, rid, SCENARIOS[name][0])) for rid, name in jobs],
    )
    expected = {rid: SCENARIOS[name] for rid, name in jobs}
    async with TopicReader(stack.bootstrap, stack.topic("cp.responses")) as reader:
        await reader.until(
            lambda _: len({v["request_id"] for v in _mine(reader, tenant)}) == len(jobs),
            timeout=120,
            what="a final response for each of 200 jobs",
        )
        finals = {v["request_id"]: v for v in _mine(reader, tenant)}
    outcomes: Counter[str] = Counter()
    scenario_of = dict(jobs)
    for rid, (_, state, attempts, provider) in expected.items():
        final = finals[rid]
        outcomes[final["state"]] += 1
        assert (final["state"], final["attempts"], final["provider"]) == (
            state,
            attempts,
            provider,
        ), (
            rid,
            final,
        )
        if state == "COMPLETED":
            assert final["error"] is None
            assert Decimal(final["cost"]["total"]["amount"]) == price(provider)
            assert final["cost"]["total"]["currency"] == "USD"
            # A hung attempt's cost is unknown (the provider may have billed it): a lower bound.
            hung = scenario_of[rid] == "hang_timeout_fallback"
            assert final["cost"]["total"]["estimated"] is hung
            assert final["usage"]["input_tokens"] == 100
            assert final["outcome"]["reason"] == "completed"
        else:
            assert final["error"]["code"] == "provider_internal"
            # Every failed attempt is listed, each billed nothing, and the total says so.
            assert Decimal(final["cost"]["total"]["amount"]) == 0
            assert [Decimal(a["cost"]["amount"]) for a in final["cost"]["attempts"]] == [0] * 4
            outcome = final["outcome"]
            assert outcome["reason"] == "attempt_budget_exhausted"
            assert (outcome["attempts_used"], outcome["attempts_allowed"]) == (4, 4)
            assert [t["provider"] for t in outcome["untried_targets"]] == ["sim-smart"]
    assert outcomes["COMPLETED"] + outcomes["FAILED"] == 200


def _mine(reader: TopicReader, tenant: str) -> list[dict[str, Any]]:
    return [v for v in reader.values() if v.get("tenant_id") == tenant]
