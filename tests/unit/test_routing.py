"""Routing: hard constraints, scoring by preference, fallback plans and determinism."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.catalogue import Catalogue, load_catalogue
from domain.health import ProviderHealth
from domain.messages import JobRequest, Preference
from domain.money import TokenPrices
from domain.policy import RoutingPolicy, load_policy
from domain.routing import RoutingDecision, Target, estimate_cost, route

CONFIG = Path(__file__).resolve().parents[2] / "config"
CATALOGUE = load_catalogue(CONFIG / "catalogue.yaml")
POLICY = load_policy(CONFIG / "policy.yaml")
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
PREFERENCES: list[Preference] = ["balanced", "cost", "latency", "reliability"]


def _request(text: str = "Say hello.", **fields: Any) -> JobRequest:
    return JobRequest.model_validate(
        {"request_id": "r-1", "messages": [{"role": "user", "content": text}], **fields}
    )


def _route(
    request: JobRequest,
    *,
    catalogue: Catalogue = CATALOGUE,
    policy: RoutingPolicy = POLICY,
    health: dict[str, ProviderHealth] | None = None,
    exclude: tuple[tuple[str, str], ...] = (),
) -> RoutingDecision:
    return route(
        request,
        catalogue=catalogue,
        policy=policy,
        health=health or {},
        now=NOW,
        exclude=exclude,
    )


def _reasons(decision: RoutingDecision) -> dict[tuple[str, str], str]:
    return {(e.provider, e.model): e.reason_code for e in decision.excluded}


def _eligible(decision: RoutingDecision) -> set[tuple[str, str]]:
    return {(c.provider, c.model) for c in decision.candidates}


def _open(provider: str, *, opened_at: datetime = NOW, error_rate: float = 0.9) -> ProviderHealth:
    return ProviderHealth(
        provider=provider,
        latency_ewma_ms=500.0,
        error_rate=error_rate,
        samples=20,
        samples_since_close=20,
        consecutive_failures=5,
        circuit="open",
        opened_at=opened_at,
        updated_at=opened_at,
    )


# --- shipped configuration ----------------------------------------------------------------------


def test_plain_request_has_at_least_two_eligible_targets() -> None:
    decision = _route(_request())
    assert len(decision.candidates) >= 2
    assert len({c.provider for c in decision.candidates}) >= 2
    assert decision.chosen is not None
    assert decision.fallback_plan
    assert decision.policy_version == "2026-12-03.1"
    assert decision.catalogue_version == "2026-11-26.1"
    assert decision.prompt_tokens_estimate == 3


def test_disabled_providers_are_excluded_with_reason() -> None:
    reasons = _reasons(_route(_request()))
    assert reasons[("openai", "gpt-4o-mini")] == "disabled"
    assert reasons[("anthropic", "claude-haiku-4-5")] == "disabled"


def test_every_target_is_either_scored_or_excluded_once() -> None:
    decision = _route(_request())
    scored = [(c.provider, c.model) for c in decision.candidates]
    excluded = [(e.provider, e.model) for e in decision.excluded]
    everything = [(p.name, m.name) for p, m in CATALOGUE.targets()]
    assert sorted(scored + excluded) == sorted(everything)


def test_scores_are_normalized() -> None:
    decision = _route(_request())
    for c in decision.candidates:
        for value in (c.breakdown.cost, c.breakdown.latency, c.breakdown.reliability, c.score):
            assert 0.0 <= value <= 1.0
        assert c.score == c.breakdown.weighted
    assert max(c.breakdown.cost for c in decision.candidates) == 1.0
    assert max(c.breakdown.latency for c in decision.candidates) == 1.0


# --- preferences --------------------------------------------------------------------------------


def test_cost_preference_picks_the_cheapest() -> None:
    decision = _route(_request(preference="cost"))
    assert decision.chosen == Target(provider="sim-cheap", model="thrift-nano-sim")
    cheapest = min(
        decision.candidates,
        key=lambda c: c.estimated_cost.amount if c.estimated_cost else Decimal("Infinity"),
    )
    assert (cheapest.provider, cheapest.model) == ("sim-cheap", "thrift-nano-sim")


def test_latency_preference_picks_the_fastest() -> None:
    decision = _route(_request(preference="latency"))
    assert decision.chosen == Target(provider="sim-fast", model="swift-mini-sim")
    fastest = min(decision.candidates, key=lambda c: c.expected_latency_ms)
    assert decision.chosen == Target(provider=fastest.provider, model=fastest.model)


def test_reliability_preference_avoids_a_flaky_provider() -> None:
    flaky = ProviderHealth(provider="sim-cheap", latency_ewma_ms=600.0, error_rate=0.4, samples=30)
    assert _route(_request(preference="cost"), health={"sim-cheap": flaky}).chosen == Target(
        provider="sim-cheap", model="thrift-nano-sim"
    )
    decision = _route(_request(preference="reliability"), health={"sim-cheap": flaky})
    assert decision.chosen is not None
    assert decision.chosen.provider != "sim-cheap"


# --- hard constraints ---------------------------------------------------------------------------


def test_capability_missing_excludes() -> None:
    decision = _route(_request(constraints={"capabilities": ["vision"]}))
    assert decision.chosen == Target(provider="sim-smart", model="sage-pro-sim")
    reasons = _reasons(decision)
    assert reasons[("sim-fast", "swift-mini-sim")] == "capability_missing"
    assert reasons[("sim-cheap", "thrift-nano-sim")] == "capability_missing"
    detail = next(e for e in decision.excluded if e.provider == "sim-fast")
    assert "vision" in detail.reason


def test_context_window_excludes() -> None:
    long_prompt = "x" * (4 * 10_000)  # ~10k tokens: over sim-cheap's 8192 window
    decision = _route(_request(long_prompt))
    assert decision.prompt_tokens_estimate == 10_000
    assert _reasons(decision)[("sim-cheap", "thrift-nano-sim")] == "context_window"
    assert ("sim-fast", "swift-mini-sim") in _eligible(decision)


def test_requested_output_counts_against_the_context_window() -> None:
    decision = _route(_request("x" * 4 * 7000, max_output_tokens=2000))
    assert _reasons(decision)[("sim-cheap", "thrift-nano-sim")] == "context_window"
    assert ("sim-cheap", "thrift-nano-sim") in _eligible(_route(_request("x" * 4 * 7000)))


def test_output_limit_excludes() -> None:
    decision = _route(_request(max_output_tokens=3000))
    assert _reasons(decision)[("sim-cheap", "thrift-nano-sim")] == "output_limit"


def test_allow_list_excludes_the_rest() -> None:
    decision = _route(_request(constraints={"providers": {"allow": ["sim-smart"]}}))
    assert {c.provider for c in decision.candidates} == {"sim-smart"}
    assert _reasons(decision)[("sim-fast", "swift-mini-sim")] == "provider_not_allowed"
    assert decision.fallback_plan == []  # the plan only ever changes provider


def test_deny_list_excludes() -> None:
    decision = _route(_request(constraints={"providers": {"deny": ["sim-cheap"]}}))
    assert _reasons(decision)[("sim-cheap", "thrift-nano-sim")] == "provider_denied"
    assert decision.chosen is not None and decision.chosen.provider != "sim-cheap"


def test_max_cost_excludes_expensive_models() -> None:
    # prompt 3 tokens + 1024 output tokens: sage-pro ~0.0154 USD, sage-lite ~0.0041 USD.
    decision = _route(_request(constraints={"max_cost": {"amount": "0.005"}}))
    reasons = _reasons(decision)
    assert reasons[("sim-smart", "sage-pro-sim")] == "over_budget"
    assert ("sim-smart", "sage-lite-sim") in _eligible(decision)


def test_max_cost_in_another_currency_excludes() -> None:
    decision = _route(_request(constraints={"max_cost": {"amount": "10", "currency": "EUR"}}))
    assert decision.chosen is None
    assert {e.reason_code for e in decision.excluded} == {"disabled", "currency_mismatch"}


def test_max_cost_with_unknown_price_excludes() -> None:
    data = CATALOGUE.model_dump(mode="json")
    data["providers"][0]["models"][0]["prices"] = None
    unpriced = Catalogue.model_validate(data)
    target = (data["providers"][0]["name"], data["providers"][0]["models"][0]["name"])
    assert target == ("sim-fast", "swift-mini-sim")
    budget = _request(constraints={"max_cost": {"amount": "1"}})
    assert _reasons(_route(budget, catalogue=unpriced))[target] == "price_unknown"
    plain = _route(_request(), catalogue=unpriced)
    scored = next(c for c in plain.candidates if (c.provider, c.model) == target)
    assert scored.estimated_cost is None and scored.breakdown.cost == 0.0


def test_max_latency_uses_expected_latency() -> None:
    decision = _route(_request(constraints={"max_latency_ms": 650}))
    reasons = _reasons(decision)
    assert reasons[("sim-smart", "sage-pro-sim")] == "too_slow"
    assert reasons[("sim-smart", "sage-lite-sim")] == "too_slow"
    assert _eligible(decision) == {("sim-fast", "swift-mini-sim"), ("sim-cheap", "thrift-nano-sim")}


def test_max_latency_prefers_observed_latency() -> None:
    slow = ProviderHealth(provider="sim-fast", latency_ewma_ms=2000.0, samples=5)
    decision = _route(_request(constraints={"max_latency_ms": 650}), health={"sim-fast": slow})
    assert _reasons(decision)[("sim-fast", "swift-mini-sim")] == "too_slow"
    unsampled = ProviderHealth(provider="sim-fast", latency_ewma_ms=2000.0, samples=0)
    decision = _route(_request(constraints={"max_latency_ms": 650}), health={"sim-fast": unsampled})
    assert ("sim-fast", "swift-mini-sim") in _eligible(decision)


def test_open_circuit_excludes_and_half_open_is_penalized() -> None:
    health = {"sim-fast": _open("sim-fast", error_rate=0.0)}
    decision = _route(_request(preference="latency"), health=health)
    assert _reasons(decision)[("sim-fast", "swift-mini-sim")] == "circuit_open"
    assert decision.health == health

    cooled = {"sim-fast": _open("sim-fast", opened_at=NOW - timedelta(seconds=30), error_rate=0.0)}
    decision = _route(_request(preference="latency"), health=cooled)
    fast = next(c for c in decision.candidates if c.provider == "sim-fast")
    assert fast.breakdown.reliability == 0.5
    assert fast.breakdown.reliability < max(c.breakdown.reliability for c in decision.candidates)


def test_caller_exclusions_are_recorded() -> None:
    decision = _route(_request(), exclude=(("sim-cheap", "thrift-nano-sim"),))
    assert _reasons(decision)[("sim-cheap", "thrift-nano-sim")] == "excluded"
    assert decision.chosen != Target(provider="sim-cheap", model="thrift-nano-sim")


def test_nothing_eligible_gives_no_choice() -> None:
    decision = _route(_request(constraints={"capabilities": ["teleportation"]}))
    assert decision.chosen is None
    assert decision.fallback_plan == []
    assert decision.candidates == []
    assert decision.targets() == []


# --- the plan -----------------------------------------------------------------------------------


def test_plan_changes_provider_and_uses_its_best_model() -> None:
    decision = _route(_request(preference="cost"))
    providers = [t.provider for t in decision.targets()]
    assert len(providers) == len(set(providers))
    smart = [t for t in decision.fallback_plan if t.provider == "sim-smart"]
    assert smart == [Target(provider="sim-smart", model="sage-lite-sim")]


def test_plan_is_cut_to_the_attempt_budget() -> None:
    retry = POLICY.retry.model_copy(update={"max_attempts_per_job": 2})
    policy = POLICY.model_copy(update={"retry": retry})
    decision = _route(_request(), policy=policy)
    assert decision.chosen is not None
    assert len(decision.fallback_plan) == 1
    single = POLICY.model_copy(
        update={"retry": POLICY.retry.model_copy(update={"max_attempts_per_job": 1})}
    )
    assert _route(_request(), policy=single).fallback_plan == []


def test_ties_break_by_name() -> None:
    data = CATALOGUE.model_dump(mode="json")
    twin = dict(data["providers"][0])
    twin["name"] = "sim-aaa"
    data["providers"].append(twin)
    decision = _route(_request(preference="latency"), catalogue=Catalogue.model_validate(data))
    assert decision.chosen == Target(provider="sim-aaa", model="swift-mini-sim")
    assert decision.fallback_plan[0] == Target(provider="sim-fast", model="swift-mini-sim")


def test_estimate_cost_is_exact_decimal() -> None:
    prices = TokenPrices(input_per_mtok="3", output_per_mtok="15")
    cost = estimate_cost(prices, prompt_tokens=1000, max_output_tokens=100)
    assert cost == Decimal("0.0045")


def test_route_rejects_naive_now() -> None:
    with pytest.raises(ValueError, match="aware"):
        route(
            _request(),
            catalogue=CATALOGUE,
            policy=POLICY,
            health={},
            now=datetime(2026, 1, 1),
        )


def test_decision_round_trips_through_json() -> None:
    health = {"sim-fast": _open("sim-fast")}
    decision = _route(_request(constraints={"max_cost": {"amount": "1"}}), health=health)
    assert RoutingDecision.model_validate_json(decision.model_dump_json()) == decision


def test_health_snapshot_holds_only_catalogue_providers() -> None:
    health = {
        "zzz-unknown": ProviderHealth(provider="zzz-unknown"),
        "sim-fast": ProviderHealth(provider="sim-fast", samples=1, latency_ewma_ms=100.0),
    }
    decision = _route(_request(), health=health)
    assert list(decision.health) == ["sim-fast"]


# --- properties ---------------------------------------------------------------------------------

PROVIDERS = sorted(p.name for p in CATALOGUE.providers)
TARGETS = [(p.name, m.name) for p, m in CATALOGUE.targets()]
CAPABILITIES = ["chat", "json_mode", "tools", "vision"]


@st.composite
def requests(draw: st.DrawFn) -> JobRequest:
    constraints: dict[str, Any] = {
        "capabilities": draw(st.lists(st.sampled_from(CAPABILITIES), unique=True, max_size=2)),
        "providers": {
            "deny": draw(st.lists(st.sampled_from(PROVIDERS), unique=True, max_size=2)),
            "allow": draw(
                st.none() | st.lists(st.sampled_from(PROVIDERS), unique=True, max_size=4)
            ),
        },
    }
    if draw(st.booleans()):
        amount = draw(st.decimals(min_value=0, max_value=1, places=4))
        constraints["max_cost"] = {
            "amount": str(amount),
            "currency": draw(st.sampled_from(["USD", "USD", "EUR"])),
        }
    if draw(st.booleans()):
        constraints["max_latency_ms"] = draw(st.integers(1, 3000))
    return _request(
        "x" * draw(st.integers(1, 60_000)),
        preference=draw(st.sampled_from(PREFERENCES)),
        max_output_tokens=draw(st.none() | st.integers(1, 20_000)),
        constraints=constraints,
    )


@st.composite
def health_entries(draw: st.DrawFn, provider: str) -> ProviderHealth:
    circuit = draw(st.sampled_from(["closed", "open", "half_open"]))
    opened_at = None
    if circuit == "open":
        opened_at = NOW - timedelta(milliseconds=draw(st.integers(0, 120_000)))
    samples = draw(st.integers(0, 100))
    return ProviderHealth(
        provider=provider,
        latency_ewma_ms=draw(st.none() | st.floats(0, 5000)),
        error_rate=draw(st.floats(0, 1)),
        samples=samples,
        samples_since_close=samples,
        consecutive_failures=draw(st.integers(0, 10)),
        circuit=circuit,
        opened_at=opened_at,
        updated_at=NOW,
    )


@st.composite
def snapshots(draw: st.DrawFn) -> dict[str, ProviderHealth]:
    chosen = draw(st.lists(st.sampled_from(PROVIDERS), unique=True))
    return {name: draw(health_entries(name)) for name in chosen}


@settings(max_examples=150, deadline=None)
@given(
    request=requests(),
    health=snapshots(),
    exclude=st.lists(st.sampled_from(TARGETS), unique=True, max_size=3),
    max_attempts=st.integers(1, 6),
)
def test_plan_never_holds_an_excluded_target_nor_exceeds_attempts(
    request: JobRequest,
    health: dict[str, ProviderHealth],
    exclude: list[tuple[str, str]],
    max_attempts: int,
) -> None:
    retry = POLICY.retry.model_copy(
        update={"max_attempts_per_job": max_attempts, "max_attempts_per_provider": 1}
    )
    policy = POLICY.model_copy(update={"retry": retry})
    decision = _route(request, policy=policy, health=health, exclude=tuple(exclude))
    excluded = {(e.provider, e.model) for e in decision.excluded}
    eligible = _eligible(decision)
    targets = [(t.provider, t.model) for t in decision.targets()]
    assert not excluded & set(targets)
    assert not set(exclude) & set(targets)
    assert set(targets) <= eligible
    assert len(targets) <= max_attempts
    assert len({p for p, _ in targets}) == len(targets)
    assert (decision.chosen is None) == (not eligible)
    assert sorted(eligible | excluded) == sorted(TARGETS)
    assert not eligible & excluded
    if decision.chosen is not None:
        best = decision.candidates[0]
        assert decision.chosen == Target(provider=best.provider, model=best.model)
        eligible_providers = {p for p, _ in eligible}
        assert len(targets) == min(max_attempts, len(eligible_providers))


@settings(max_examples=100, deadline=None)
@given(request=requests(), health=snapshots(), data=st.data())
def test_routing_is_deterministic_and_order_independent(
    request: JobRequest, health: dict[str, ProviderHealth], data: st.DataObject
) -> None:
    first = _route(request, health=health)
    assert _route(request, health=health) == first
    providers = data.draw(st.permutations(CATALOGUE.providers))
    shuffled_providers = [
        p.model_copy(update={"models": data.draw(st.permutations(p.models))}) for p in providers
    ]
    shuffled = CATALOGUE.model_copy(update={"providers": shuffled_providers})
    reversed_health = dict(reversed(list(health.items())))
    again = _route(request, catalogue=shuffled, health=reversed_health)
    assert again == first
    assert again.model_dump_json() == first.model_dump_json()


def test_the_decision_records_the_health_snapshot_and_its_age() -> None:
    health = {"sim-cheap": _open("sim-cheap", opened_at=NOW - timedelta(seconds=2))}
    as_of = NOW - timedelta(milliseconds=1500)
    decision = route(
        _request(), catalogue=CATALOGUE, policy=POLICY, health=health, now=NOW, health_as_of=as_of
    )
    assert decision.health == health
    assert (decision.health_as_of, decision.health_age_ms) == (as_of, 1500)
    # A snapshot dated after the decision (clocks of two workers) has age 0, never negative.
    later = route(
        _request(),
        catalogue=CATALOGUE,
        policy=POLICY,
        health=health,
        now=NOW,
        health_as_of=NOW + timedelta(seconds=1),
    )
    assert later.health_age_ms == 0
    # Nothing observed yet: no age, and the decision reads back as recorded.
    fresh = _route(_request())
    assert (fresh.health_as_of, fresh.health_age_ms) == (None, None)
    assert RoutingDecision.model_validate_json(decision.model_dump_json()) == decision
