"""Capabilities derived from a request, and routing by them and by a model pin."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from domain.catalogue import load_catalogue
from domain.commands import CreateJob
from domain.decide import Context, decide
from domain.lifecycle import JobStatus
from domain.messages import JobRequest
from domain.policy import load_policy
from domain.requirements import required_capabilities, requirement_sources
from domain.routing import RoutingDecision, Target, route

CONFIG = Path(__file__).resolve().parents[2] / "config"
CATALOGUE = load_catalogue(CONFIG / "catalogue.yaml")
POLICY = load_policy(CONFIG / "policy.yaml")
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.test/cat.png"}}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
#: The issue's example: tools + a JSON schema answer + an image.
TOOLS_JSON_IMAGE: dict[str, Any] = {
    "messages": [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, IMAGE]}],
    "tools": [TOOL],
    "tool_choice": "required",
    "response_format": JSON_SCHEMA,
}


def make(**fields: Any) -> JobRequest:
    return JobRequest.model_validate(
        {"request_id": "r-1", "messages": [{"role": "user", "content": "Hi"}], **fields}
    )


def routed(request: JobRequest) -> RoutingDecision:
    return route(request, catalogue=CATALOGUE, policy=POLICY, health={}, now=NOW)


def excluded(decision: RoutingDecision) -> dict[tuple[str, str], tuple[str, str]]:
    return {(e.provider, e.model): (e.reason_code, e.reason) for e in decision.excluded}


# -- derivation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "needs"),
    [
        ({}, set()),
        ({"tools": [TOOL]}, {"tools"}),
        ({"tools": [TOOL], "tool_choice": "none"}, {"tools"}),
        ({"messages": [{"role": "user", "content": [IMAGE]}]}, {"vision"}),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, set()),
        ({"response_format": {"type": "json_object"}}, {"json_mode"}),
        ({"response_format": JSON_SCHEMA}, {"json_mode"}),
        ({"response_format": {"type": "text"}}, set()),
        ({"constraints": {"capabilities": ["chat", "json_mode"]}}, {"chat", "json_mode"}),
        (
            {"messages": [{"role": "tool", "tool_call_id": "c", "content": "42"}]},
            {"tools"},
        ),
        ({"messages": [{"role": "tool", "content": "42"}]}, set()),  # legacy: plain text
        (TOOLS_JSON_IMAGE, {"tools", "vision", "json_mode"}),
    ],
)
def test_required_capabilities_come_from_the_request(
    fields: dict[str, Any], needs: set[str]
) -> None:
    assert required_capabilities(make(**fields)) == needs


def test_requirement_sources_say_why_each_is_needed() -> None:
    request = make(**TOOLS_JSON_IMAGE, constraints={"capabilities": ["vision"]})
    assert requirement_sources(request) == {
        "json_mode": ["response_format json_schema"],
        "tools": ["tools"],
        "vision": ["image content", "constraints.capabilities"],
    }


def test_derived_capabilities_are_names_the_catalogue_uses() -> None:
    known = {c for _, model in CATALOGUE.targets() for c in model.capabilities}
    assert required_capabilities(make(**TOOLS_JSON_IMAGE)) <= known


# -- routing by capability -----------------------------------------------------------------------


def test_tools_json_schema_and_image_route_only_to_capable_targets() -> None:
    decision = routed(make(**TOOLS_JSON_IMAGE))
    capable = {
        (p.name, m.name)
        for p, m in CATALOGUE.targets()
        if p.enabled and {"tools", "vision", "json_mode"} <= set(m.capabilities)
    }
    assert capable == {("sim-smart", "sage-pro-sim")}
    assert {(c.provider, c.model) for c in decision.candidates} == capable
    assert decision.chosen == Target(provider="sim-smart", model="sage-pro-sim")
    assert decision.required_capabilities == ["json_mode", "tools", "vision"]
    reasons = excluded(decision)
    assert reasons[("sim-fast", "swift-mini-sim")] == (
        "capability_missing",
        "model lacks capabilities: vision (needed by image content)",
    )
    assert reasons[("sim-smart", "sage-lite-sim")][0] == "capability_missing"
    code, reason = reasons[("sim-cheap", "thrift-nano-sim")]
    assert code == "capability_missing"
    assert "json_mode (needed by response_format json_schema)" in reason
    assert "tools (needed by tools)" in reason
    assert reasons[("anthropic", "claude-haiku-4-5")][0] == "disabled"


def test_a_capable_provider_switched_on_is_routed_to_and_an_incapable_one_is_not() -> None:
    enabled = CATALOGUE.model_copy(
        update={"providers": [p.model_copy(update={"enabled": True}) for p in CATALOGUE.providers]}
    )
    decision = route(make(**TOOLS_JSON_IMAGE), catalogue=enabled, policy=POLICY, health={}, now=NOW)
    assert {(c.provider, c.model) for c in decision.candidates} == {
        ("sim-smart", "sage-pro-sim"),
        ("openai", "gpt-4o-mini"),
    }
    code, reason = excluded(decision)[("anthropic", "claude-haiku-4-5")]
    assert (code, reason) == (
        "capability_missing",
        "model lacks capabilities: json_mode (needed by response_format json_schema)",
    )


def test_a_plain_request_records_no_requirement_and_no_pin() -> None:
    decision = routed(make())
    assert decision.required_capabilities == []
    assert decision.pin is None


def test_a_decision_stored_before_pins_still_reads() -> None:
    stored = routed(make()).model_dump(mode="json")
    del stored["pin"], stored["required_capabilities"]
    again = RoutingDecision.model_validate(stored)
    assert again.pin is None and again.required_capabilities == []


# -- routing by pin -------------------------------------------------------------------------------


def test_a_model_pin_keeps_only_that_model() -> None:
    decision = routed(make(model="sage-lite-sim"))
    assert decision.pin == ["sage-lite-sim"]
    assert decision.chosen == Target(provider="sim-smart", model="sage-lite-sim")
    assert decision.fallback_plan == []
    reasons = excluded(decision)
    assert reasons[("sim-fast", "swift-mini-sim")] == (
        "not_pinned",
        "not among the request's pinned targets: sage-lite-sim",
    )
    assert reasons[("openai", "gpt-4o-mini")][0] == "disabled"


def test_a_pin_list_is_tried_in_its_order_even_against_the_score() -> None:
    ranked = [(c.provider, c.model) for c in routed(make()).candidates]
    assert ranked.index(("sim-cheap", "thrift-nano-sim")) < ranked.index(
        ("sim-fast", "swift-mini-sim")
    )
    decision = routed(make(model=["sim-fast/swift-mini-sim", "sim-cheap/thrift-nano-sim"]))
    assert decision.targets() == [
        Target(provider="sim-fast", model="swift-mini-sim"),
        Target(provider="sim-cheap", model="thrift-nano-sim"),
    ]
    assert [(c.provider, c.model) for c in decision.candidates] == [
        ("sim-cheap", "thrift-nano-sim"),
        ("sim-fast", "swift-mini-sim"),
    ]


def test_pinned_fallbacks_may_stay_on_one_provider() -> None:
    decision = routed(model_pins := make(model=["sim-smart/sage-pro-sim", "sage-lite-sim"]))
    assert model_pins.pins() == ["sim-smart/sage-pro-sim", "sage-lite-sim"]
    assert decision.targets() == [
        Target(provider="sim-smart", model="sage-pro-sim"),
        Target(provider="sim-smart", model="sage-lite-sim"),
    ]


def test_pinned_targets_are_cut_to_the_attempt_budget() -> None:
    every = [f"{p.name}/{m.name}" for p, m in CATALOGUE.targets() if p.enabled]
    decision = routed(make(model=every))
    assert len(decision.targets()) == min(len(every), POLICY.retry.max_attempts_per_job)
    assert [f"{t.provider}/{t.model}" for t in decision.targets()] == every[
        : len(decision.targets())
    ]


def test_pins_outside_the_catalogue_are_excluded_with_a_reason() -> None:
    decision = routed(
        make(model=["sim-fast/no-such-model", "no-such-model", "acme/x", "sage-pro-sim"])
    )
    unknown = {
        (e.provider, e.model): e.reason
        for e in decision.excluded
        if e.reason_code == "not_in_catalogue"
    }
    assert unknown == {
        (
            "sim-fast",
            "no-such-model",
        ): "provider sim-fast has no model no-such-model in the catalogue",
        ("*", "no-such-model"): "no provider in the catalogue serves a model no-such-model",
        ("*", "acme/x"): "no provider in the catalogue serves a model acme/x",
    }
    assert decision.chosen == Target(provider="sim-smart", model="sage-pro-sim")


def test_a_pinned_target_still_meets_the_constraints() -> None:
    decision = routed(
        make(model="sim-cheap/thrift-nano-sim", tools=[TOOL], constraints={"max_latency_ms": 5000})
    )
    assert decision.chosen is None
    assert excluded(decision)[("sim-cheap", "thrift-nano-sim")][0] == "capability_missing"
    denied = routed(make(model="sage-pro-sim", constraints={"providers": {"deny": ["sim-smart"]}}))
    assert denied.chosen is None
    assert excluded(denied)[("sim-smart", "sage-pro-sim")][0] == "provider_denied"
    disabled = routed(make(model="openai/gpt-4o-mini"))
    assert disabled.chosen is None
    assert excluded(disabled)[("openai", "gpt-4o-mini")][0] == "disabled"


def test_a_pin_with_no_eligible_target_fails_the_job_no_eligible_target() -> None:
    request = make(model=["thrift-nano-sim", "nowhere"], tools=[TOOL])
    create = CreateJob(
        command_id="c-1",
        job_id="job-1",
        at=NOW,
        tenant_id="t",
        fingerprint=request.fingerprint(),
        request=request,
    )
    job = decide(None, create, Context(catalogue=CATALOGUE, policy=POLICY)).job
    assert job is not None and job.status is JobStatus.FAILED
    assert job.final is not None and job.final.error is not None
    assert job.final.error.code == "no_eligible_target"
    assert "not_pinned" in job.final.error.message
    assert "not_in_catalogue" in job.final.error.message
    (decision,) = job.decisions
    assert decision.pin == ["thrift-nano-sim", "nowhere"]
    assert decision.required_capabilities == ["tools"]
