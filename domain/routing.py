"""Pure routing: pick a (provider, model) target for a job and plan the fallbacks.

Every (provider, model) of the catalogue is a candidate. Hard constraints exclude candidates, each
with a machine `reason_code` and a human `reason` (the first failing check wins, in the order of
`ReasonCode`). The eligible ones are scored in 0..1 per component:

* cost: `cheapest / cost` over the candidates priced in the reference currency (the currency of
  `max_cost` when given, else the most common one among eligible priced candidates, ties by name);
  the cheapest scores 1, one twice as expensive 0.5. A zero cost scores 1 (and makes every priced
  non-zero cost score 0). Unknown price or another currency scores 0.
* latency: `fastest / latency` the same way, over expected latency (the provider's observed EWMA
  when it has samples, else the model's `expected_latency_ms`).
* reliability: `(1 - EWMA error rate)`, halved for a half-open circuit, divided by the best such
  value among the candidates (all 0 when the best is 0).

The score is the weighted mean `(wc*cost + wl*latency + wr*reliability) / (wc + wl + wr)` with the
weights of the request's preference, rounded to 6 decimals; candidates are ranked by score
descending, then by (provider, model) name. `chosen` is the best; `fallback_plan` lists the best
model of each *other* provider in rank order (so every fallback really changes provider), cut so
that 1 + len(plan) <= retry.max_attempts_per_job.

Capabilities: a target must have every capability the request needs, those it names in
`constraints.capabilities` and those its content implies (`domain.requirements`: tools, image
parts, a JSON response format); the exclusion reason names what is missing and why it is needed.
The decision records them as `required_capabilities`.

Pins: a request's `model` ("<provider>/<model>", or "<model>" for every provider serving it, or an
ordered list of these) limits the candidates to the targets it names; every other catalogue target
is excluded as `not_pinned`, and a pin no catalogue target answers to is listed as
`not_in_catalogue` (provider "*" when the pin names no provider). Pinned targets still go through
every hard constraint. The order is the pin's: `chosen` is the first eligible target of the first
pin entry that has one, the plan the following eligible pinned targets (same provider or not),
targets of one entry in score order; the decision records the pin as `pin`.

Replay: `route` reads a request only through `RoutingInputs` (`route_inputs` routes those), and the
decision records all of them (with the request's limits as `constraints` and the providers without
credentials as `unavailable`), so `domain.replay` can route a recorded decision again under another
catalogue or policy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from datetime import datetime
from decimal import Decimal, localcontext
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict

from domain.catalogue import Catalogue, ModelSpec, ProviderSpec, Unavailable
from domain.health import ProviderHealth, effective_circuit
from domain.messages import JobRequest, Preference
from domain.money import Money, TokenPrices
from domain.policy import RoutingPolicy
from domain.requirements import requirement_sources
from domain.usage import estimate_tokens

#: Reliability multiplier of a half-open provider: allowed as a probe but ranked lower.
HALF_OPEN_FACTOR = 0.5
_MTOK = Decimal(1_000_000)

ReasonCode = Literal[
    "disabled",
    "missing_credentials",
    "excluded",
    "not_pinned",
    "provider_not_allowed",
    "provider_denied",
    "capability_missing",
    "output_limit",
    "context_window",
    "circuit_open",
    "price_unknown",
    "currency_mismatch",
    "over_budget",
    "too_slow",
    # Not a check on a catalogue target: a pinned target the catalogue does not have.
    "not_in_catalogue",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Target(_Frozen):
    """One (provider, model) an attempt can be sent to."""

    provider: str
    model: str


class ScoreBreakdown(_Frozen):
    """Normalized components (each 0..1) and their weighted mean."""

    cost: float
    latency: float
    reliability: float
    weighted: float


class ScoredCandidate(_Frozen):
    """An eligible target with its score and the estimates behind it."""

    provider: str
    model: str
    score: float
    breakdown: ScoreBreakdown
    estimated_cost: Money | None
    expected_latency_ms: int


class ExcludedCandidate(_Frozen):
    """A target ruled out by a hard constraint, with why."""

    provider: str
    model: str
    reason_code: ReasonCode
    reason: str


class RecordedConstraints(_Frozen):
    """The request's limits routing applied, recorded in the decision so it can be replayed."""

    max_output_tokens: int | None = None
    max_cost: Money | None = None
    max_latency_ms: int | None = None
    allow: list[str] | None = None
    deny: list[str] = []


class RoutingInputs(_Frozen):
    """Everything of a request that routing reads: `route` is `route_inputs` of these.

    A decision records them (`domain.replay.recorded_inputs`), so a replay can route the same
    request again under another catalogue or policy without the request itself.
    """

    preference: Preference
    prompt_tokens_estimate: int
    constraints: RecordedConstraints
    #: Each capability needed, with what in the request needs it (domain.requirements).
    needs: dict[str, list[str]]
    pins: list[str]

    @classmethod
    def of(cls, request: JobRequest) -> RoutingInputs:
        """Take the routing inputs of a request."""
        c = request.constraints
        return cls(
            preference=request.preference,
            prompt_tokens_estimate=estimate_tokens(request.prompt_text()),
            constraints=RecordedConstraints(
                max_output_tokens=request.max_output_tokens,
                max_cost=c.max_cost,
                max_latency_ms=c.max_latency_ms,
                allow=None if c.providers.allow is None else list(c.providers.allow),
                deny=list(c.providers.deny),
            ),
            needs=requirement_sources(request),
            pins=request.pins(),
        )


class RoutingDecision(_Frozen):
    """The full, replayable outcome of routing one job; `chosen` is None when nothing fits."""

    policy_version: str
    catalogue_version: str
    preference: Preference
    prompt_tokens_estimate: int
    candidates: list[ScoredCandidate]
    excluded: list[ExcludedCandidate]
    health: dict[str, ProviderHealth]
    chosen: Target | None
    fallback_plan: list[Target]
    #: The request's model pin as a list (None when it pins nothing).
    pin: list[str] | None = None
    #: Every capability a target had to have (domain.requirements), sorted.
    required_capabilities: list[str] = []
    #: The request's limits (None in decisions recorded before they were: see domain.replay).
    constraints: RecordedConstraints | None = None
    #: Providers this process could not route to, with why (None when not recorded).
    unavailable: dict[str, str] | None = None
    #: Time of the newest attempt outcome folded into `health` (the cluster's health topic), and
    #: how old it was when routing ran: a large age on a busy system means the fold lagged.
    #: None when nothing had been observed (or in decisions recorded before they were).
    health_as_of: AwareDatetime | None = None
    health_age_ms: int | None = None

    def targets(self) -> list[Target]:
        """Return the chosen target followed by the fallback plan."""
        return ([] if self.chosen is None else [self.chosen]) + list(self.fallback_plan)


class _Eligible(_Frozen):
    provider: str
    model: str
    cost: Money | None
    latency_ms: int
    reliability: float


def estimate_cost(prices: TokenPrices, *, prompt_tokens: int, max_output_tokens: int) -> Decimal:
    """Estimate the worst-case cost of one attempt: uncached input plus the full output budget."""
    with localcontext() as ctx:
        ctx.prec = 34
        total = prices.input_per_mtok * prompt_tokens + prices.output_per_mtok * max_output_tokens
        return total / _MTOK


def _expected_latency(model: ModelSpec, health: ProviderHealth | None) -> int:
    if health is not None and health.samples > 0 and health.latency_ewma_ms is not None:
        return round(health.latency_ewma_ms)
    return model.expected_latency_ms


def _check(
    inputs: RoutingInputs,
    provider: ProviderSpec,
    model: ModelSpec,
    *,
    prompt_tokens: int,
    policy: RoutingPolicy,
    health: ProviderHealth | None,
    now: datetime,
    exclude: frozenset[tuple[str, str]],
    unavailable: Unavailable | None = None,
) -> tuple[ReasonCode, str] | _Eligible:
    """Apply the hard constraints to one target: the first failing one, or the eligible values."""
    constraints = inputs.constraints
    pins = inputs.pins
    if not provider.enabled:
        return "disabled", f"provider {provider.name} is disabled in the catalogue"
    if unavailable is not None:
        return unavailable.reason_code, unavailable.reason
    if (provider.name, model.name) in exclude:
        return "excluded", "excluded by the caller (already tried or failed)"
    if pins and not any(_pinned(pin, provider.name, model.name) for pin in pins):
        return "not_pinned", f"not among the request's pinned targets: {', '.join(pins)}"
    allow = constraints.allow
    if allow is not None and provider.name not in allow:
        return "provider_not_allowed", f"provider {provider.name} is not in the allow list"
    if provider.name in constraints.deny:
        return "provider_denied", f"provider {provider.name} is in the deny list"
    needs = inputs.needs
    missing = model.supports(list(needs))
    if missing:
        return "capability_missing", "model lacks capabilities: " + ", ".join(
            f"{c} (needed by {' and '.join(needs[c])})" for c in missing
        )
    if (
        constraints.max_output_tokens is not None
        and constraints.max_output_tokens > model.max_output_tokens
    ):
        return "output_limit", (
            f"requested max_output_tokens {constraints.max_output_tokens} exceeds the model's "
            f"limit {model.max_output_tokens}"
        )
    max_output = _max_output(inputs, policy, model)
    if prompt_tokens + max_output > model.context_window:
        return "context_window", (
            f"estimated prompt {prompt_tokens} + max output {max_output} tokens exceed "
            f"the context window {model.context_window}"
        )
    if health is not None and effective_circuit(health, now, policy.circuit) == "open":
        return "circuit_open", f"circuit of provider {provider.name} is open"

    cost: Money | None = None
    if model.prices is not None:
        amount = estimate_cost(
            model.prices, prompt_tokens=prompt_tokens, max_output_tokens=max_output
        )
        cost = Money(amount=amount, currency=model.prices.currency)
    budget = constraints.max_cost
    if budget is not None:
        if cost is None:
            return "price_unknown", "max_cost is set but the model has no known price"
        if cost.currency != budget.currency:
            return "currency_mismatch", (
                f"model is priced in {cost.currency}, max_cost is in {budget.currency}"
            )
        if cost.amount > budget.amount:
            return "over_budget", (
                f"estimated cost {format(cost.amount, 'f')} {cost.currency} exceeds "
                f"max_cost {format(budget.amount, 'f')} {budget.currency}"
            )
    latency = _expected_latency(model, health)
    if constraints.max_latency_ms is not None and latency > constraints.max_latency_ms:
        return "too_slow", (
            f"expected latency {latency} ms exceeds max_latency_ms {constraints.max_latency_ms}"
        )
    rel = 1.0 if health is None else 1.0 - health.error_rate
    if health is not None and effective_circuit(health, now, policy.circuit) == "half_open":
        rel *= HALF_OPEN_FACTOR
    return _Eligible(
        provider=provider.name, model=model.name, cost=cost, latency_ms=latency, reliability=rel
    )


def _max_output(inputs: RoutingInputs, policy: RoutingPolicy, model: ModelSpec) -> int:
    """Return the output budget of an attempt: the request's, else the policy default capped."""
    if inputs.constraints.max_output_tokens is not None:
        return inputs.constraints.max_output_tokens
    return min(policy.default_max_output_tokens, model.max_output_tokens)


def _ratio(best: float, value: float) -> float:
    """Normalize a lower-is-better value to 0..1 as best / value (1 for the best)."""
    if value <= 0:
        return 1.0
    return best / value


def _reference_currency(inputs: RoutingInputs, eligible: list[_Eligible]) -> str | None:
    if inputs.constraints.max_cost is not None:
        return inputs.constraints.max_cost.currency
    counts = Counter(e.cost.currency for e in eligible if e.cost is not None)
    if not counts:
        return None
    return min(counts, key=lambda c: (-counts[c], c))


def _score(
    inputs: RoutingInputs, policy: RoutingPolicy, eligible: list[_Eligible]
) -> list[ScoredCandidate]:
    currency = _reference_currency(inputs, eligible)
    comparable = [
        e.cost.amount for e in eligible if e.cost is not None and e.cost.currency == currency
    ]
    cheapest = min(comparable) if comparable else None
    fastest = float(min((e.latency_ms for e in eligible), default=0))
    most_reliable = max((e.reliability for e in eligible), default=0.0)
    weights = policy.weights_for(inputs.preference)
    scored = []
    for e in eligible:
        if e.cost is None or e.cost.currency != currency or cheapest is None:
            cost_score = 0.0
        elif e.cost.amount <= 0:
            cost_score = 1.0
        else:
            with localcontext() as ctx:
                ctx.prec = 34
                cost_score = float(cheapest / e.cost.amount)
        latency_score = _ratio(fastest, float(e.latency_ms))
        rel_score = 0.0 if most_reliable <= 0 else e.reliability / most_reliable
        weighted = (
            weights.cost * cost_score
            + weights.latency * latency_score
            + weights.reliability * rel_score
        ) / weights.total()
        breakdown = ScoreBreakdown(
            cost=round(cost_score, 6),
            latency=round(latency_score, 6),
            reliability=round(rel_score, 6),
            weighted=round(weighted, 6),
        )
        scored.append(
            ScoredCandidate(
                provider=e.provider,
                model=e.model,
                score=breakdown.weighted,
                breakdown=breakdown,
                estimated_cost=e.cost,
                expected_latency_ms=e.latency_ms,
            )
        )
    scored.sort(key=lambda c: (-c.score, c.provider, c.model))
    return scored


def _pinned(pin: str, provider: str, model: str) -> bool:
    """Tell whether a pin names a target: "<provider>/<model>", or the model's own name."""
    return pin in (model, f"{provider}/{model}")


def _unknown_pins(pins: list[str], catalogue: Catalogue) -> list[ExcludedCandidate]:
    """The pins no catalogue target answers to, as excluded candidates."""
    targets = [(p.name, m.name) for p, m in catalogue.targets()]
    unknown = []
    for pin in pins:
        if any(_pinned(pin, p, m) for p, m in targets):
            continue
        provider, slash, model = pin.partition("/")
        if slash and catalogue.provider(provider) is not None:
            reason = f"provider {provider} has no model {model} in the catalogue"
        else:
            provider, model = "*", pin
            reason = f"no provider in the catalogue serves a model {pin}"
        unknown.append(
            ExcludedCandidate(
                provider=provider, model=model, reason_code="not_in_catalogue", reason=reason
            )
        )
    return unknown


def _pinned_plan(
    ranked: list[ScoredCandidate], pins: list[str], max_attempts: int
) -> tuple[Target | None, list[Target]]:
    """Order the eligible targets by pin entry (by score within one), within the attempt budget."""
    order: list[Target] = []
    for pin in pins:
        for c in ranked:
            target = Target(provider=c.provider, model=c.model)
            if _pinned(pin, c.provider, c.model) and target not in order:
                order.append(target)
    order = order[:max_attempts]
    return (order[0], order[1:]) if order else (None, [])


def _plan(ranked: list[ScoredCandidate], max_attempts: int) -> tuple[Target | None, list[Target]]:
    """Pick the best target and the best model of each other provider, within the attempt budget."""
    if not ranked:
        return None, []
    chosen = Target(provider=ranked[0].provider, model=ranked[0].model)
    used = {chosen.provider}
    plan: list[Target] = []
    for c in ranked[1:]:
        if len(plan) + 1 >= max_attempts:
            break
        if c.provider in used:
            continue
        used.add(c.provider)
        plan.append(Target(provider=c.provider, model=c.model))
    return chosen, plan


def route(
    request: JobRequest,
    *,
    catalogue: Catalogue,
    policy: RoutingPolicy,
    health: Mapping[str, ProviderHealth],
    now: datetime,
    exclude: Collection[tuple[str, str]] = (),
    unavailable: Mapping[str, Unavailable] | None = None,
    health_as_of: datetime | None = None,
) -> RoutingDecision:
    """Decide where a job goes and where it falls back to; same inputs give the same decision."""
    return route_inputs(
        RoutingInputs.of(request),
        catalogue=catalogue,
        policy=policy,
        health=health,
        now=now,
        exclude=exclude,
        unavailable=unavailable,
        health_as_of=health_as_of,
    )


def route_inputs(
    inputs: RoutingInputs,
    *,
    catalogue: Catalogue,
    policy: RoutingPolicy,
    health: Mapping[str, ProviderHealth],
    now: datetime,
    exclude: Collection[tuple[str, str]] = (),
    unavailable: Mapping[str, Unavailable] | None = None,
    health_as_of: datetime | None = None,
) -> RoutingDecision:
    """`route` on a request's recorded routing inputs (what `domain.replay` re-runs).

    `health_as_of` is the time of the newest outcome folded into `health`; the decision records
    it and the snapshot's age at `now`.
    """
    if now.tzinfo is None:
        raise ValueError("route needs an aware datetime")
    prompt_tokens = inputs.prompt_tokens_estimate
    excluded_set = frozenset((str(p), str(m)) for p, m in exclude)
    needs = inputs.needs
    pins = inputs.pins
    eligible: list[_Eligible] = []
    excluded: list[ExcludedCandidate] = []
    for provider, model in catalogue.targets():
        verdict = _check(
            inputs,
            provider,
            model,
            prompt_tokens=prompt_tokens,
            policy=policy,
            health=health.get(provider.name),
            now=now,
            exclude=excluded_set,
            unavailable=(unavailable or {}).get(provider.name),
        )
        if isinstance(verdict, _Eligible):
            eligible.append(verdict)
        else:
            code, reason = verdict
            excluded.append(
                ExcludedCandidate(
                    provider=provider.name, model=model.name, reason_code=code, reason=reason
                )
            )
    excluded.extend(_unknown_pins(pins, catalogue))
    ranked = _score(inputs, policy, eligible)
    if pins:
        chosen, plan = _pinned_plan(ranked, pins, policy.retry.max_attempts_per_job)
    else:
        chosen, plan = _plan(ranked, policy.retry.max_attempts_per_job)
    names = sorted(p.name for p in catalogue.providers)
    used_health = {name: health[name] for name in names if name in health}
    return RoutingDecision(
        policy_version=policy.version,
        catalogue_version=catalogue.version,
        preference=inputs.preference,
        prompt_tokens_estimate=prompt_tokens,
        candidates=ranked,
        excluded=excluded,
        health=used_health,
        chosen=chosen,
        fallback_plan=plan,
        pin=pins or None,
        required_capabilities=list(needs),
        constraints=inputs.constraints,
        unavailable={name: u.reason for name, u in sorted((unavailable or {}).items())},
        health_as_of=health_as_of,
        health_age_ms=(
            None
            if health_as_of is None
            else max(0, round((now - health_as_of).total_seconds() * 1000))
        ),
    )
