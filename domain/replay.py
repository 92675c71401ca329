"""Policy replay: route recorded decisions again under another catalogue or policy, and diff them.

Every `routed` event on `cp.events` carries the full `RoutingDecision`, which records what routing
read: the preference, the prompt size estimate, the required capabilities, the pin, the provider
health snapshot, the time (the event's `at`) and, since the decision recorded them, the request's
limits (`constraints`: max_output_tokens, max_cost, max_latency_ms, provider allow/deny) and the
providers that could not be routed to (`unavailable`). `replay` rebuilds those inputs, re-runs
`domain.routing.route_inputs` with the other catalogue and policy, and reports per decision the
old and the new choice with their estimated cost and expected latency, and in total how many
choices change, to what, and the cost and latency difference. Pure: no Kafka, no clock.

Decisions recorded before `constraints` existed cannot be replayed exactly: they are replayed as
if the request had no limits (no max_cost, max_latency_ms, max_output_tokens, allow or deny list),
and marked `exact: false` with what is missing. Their unavailable providers are inferred from the
`missing_credentials` exclusions. The capability reasons are not recorded (only the names), so the
exclusion texts of a replay may word the "needed by" part differently; choices are unaffected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, ValidationError

from domain.catalogue import Catalogue, Unavailable
from domain.messages import JobEvent
from domain.money import DecimalStr, Money
from domain.policy import RoutingPolicy
from domain.routing import (
    RecordedConstraints,
    RoutingDecision,
    RoutingInputs,
    Target,
    route_inputs,
)

#: What stands for a missing choice (nothing eligible) in a from→to pair.
NOTHING = "(none)"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ReplayedDecision(_Frozen):
    """One recorded decision next to its replay."""

    job_id: str
    tenant_id: str
    at: datetime
    old_policy_version: str
    old_catalogue_version: str
    old: Target | None
    new: Target | None
    changed: bool
    old_cost: Money | None
    new_cost: Money | None
    #: new - old (signed), when both are known in the same currency (`old_cost`'s).
    cost_delta: DecimalStr | None
    old_latency_ms: int | None
    new_latency_ms: int | None
    latency_delta_ms: int | None
    #: False when inputs the decision did not record were assumed (see `missing`).
    exact: bool
    missing: list[str]


class ReplayReport(_Frozen):
    """Every replayed decision and the totals."""

    policy_version: str
    catalogue_version: str
    decisions: list[ReplayedDecision]
    total: int
    changed: int
    inexact: int
    #: How many choices moved, by "old → new" (targets as provider/model).
    transitions: dict[str, int]
    #: Σ (new - old) estimated cost per currency, as a decimal string (may be negative).
    cost_delta: dict[str, str]
    mean_latency_delta_ms: float | None
    #: `routed` events whose decision could not be read.
    unreadable: int = 0


def label(target: Target | None) -> str:
    """A target as provider/model, or NOTHING."""
    return NOTHING if target is None else f"{target.provider}/{target.model}"


def recorded_inputs(
    decision: RoutingDecision,
) -> tuple[RoutingInputs, dict[str, Unavailable], list[str]]:
    """The routing inputs a decision recorded, the unavailable providers, and what is missing."""
    missing: list[str] = []
    constraints = decision.constraints
    if constraints is None:
        missing.append("constraints (max_cost, max_latency_ms, max_output_tokens, allow, deny)")
        constraints = RecordedConstraints()
    if decision.unavailable is not None:
        unavailable = {
            name: Unavailable("missing_credentials", reason)
            for name, reason in decision.unavailable.items()
        }
    else:
        missing.append("unavailable providers (inferred from missing_credentials exclusions)")
        unavailable = {
            e.provider: Unavailable("missing_credentials", e.reason)
            for e in decision.excluded
            if e.reason_code == "missing_credentials"
        }
    inputs = RoutingInputs(
        preference=decision.preference,
        prompt_tokens_estimate=decision.prompt_tokens_estimate,
        constraints=constraints,
        needs={c: ["the recorded request"] for c in decision.required_capabilities},
        pins=list(decision.pin or []),
    )
    return inputs, unavailable, missing


def _estimate(decision: RoutingDecision) -> tuple[Money | None, int | None]:
    chosen = decision.chosen
    if chosen is None:
        return None, None
    for c in decision.candidates:
        if (c.provider, c.model) == (chosen.provider, chosen.model):
            return c.estimated_cost, c.expected_latency_ms
    return None, None


def replay_decision(
    decision: RoutingDecision,
    *,
    job_id: str,
    tenant_id: str,
    at: datetime,
    catalogue: Catalogue,
    policy: RoutingPolicy,
) -> ReplayedDecision:
    """Route a recorded decision's inputs again under `catalogue` and `policy`, at its time."""
    inputs, unavailable, missing = recorded_inputs(decision)
    again = route_inputs(
        inputs,
        catalogue=catalogue,
        policy=policy,
        health=decision.health,
        now=at,
        unavailable=unavailable,
        health_as_of=decision.health_as_of,
    )
    old_cost, old_latency = _estimate(decision)
    new_cost, new_latency = _estimate(again)
    cost_delta = None
    if old_cost is not None and new_cost is not None and old_cost.currency == new_cost.currency:
        cost_delta = new_cost.amount - old_cost.amount
    latency_delta = (
        None if old_latency is None or new_latency is None else new_latency - old_latency
    )
    return ReplayedDecision(
        job_id=job_id,
        tenant_id=tenant_id,
        at=at,
        old_policy_version=decision.policy_version,
        old_catalogue_version=decision.catalogue_version,
        old=decision.chosen,
        new=again.chosen,
        changed=decision.chosen != again.chosen,
        old_cost=old_cost,
        new_cost=new_cost,
        cost_delta=cost_delta,
        old_latency_ms=old_latency,
        new_latency_ms=new_latency,
        latency_delta_ms=latency_delta,
        exact=not missing,
        missing=missing,
    )


def routed_decision(event: JobEvent) -> RoutingDecision | None:
    """The decision a `routed` event carries (None for other events); raises when unreadable."""
    if event.type != "routed" or "decision" not in event.data:
        return None
    return RoutingDecision.model_validate(event.data["decision"])


def replay(
    events: Iterable[JobEvent], *, catalogue: Catalogue, policy: RoutingPolicy
) -> ReplayReport:
    """Replay the decision of every `routed` event under `catalogue` and `policy`, in order."""
    replayed: list[ReplayedDecision] = []
    unreadable = 0
    for event in events:
        try:
            decision = routed_decision(event)
        except ValidationError:
            unreadable += 1
            continue
        if decision is None:
            continue
        replayed.append(
            replay_decision(
                decision,
                job_id=event.job_id,
                tenant_id=event.tenant_id,
                at=event.at,
                catalogue=catalogue,
                policy=policy,
            )
        )
    return summarize(replayed, catalogue=catalogue, policy=policy, unreadable=unreadable)


def summarize(
    replayed: list[ReplayedDecision],
    *,
    catalogue: Catalogue,
    policy: RoutingPolicy,
    unreadable: int = 0,
) -> ReplayReport:
    """Totals over replayed decisions."""
    transitions = Counter(
        f"{label(item.old)} → {label(item.new)}" for item in replayed if item.changed
    )
    costs: dict[str, Decimal] = {}
    for item in replayed:
        if item.cost_delta is not None and item.old_cost is not None:
            currency = item.old_cost.currency
            costs[currency] = costs.get(currency, Decimal(0)) + item.cost_delta
    latencies = [i.latency_delta_ms for i in replayed if i.latency_delta_ms is not None]
    return ReplayReport(
        policy_version=policy.version,
        catalogue_version=catalogue.version,
        decisions=replayed,
        total=len(replayed),
        changed=sum(1 for i in replayed if i.changed),
        inexact=sum(1 for i in replayed if not i.exact),
        transitions=dict(sorted(transitions.items(), key=lambda kv: (-kv[1], kv[0]))),
        cost_delta={c: format(v, "f") for c, v in sorted(costs.items())},
        mean_latency_delta_ms=(
            None if not latencies else round(sum(latencies) / len(latencies), 3)
        ),
        unreadable=unreadable,
    )
