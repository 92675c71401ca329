"""Policy replay on recorded decisions: routed under one catalogue/policy, replayed under another
one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from domain.catalogue import Catalogue, Unavailable, load_catalogue
from domain.messages import JobEvent, JobRequest
from domain.policy import RoutingPolicy, Weights, load_policy
from domain.replay import recorded_inputs, replay
from domain.routing import RoutingDecision, Target, route, route_inputs

CONFIG = Path(__file__).resolve().parents[2] / "config"
CATALOGUE = load_catalogue(CONFIG / "catalogue.yaml")
POLICY = load_policy(CONFIG / "policy.yaml")
NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
CHEAP = Target(provider="sim-cheap", model="thrift-nano-sim")
FAST = Target(provider="sim-fast", model="swift-mini-sim")


def _request(preference: str = "cost", **fields: Any) -> JobRequest:
    return JobRequest.model_validate(
        {
            "request_id": "r-1",
            "messages": [{"role": "user", "content": "Say hello."}],
            "preference": preference,
            **fields,
        }
    )


def _routed_event(
    job_id: str,
    request: JobRequest,
    *,
    at: datetime = NOW,
    unavailable: dict[str, Unavailable] | None = None,
    strip: tuple[str, ...] = (),
) -> JobEvent:
    """A `routed` event as the control plane writes it to cp.events (through JSON)."""
    decision = route(
        request, catalogue=CATALOGUE, policy=POLICY, health={}, now=at, unavailable=unavailable
    )
    data = decision.model_dump(mode="json")
    for name in strip:  # a decision recorded before these fields existed
        del data[name]
    event = JobEvent(
        job_id=job_id,
        tenant_id="tenant-a",
        seq=2,
        type="routed",
        at=at,
        state="ROUTED",
        data={"reason": "initial", "chosen": data["chosen"], "decision": data},
    )
    return JobEvent.model_validate_json(orjson.dumps(event.model_dump(mode="json")))


def _latency_first_for_cost(policy: RoutingPolicy = POLICY) -> RoutingPolicy:
    weights = {**policy.weights, "cost": Weights(cost=0.1, latency=0.8, reliability=0.1)}
    return policy.model_copy(update={"version": "latency-first", "weights": weights})


def _without_cheap(catalogue: Catalogue = CATALOGUE) -> Catalogue:
    providers = [
        p.model_copy(update={"enabled": False}) if p.name == "sim-cheap" else p
        for p in catalogue.providers
    ]
    return catalogue.model_copy(update={"version": "no-cheap", "providers": providers})


def test_recorded_inputs_reproduce_the_decision_exactly() -> None:
    request = _request("latency", max_output_tokens=500, constraints={"providers": {"deny": ["x"]}})
    decision = route(request, catalogue=CATALOGUE, policy=POLICY, health={}, now=NOW)
    stored = RoutingDecision.model_validate_json(decision.model_dump_json())
    inputs, unavailable, missing = recorded_inputs(stored)
    assert missing == []
    again = route_inputs(
        inputs,
        catalogue=CATALOGUE,
        policy=POLICY,
        health=stored.health,
        now=NOW,
        unavailable=unavailable,
    )
    # Only the capability reasons' wording can differ; this request needs none.
    assert again == decision


def test_same_catalogue_and_policy_change_nothing() -> None:
    events = [_routed_event(f"j{i}", _request(p)) for i, p in enumerate(["cost", "latency"])]
    report = replay(events, catalogue=CATALOGUE, policy=POLICY)
    assert (report.total, report.changed, report.inexact) == (2, 0, 0)
    assert report.transitions == {}
    assert Decimal(report.cost_delta["USD"]) == 0
    assert report.mean_latency_delta_ms == 0


def test_other_policy_weights_move_cost_jobs_to_the_fast_provider() -> None:
    events = [
        _routed_event("j-cost-1", _request("cost")),
        _routed_event("j-cost-2", _request("cost"), at=NOW + timedelta(seconds=1)),
        _routed_event("j-latency", _request("latency")),
    ]
    report = replay(events, catalogue=CATALOGUE, policy=_latency_first_for_cost())
    assert report.policy_version == "latency-first"
    assert (report.total, report.changed) == (3, 2)
    assert report.transitions == {
        "sim-cheap/thrift-nano-sim → sim-fast/swift-mini-sim": 2,
    }
    by_job = {d.job_id: d for d in report.decisions}
    moved = by_job["j-cost-1"]
    assert (moved.old, moved.new, moved.changed, moved.exact) == (CHEAP, FAST, True, True)
    assert moved.old_cost is not None and moved.new_cost is not None
    assert moved.cost_delta == moved.new_cost.amount - moved.old_cost.amount > 0
    assert (moved.old_latency_ms, moved.new_latency_ms, moved.latency_delta_ms) == (600, 300, -300)
    assert by_job["j-latency"].changed is False
    assert by_job["j-latency"].cost_delta == 0
    assert Decimal(report.cost_delta["USD"]) == 2 * moved.cost_delta
    assert report.mean_latency_delta_ms == -200.0  # (-300 - 300 + 0) / 3


def test_a_catalogue_without_the_cheap_provider() -> None:
    events = [_routed_event(f"j{i}", _request(p)) for i, p in enumerate(["cost", "balanced"])]
    events.append(_routed_event("j-fast", _request("latency")))
    report = replay(events, catalogue=_without_cheap(), policy=POLICY)
    assert report.catalogue_version == "no-cheap"
    assert report.changed == 2
    assert report.transitions == {"sim-cheap/thrift-nano-sim → sim-fast/swift-mini-sim": 2}


def test_recorded_constraints_are_honoured() -> None:
    # Denying sim-fast, a latency job went to sim-cheap; the replay keeps the deny list.
    denied = _request("latency", constraints={"providers": {"deny": ["sim-fast"]}})
    report = replay([_routed_event("j", denied)], catalogue=CATALOGUE, policy=POLICY)
    assert report.decisions[0].old == CHEAP
    assert (report.changed, report.inexact) == (0, 0)


def test_older_decisions_without_constraints_are_replayed_inexactly() -> None:
    denied = _request("latency", constraints={"providers": {"deny": ["sim-fast"]}})
    old = _routed_event("j-old", denied, strip=("constraints", "unavailable"))
    report = replay([old], catalogue=CATALOGUE, policy=POLICY)
    item = report.decisions[0]
    assert (item.exact, report.inexact) == (False, 1)
    assert any("constraints" in m for m in item.missing)
    # The deny list was not recorded, so the replay sees an unconstrained request.
    assert (item.old, item.new) == (CHEAP, FAST)


def test_unavailable_providers_stay_unavailable() -> None:
    gone = {"sim-cheap": Unavailable("missing_credentials", "no key")}
    recorded = _routed_event("j1", _request("cost"), unavailable=gone)
    inferred = _routed_event("j2", _request("cost"), unavailable=gone, strip=("unavailable",))
    report = replay([recorded, inferred], catalogue=CATALOGUE, policy=POLICY)
    assert [d.old for d in report.decisions] == [FAST, FAST]
    assert report.changed == 0
    assert [d.exact for d in report.decisions] == [True, False]


def test_other_events_are_skipped_and_bad_decisions_counted() -> None:
    good = _routed_event("j1", _request("cost"))
    other = good.model_copy(update={"type": "dispatched", "seq": 3, "data": {}})
    broken = good.model_copy(update={"job_id": "j2", "data": {"decision": {"policy": 1}}})
    report = replay([good, other, broken], catalogue=CATALOGUE, policy=POLICY)
    assert (report.total, report.unreadable) == (1, 1)
    assert report.model_dump(mode="json")["decisions"][0]["job_id"] == "j1"
