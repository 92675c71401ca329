"""The job agent's one decision: `decide(job, command, context) -> Decision`.

Pure and deterministic: the time of every transition is the command's `at`, never the clock. A
repeated command changes nothing; an illegal or late command is recorded as a no-op, never raised.
Effects (dispatch, provider cancel, timeline events, final response) are outbox entries written in
the same new state as the transition; the agent publishes them and marks them published later.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from domain.catalogue import Catalogue, Unavailable
from domain.commands import (
    CancelJob,
    Command,
    CreateJob,
    MarkPublished,
    RecordResult,
    RecordWebhook,
    Tick,
)
from domain.errors import CanonicalError, ErrorCode, canonical_error
from domain.health import ProviderHealth, effective_circuit
from domain.ids import attempt_id_for, idempotency_key
from domain.job import MAX_IGNORED_EVENTS, SEEN_COMMANDS, Attempt, Job, OutboxEntry, OutboxTopic
from domain.lifecycle import AttemptStatus, JobStatus, can_transition
from domain.messages import (
    AttemptCost,
    ExcludedTarget,
    FinalResponse,
    JobCost,
    JobEvent,
    JobOutcome,
    OutcomeReason,
    Output,
    ProviderResult,
    UntriedTarget,
)
from domain.money import Cost
from domain.policy import RoutingPolicy
from domain.pricing import price_usage, total_cost
from domain.provider_errors import map_provider_error
from domain.routing import ExcludedCandidate, RoutingDecision, Target, route
from domain.usage import Usage, normalize_usage
from domain.webhooks import delivery_id

#: Webhook attempts recorded in a job's timeline before further failed ones are only counted.
MAX_WEBHOOK_EVENTS = 50


@dataclass(frozen=True, slots=True)
class Context:
    """What a decision may look at besides the job and the command."""

    catalogue: Catalogue
    policy: RoutingPolicy
    health: Mapping[str, ProviderHealth] = field(default_factory=dict)
    #: Enabled providers this process cannot route to (no API key), with why.
    unavailable: Mapping[str, Unavailable] = field(default_factory=dict)
    #: Time of the newest attempt outcome folded into `health` (None: nothing observed yet).
    health_as_of: datetime | None = None


@dataclass(frozen=True, slots=True)
class Observation:
    """An attempt outcome the agent folds into provider health."""

    provider: str
    ok: bool
    latency_ms: int | None
    at: datetime


@dataclass(frozen=True, slots=True)
class Decision:
    job: Job | None
    outcome: str
    publish: tuple[OutboxEntry, ...] = ()
    dead_letter: tuple[str, str] | None = None
    observations: tuple[Observation, ...] = ()

    @property
    def changed(self) -> bool:
        return self.outcome not in {"duplicate_command", "unknown_job", "noop"}


class _Illegal(Exception):
    """An attempted transition the table does not allow: the step becomes a recorded no-op."""


class _Step:
    """Accumulates one command's changes to a job; `freeze` yields the new state."""

    def __init__(self, job: Job, at: datetime, ctx: Context) -> None:
        # One private copy per step, changed in place by `update`: the caller's job stays as it
        # was (an illegal transition starts over from it) and no copy is made per change.
        self.job = job.model_copy()
        self.at = at
        self.ctx = ctx
        self.entries: list[OutboxEntry] = []
        self.observations: list[Observation] = []
        #: Plan targets passed over in this step (open circuit, no credentials), with why.
        self.skipped: list[UntriedTarget] = []

    # -- state ---------------------------------------------------------------------------------

    def update(self, **changes: Any) -> None:
        self.job.__dict__.update(changes)

    def transition(self, target: JobStatus) -> None:
        if not can_transition(self.job.status, target):
            raise _Illegal(f"{self.job.status} -> {target}")
        times = dict(self.job.status_times)
        times.setdefault(target.value, self.at)
        self.update(status=target, status_times=times, updated_at=self.at)

    def replace_attempt(self, attempt: Attempt) -> None:
        attempts = [attempt if a.attempt_id == attempt.attempt_id else a for a in self.job.attempts]
        self.update(attempts=attempts)

    # -- effects -------------------------------------------------------------------------------

    def outbox(self, entry_id: str, topic: OutboxTopic, **ref: Any) -> None:
        entry = OutboxEntry(entry_id=entry_id, topic=topic, created_at=self.at, **ref)
        self.entries.append(entry)
        self.update(outbox=[*self.job.outbox, entry])

    def event(self, kind: str, *, attempt_id: str | None = None, **data: Any) -> None:
        event = JobEvent(
            job_id=self.job.job_id,
            tenant_id=self.job.tenant_id,
            seq=self.job.seq + 1,
            type=kind,
            at=self.at,
            state=self.job.status.value,
            attempt_id=attempt_id,
            data=data,
        )
        self.update(events=[*self.job.events, event])
        self.outbox(f"e{event.seq}", "events", seq=event.seq)

    def ignored(self, kind: str, *, attempt_id: str | None = None, **data: Any) -> None:
        """Record a duplicate or late input in the timeline, up to a cap, then only count it."""
        if self.job.ignored_events < MAX_IGNORED_EVENTS:
            self.event(kind, attempt_id=attempt_id, **data)
        self.update(ignored_events=self.job.ignored_events + 1)

    # -- lifecycle steps -----------------------------------------------------------------------

    def routed(self, decision: RoutingDecision, reason: str) -> Target | None:
        self.update(decisions=[*self.job.decisions, decision], plan=list(decision.fallback_plan))
        self.transition(JobStatus.ROUTED)
        self.event(
            "routed",
            reason=reason,
            chosen=decision.chosen.model_dump() if decision.chosen else None,
            decision=decision.model_dump(mode="json"),
        )
        return decision.chosen

    def dispatch(self, target: Target, *, reason: str) -> None:
        policy = self.ctx.policy
        spec = self.ctx.catalogue.provider(target.provider)
        attempt_no = len(self.job.attempts) + 1
        attempt_id = attempt_id_for(self.job.job_id, attempt_no)
        on_provider = sum(1 for a in self.job.attempts if a.provider == target.provider) + 1
        timeout_ms, timeout_source = self.attempt_timeout(target)
        timeout = timedelta(milliseconds=timeout_ms)
        attempt = Attempt(
            attempt_id=attempt_id,
            attempt_no=attempt_no,
            provider=target.provider,
            model=target.model,
            provider_kind=spec.kind if spec else "unknown",
            provider_attempt_no=on_provider,
            status=AttemptStatus.DISPATCHED,
            dispatched_at=self.at,
            timeout_at=self.at + timeout,
            start_by=(
                self.at + timedelta(milliseconds=policy.start_timeout_ms)
                if policy.start_timeout_ms
                else None
            ),
            timeout_ms=timeout_ms,
        )
        self.update(attempts=[*self.job.attempts, attempt], retry_at=None, retry_target=None)
        self.transition(JobStatus.DISPATCHED)
        self.outbox(f"d-{attempt_id}", "dispatch", provider=target.provider, attempt_id=attempt_id)
        self.event(
            "dispatched",
            attempt_id=attempt_id,
            provider=target.provider,
            model=target.model,
            attempt_no=attempt_no,
            provider_attempt_no=on_provider,
            idempotency_key=idempotency_key(self.job.job_id, attempt_id),
            reason=reason,
            timeout_ms=timeout_ms,
            timeout_source=timeout_source,
        )

    def attempt_timeout(self, target: Target) -> tuple[int, str]:
        """How long `target` has to answer an attempt, and where that comes from.

        The request's `attempt_timeout_ms` wins, then the catalogue's model, then its provider,
        then the policy; the job's deadline caps it (source `deadline`): an answer after the
        deadline is of no use.
        """
        timeout_ms: int | None = self.job.request.attempt_timeout_ms
        source: str | None = "request"
        if timeout_ms is None:
            timeout_ms, source = self.ctx.catalogue.attempt_timeout_ms(
                target.provider, target.model
            )
        if timeout_ms is None or source is None:
            timeout_ms, source = self.ctx.policy.attempt_timeout_ms, "policy"
        deadline = self.job.deadline_at
        if deadline is not None:
            left = math.ceil((deadline - self.at).total_seconds() * 1000)
            if 0 < left < timeout_ms:
                return left, "deadline"
        return timeout_ms, source

    def cancel_live_attempt(self, reason: str) -> None:
        current = self.job.current
        if current is None or not current.status.live:
            return
        started = "running" if current.status is AttemptStatus.STARTED else "dispatched"
        cost = _unknown_cost(
            self.ctx,
            current,
            f"cancelled while {started}: the provider may have billed tokens never reported",
        )
        self.replace_attempt(
            current.model_copy(
                update={"status": AttemptStatus.CANCELLED, "finished_at": self.at, "cost": cost}
            )
        )
        self.tell_provider_to_drop(current, reason)

    def tell_provider_to_drop(self, attempt: Attempt, reason: str) -> None:
        self.outbox(
            f"c-{attempt.attempt_id}",
            "provider_cancel",
            provider=attempt.provider,
            attempt_id=attempt.attempt_id,
            reason=reason,
        )

    def finish(
        self,
        status: JobStatus,
        *,
        error: CanonicalError | None = None,
        reason: OutcomeReason,
        detail: str,
        cancelled_by: str | None = None,
        excluded: list[ExcludedCandidate] | None = None,
    ) -> None:
        self.transition(status)
        untried = [] if status is JobStatus.COMPLETED else self.untried(reason)
        self.update(retry_at=None, retry_target=None)
        outcome = JobOutcome(
            reason=reason,
            detail=detail,
            attempts_used=len(self.job.attempts),
            attempts_allowed=self.ctx.policy.retry.max_attempts_per_job,
            untried_targets=untried,
            excluded=[
                ExcludedTarget(
                    provider=e.provider, model=e.model, reason_code=e.reason_code, reason=e.reason
                )
                for e in excluded or ()
            ],
            cancelled_by=cancelled_by,
        )
        final = self.final_response(error, outcome)
        self.update(final=final)
        kind = {
            JobStatus.COMPLETED: "completed",
            JobStatus.FAILED: "failed",
            JobStatus.CANCELLED: "cancelled",
            JobStatus.EXPIRED: "expired",
        }[status]
        current = self.job.current
        data: dict[str, Any] = {"attempts": len(self.job.attempts), "reason": reason}
        if final.provider is not None:
            data.update(provider=final.provider, model=final.model)
        if error is not None:
            data["error"] = error.model_dump(mode="json")
        if final.cost.total is not None:
            data["cost"] = final.cost.total.model_dump(mode="json")
        data["outcome"] = outcome.model_dump(mode="json")
        self.event(kind, attempt_id=current.attempt_id if current else None, **data)
        self.outbox("r", "responses")
        if self.job.request.callback_url is not None:
            self.outbox("w", "webhook")

    def untried(self, reason: str) -> list[UntriedTarget]:
        """Targets of the plan no attempt went to: those passed over, then the rest of the plan."""
        seen = {(t.provider, t.model) for t in self.skipped}
        rest = [
            UntriedTarget(provider=t.provider, model=t.model, reason=reason)
            for t in self.job.plan
            if (t.provider, t.model) not in seen
        ]
        return [*self.skipped, *rest]

    def final_response(self, error: CanonicalError | None, outcome: JobOutcome) -> FinalResponse:
        job = self.job
        winner = next((a for a in job.attempts if a.status is AttemptStatus.COMPLETED), None)
        last = winner or job.current
        billed = [
            AttemptCost(
                attempt_id=a.attempt_id,
                provider=a.provider,
                model=a.model,
                cost=a.cost
                or Cost(amount=None, estimated=True, reason="no cost was recorded for it"),
                status=a.status.value,
            )
            for a in job.attempts
        ]
        total = (
            total_cost([b.cost for b in billed])
            if billed
            else Cost(
                amount=Decimal(0), estimated=False, reason="no attempt was made: nothing billed"
            )
        )
        return FinalResponse(
            job_id=job.job_id,
            request_id=job.request_id,
            tenant_id=job.tenant_id,
            state=job.status.value,
            output=winner.output if winner else None,
            provider=last.provider if last else None,
            model=last.model if last else None,
            usage=winner.usage if winner else None,
            cost=JobCost(total=total, attempts=billed),
            error=error,
            attempts=len(job.attempts),
            created_at=job.created_at,
            finished_at=self.at,
            metadata=job.request.metadata,
            outcome=outcome,
        )

    def after_failure(self, attempt: Attempt, error: CanonicalError) -> None:
        """Retry the same target, fall back to the next one, or fail the job."""
        retry = self.ctx.policy.retry
        action = self.ctx.policy.action_for(error.code)
        deadline = self.job.deadline_at
        last = f"{error.code.value} from {attempt.provider}/{attempt.model}"
        if deadline is not None and self.at >= deadline:
            message = f"deadline passed while {attempt.provider} failed with {error.code.value}"
            self.finish(
                JobStatus.EXPIRED,
                error=canonical_error(ErrorCode.DEADLINE_EXCEEDED, message),
                reason="deadline",
                detail=f"the job's deadline of {self.job.request.deadline_ms} ms passed; "
                f"last attempt: {last}",
            )
            return
        used = len(self.job.attempts)
        if used >= retry.max_attempts_per_job:
            self.finish(
                JobStatus.FAILED,
                error=error,
                reason="attempt_budget_exhausted",
                detail=f"all {used} of {retry.max_attempts_per_job} attempts the policy allows "
                f"a job were used; last: {last}",
            )
            return
        on_target = sum(1 for a in self.job.attempts if a.provider == attempt.provider)
        if action == "retry" and on_target < retry.max_attempts_per_provider:
            delay_ms = retry.backoff_ms(
                retry_no=on_target,
                seed=f"{self.job.job_id}:{attempt.attempt_id}",
                retry_after_s=error.retry_after_s,
            )
            retry_at = self.at + timedelta(milliseconds=delay_ms)
            self.transition(JobStatus.RETRYING)
            self.update(retry_at=retry_at, retry_target=attempt.target)
            self.event(
                "retried",
                attempt_id=attempt.attempt_id,
                provider=attempt.provider,
                model=attempt.model,
                delay_ms=delay_ms,
                retry_at=retry_at.isoformat(),
                reason=error.code.value,
            )
            return
        if action in ("retry", "fallback"):
            target, skipped = self.next_in_plan()
            if target is not None:
                self.transition(JobStatus.ROUTED)
                self.event(
                    "fallback",
                    attempt_id=attempt.attempt_id,
                    from_provider=attempt.provider,
                    from_model=attempt.model,
                    to_provider=target.provider,
                    to_model=target.model,
                    reason=error.code.value,
                    skipped=skipped,
                )
                self.dispatch(target, reason=f"fallback after {error.code.value}")
                return
            self.finish(
                JobStatus.FAILED,
                error=error,
                reason="targets_exhausted",
                detail=f"no target of the plan is left to try after {used} of "
                f"{retry.max_attempts_per_job} attempts (at most "
                f"{retry.max_attempts_per_provider} per provider); last: {last}",
            )
            return
        self.finish(
            JobStatus.FAILED,
            error=error,
            reason="non_retryable_error",
            detail=f"{last} is neither retried nor fallen back from (policy action: {action})",
        )

    def next_in_plan(self) -> tuple[Target | None, list[dict[str, str]]]:
        """Take the next fallback target whose circuit is not open and that can be routed to
        here (it has credentials); say which were skipped."""
        plan = list(self.job.plan)
        skipped: list[dict[str, str]] = []
        while plan:
            target = plan.pop(0)
            health = self.ctx.health.get(target.provider)
            circuit = (
                effective_circuit(health, self.at, self.ctx.policy.circuit) if health else "closed"
            )
            unavailable = self.ctx.unavailable.get(target.provider)
            why = "circuit_open" if circuit == "open" else unavailable and unavailable.reason_code
            if why:
                skipped.append({**target.model_dump(), "reason": why})
                self.skipped.append(
                    UntriedTarget(provider=target.provider, model=target.model, reason=why)
                )
                continue
            self.update(plan=plan)
            return target, skipped
        self.update(plan=[])
        return None, skipped


# -- command handlers -----------------------------------------------------------------------------


def decide(job: Job | None, command: Command, ctx: Context) -> Decision:
    """Apply one command to a job's state and say what must be published."""
    if job is not None and command.command_id in job.seen_commands:
        return Decision(job=job, outcome="duplicate_command", publish=tuple(job.outbox))
    if isinstance(command, CreateJob):
        return _create(job, command, ctx)
    if job is None and isinstance(command, Tick | MarkPublished | RecordWebhook):
        # A webhook attempt for a job retired meanwhile: nothing left to record it in.
        return Decision(job=None, outcome="noop")
    if (
        isinstance(command, CancelJob)
        and job is not None
        and command.tenant_id
        not in (
            None,
            job.tenant_id,
        )
    ):
        job = None  # another tenant's job is indistinguishable from a missing one
    if job is None:
        return Decision(
            job=None,
            outcome="unknown_job",
            dead_letter=("unknown_job", f"no job {command.job_id} for a {command.kind} command"),
        )
    if isinstance(command, MarkPublished):
        return _mark_published(job, command)
    step = _Step(job, command.at, ctx)
    try:
        if isinstance(command, RecordResult):
            outcome = _result(step, command.result)
        elif isinstance(command, Tick):
            outcome = _tick(step)
        elif isinstance(command, RecordWebhook):
            outcome = _webhook(step, command)
        else:
            outcome = _cancel(step, command)
    except _Illegal as exc:
        step = _Step(job, command.at, ctx)
        step.ignored("ignored", command=command.kind, reason=f"illegal transition {exc}")
        outcome = "noop"
    if not step.entries and outcome == "noop":
        return Decision(job=job, outcome="noop")
    if command.kind in ("result", "cancel", "webhook"):
        step.update(seen_commands=[*step.job.seen_commands, command.command_id][-SEEN_COMMANDS:])
    return Decision(
        job=step.job,
        outcome=outcome,
        publish=tuple(step.entries),
        observations=tuple(step.observations),
    )


def _create(job: Job | None, command: CreateJob, ctx: Context) -> Decision:
    if job is not None:
        step = _Step(job, command.at, ctx)
        if job.fingerprint != command.fingerprint:
            step.ignored("conflict", request_id=command.request.request_id, source=command.source)
            step.update(seen_commands=[*job.seen_commands, command.command_id][-SEEN_COMMANDS:])
            return Decision(
                job=step.job,
                outcome="conflict",
                publish=tuple(step.entries),
                dead_letter=(
                    "conflict",
                    f"request_id {command.request.request_id!r} of tenant {command.tenant_id!r} "
                    f"was already accepted as {job.job_id} with a different payload",
                ),
            )
        step.ignored("duplicate_ignored", input="request", source=command.source)
        step.update(seen_commands=[*job.seen_commands, command.command_id][-SEEN_COMMANDS:])
        return Decision(
            job=step.job, outcome="duplicate_request", publish=(*job.outbox, *step.entries)
        )
    request = command.request
    deadline = (
        command.at + timedelta(milliseconds=request.deadline_ms) if request.deadline_ms else None
    )
    step = _created(command, deadline, ctx)
    decision = route(
        request,
        catalogue=ctx.catalogue,
        policy=ctx.policy,
        health=ctx.health,
        now=command.at,
        unavailable=ctx.unavailable,
        health_as_of=ctx.health_as_of,
    )
    if decision.chosen is None:
        step.update(decisions=[decision])
        step.event(
            "routed", reason="initial", chosen=None, decision=decision.model_dump(mode="json")
        )
        reasons = sorted({e.reason_code for e in decision.excluded})
        message = "no provider and model satisfies the request's constraints" + (
            f" (excluded: {', '.join(reasons)})" if reasons else ""
        )
        step.finish(
            JobStatus.FAILED,
            error=canonical_error(ErrorCode.NO_ELIGIBLE_TARGET, message),
            reason="no_eligible_target",
            detail=f"{message}; every excluded target is listed with its reason",
            excluded=decision.excluded,
        )
        return Decision(job=step.job, outcome="failed", publish=tuple(step.entries))
    chosen = step.routed(decision, reason="initial")
    assert chosen is not None
    step.dispatch(chosen, reason="initial")
    return Decision(job=step.job, outcome="created", publish=tuple(step.entries))


def _created(command: CreateJob, deadline: datetime | None, ctx: Context) -> _Step:
    """A step on the new job of `command`, its `created` event recorded."""
    job = Job(
        job_id=command.job_id,
        tenant_id=command.tenant_id,
        request_id=command.request.request_id,
        fingerprint=command.fingerprint,
        request=command.request,
        trace=command.trace,
        status=JobStatus.CREATED,
        created_at=command.at,
        updated_at=command.at,
        deadline_at=deadline,
        status_times={JobStatus.CREATED.value: command.at},
        seen_commands=[command.command_id],
    )
    step = _Step(job, command.at, ctx)
    step.event("created", request_id=command.request.request_id, source=command.source)
    return step


def _mark_published(job: Job, command: MarkPublished) -> Decision:
    """Drop delivered entries; a live attempt's timeout counts from when its dispatch was sent."""
    done = set(command.entry_ids)
    remaining = [entry for entry in job.outbox if entry.entry_id not in done]
    if len(remaining) == len(job.outbox):
        return Decision(job=job, outcome="noop")
    sent = {e.attempt_id for e in job.outbox if e.entry_id in done and e.topic == "dispatch"}
    attempts = [
        a.model_copy(
            update={
                "published_at": command.at,
                "timeout_at": max(a.timeout_at, command.at + (a.timeout_at - a.dispatched_at)),
                "start_by": (
                    None
                    if a.start_by is None
                    else max(a.start_by, command.at + (a.start_by - a.dispatched_at))
                ),
            }
        )
        if a.attempt_id in sent and a.status.live and a.published_at is None
        else a
        for a in job.attempts
    ]
    return Decision(
        job=job.model_copy(update={"outbox": remaining, "attempts": attempts}),
        outcome="published",
    )


def _result(step: _Step, result: ProviderResult) -> str:
    job = step.job
    attempt = job.attempt(result.attempt_id)
    if attempt is None or attempt.provider != result.provider:
        step.ignored(
            "late_result",
            attempt_id=result.attempt_id,
            result=result.type,
            provider=result.provider,
            event_id=result.event_id,
            reason="unknown attempt" if attempt is None else "provider does not match the attempt",
        )
        return "late_result"
    if result.event_id in attempt.result_event_ids:
        step.ignored(
            "duplicate_ignored",
            attempt_id=attempt.attempt_id,
            result=result.type,
            event_id=result.event_id,
        )
        return "duplicate_result"
    attempt = attempt.model_copy(
        update={"result_event_ids": [*attempt.result_event_ids, result.event_id][-16:]}
    )
    step.replace_attempt(attempt)
    current = job.current
    superseded = current is None or current.attempt_id != attempt.attempt_id
    if superseded or job.terminal or not attempt.status.live:
        step.ignored(
            "late_result",
            attempt_id=attempt.attempt_id,
            result=result.type,
            provider=result.provider,
            event_id=result.event_id,
            attempt_state=attempt.status.value,
            job_state=job.status.value,
        )
        return "late_result"
    if result.type == "started":
        if attempt.status is AttemptStatus.STARTED:
            step.ignored("duplicate_ignored", attempt_id=attempt.attempt_id, result="started")
            return "duplicate_result"
        step.replace_attempt(
            attempt.model_copy(
                update={
                    "status": AttemptStatus.STARTED,
                    "started_at": step.at,
                    # The provider's time to answer counts from when it started the call.
                    "timeout_at": max(
                        attempt.timeout_at,
                        step.at + timedelta(milliseconds=_timeout_ms(step.ctx, attempt)),
                    ),
                }
            )
        )
        if job.status is JobStatus.DISPATCHED:
            step.transition(JobStatus.STARTED)
        step.event("started", attempt_id=attempt.attempt_id, provider=attempt.provider)
        return "started"
    latency = result.latency_ms
    if latency is None:
        latency = int((step.at - attempt.dispatched_at).total_seconds() * 1000)
    if result.type == "completed":
        _complete(step, attempt, result, latency)
        return "completed"
    raw = result.error
    if raw is None:
        error = canonical_error(
            ErrorCode.MALFORMED_RESPONSE, "provider reported a failure without an error"
        )
    else:
        error = map_provider_error(raw, provider_kind=attempt.provider_kind, now=step.at)
    cost = _failure_cost(step, attempt, error, result)
    _attempt_failed(step, attempt, error, AttemptStatus.FAILED, latency, cost=cost)
    return "attempt_failed"


def _complete(step: _Step, attempt: Attempt, result: ProviderResult, latency: int) -> None:
    output = result.output or Output(text="", finish_reason=None)
    usage = normalize_usage(
        result.raw_usage,
        shape=result.usage_shape,
        prompt_text=step.job.request.prompt_text(),
        output_text=output.generated_text(),
    )
    cost = _price(step, attempt, usage, result.model or attempt.model)
    step.replace_attempt(
        attempt.model_copy(
            update={
                "status": AttemptStatus.COMPLETED,
                "finished_at": step.at,
                "output": output,
                "usage": usage,
                "cost": cost,
                "latency_ms": latency,
            }
        )
    )
    step.observations.append(Observation(attempt.provider, True, latency, step.at))
    step.finish(
        JobStatus.COMPLETED,
        reason="completed",
        detail=f"answered by {attempt.provider}/{result.model or attempt.model} on attempt "
        f"{attempt.attempt_no} of {step.ctx.policy.retry.max_attempts_per_job} allowed",
    )


def _price(step: _Step, attempt: Attempt, usage: Usage, model_name: str) -> Cost:
    catalogue = step.ctx.catalogue
    spec = catalogue.provider(attempt.provider)
    model = catalogue.model(attempt.provider, attempt.model)
    return price_usage(
        usage,
        provider=attempt.provider,
        model=model_name,
        catalogue_prices=model.prices if model else None,
        genai_provider_id=spec.genai_provider_id if spec else None,
        at=step.at,
        catalogue_version=catalogue.version,
    )


def _timeout_ms(ctx: Context, attempt: Attempt) -> int:
    """The attempt's answer time (rows written before it was recorded: the policy's)."""
    return attempt.timeout_ms or ctx.policy.attempt_timeout_ms


def _currency(ctx: Context, attempt: Attempt) -> str:
    model = ctx.catalogue.model(attempt.provider, attempt.model)
    return model.prices.currency if model and model.prices else "USD"


def _unknown_cost(ctx: Context, attempt: Attempt, reason: str) -> Cost:
    return Cost(amount=None, currency=_currency(ctx, attempt), estimated=True, reason=reason)


def _zero_cost(ctx: Context, attempt: Attempt, reason: str) -> Cost:
    return Cost(amount=Decimal(0), currency=_currency(ctx, attempt), estimated=False, reason=reason)


#: Failures after which the provider may have run (and billed) the call without telling us.
_MAY_HAVE_RUN = frozenset(
    {
        ErrorCode.TIMEOUT,
        ErrorCode.CONNECTION_ERROR,
        ErrorCode.MALFORMED_RESPONSE,
        ErrorCode.CONTENT_FILTERED,
    }
)


def _failure_cost(
    step: _Step, attempt: Attempt, error: CanonicalError, result: ProviderResult | None
) -> Cost:
    """What a failed attempt cost: priced from usage the failure reported, else zero when the
    provider refused the call, else unknown (it may have run without telling us)."""
    if result is not None and result.raw_usage:
        usage = normalize_usage(
            result.raw_usage,
            shape=result.usage_shape,
            prompt_text=step.job.request.prompt_text(),
            output_text="",
        )
        cost = _price(step, attempt, usage, result.model or attempt.model)
        note = f"priced from the usage {attempt.provider} reported with its {error.code.value}"
        return cost.model_copy(
            update={"estimated": True, "reason": "; ".join(filter(None, [note, cost.reason]))}
        )
    if error.code in _MAY_HAVE_RUN:
        return _unknown_cost(
            step.ctx,
            attempt,
            f"unknown: after {error.code.value} the provider may have billed tokens "
            "it never reported",
        )
    return _zero_cost(
        step.ctx,
        attempt,
        f"nothing billed: {attempt.provider} answered {error.code.value} and reported no usage",
    )


def _attempt_failed(
    step: _Step,
    attempt: Attempt,
    error: CanonicalError,
    status: AttemptStatus,
    latency: int,
    *,
    cost: Cost,
) -> None:
    failed = attempt.model_copy(
        update={
            "status": status,
            "finished_at": step.at,
            "error": error,
            "latency_ms": latency,
            "cost": cost,
        }
    )
    step.replace_attempt(failed)
    step.observations.append(Observation(attempt.provider, False, latency, step.at))
    step.event(
        "attempt_failed",
        attempt_id=attempt.attempt_id,
        provider=attempt.provider,
        model=attempt.model,
        error=error.model_dump(mode="json"),
    )
    step.after_failure(failed, error)


def _tick(step: _Step) -> str:
    job = step.job
    if job.terminal:
        return "noop"
    at = step.at
    if job.deadline_at is not None and at >= job.deadline_at:
        step.cancel_live_attempt("job deadline passed")
        message = f"job not final within its deadline of {job.request.deadline_ms} ms"
        step.finish(
            JobStatus.EXPIRED,
            error=canonical_error(ErrorCode.DEADLINE_EXCEEDED, message),
            reason="deadline",
            detail=message,
        )
        return "expired"
    current = job.current
    if job.status is JobStatus.RETRYING and job.retry_at is not None and at >= job.retry_at:
        target = job.retry_target or (current.target if current else None)
        if target is None:
            return "noop"
        step.dispatch(target, reason="retry")
        return "retry_dispatched"
    if current is not None and current.status.live and at >= current.expires_at:
        step.tell_provider_to_drop(current, "attempt timed out")
        policy = step.ctx.policy
        if current.waiting_to_start:
            message = (
                f"{current.provider} did not start the attempt within {policy.start_timeout_ms} ms"
            )
        else:
            timeout_ms = _timeout_ms(step.ctx, current)
            message = f"no answer from {current.provider} within {timeout_ms} ms"
        error = canonical_error(ErrorCode.TIMEOUT, message)
        latency = int((at - current.dispatched_at).total_seconds() * 1000)
        if current.waiting_to_start:
            why = "it may have run without reporting it started, and billed tokens"
        else:
            why = "the provider may have billed tokens it never reported"
        cost = _unknown_cost(step.ctx, current, f"unknown: timed out; {why}")
        _attempt_failed(step, current, error, AttemptStatus.TIMED_OUT, latency, cost=cost)
        return "attempt_timed_out"
    return "noop"


def _webhook(step: _Step, command: RecordWebhook) -> str:
    """Record one completion-webhook attempt in the finished job's timeline."""
    job = step.job
    if (
        not job.terminal
        or job.request.callback_url is None
        or command.delivery_id != delivery_id(job.job_id)
    ):
        return "noop"
    recorded = sum(1 for e in job.events if e.type.startswith("webhook_"))
    if command.outcome == "failed" and recorded >= MAX_WEBHOOK_EVENTS:
        step.update(ignored_events=job.ignored_events + 1)
        return "webhook_failed"
    data: dict[str, Any] = {
        "delivery_id": command.delivery_id,
        "attempt": command.attempt,
        "status_code": command.status_code,
        "latency_ms": command.latency_ms,
    }
    if command.error is not None:
        data["error"] = command.error
    if command.next_attempt_at is not None:
        data["next_attempt_at"] = command.next_attempt_at.isoformat()
    step.event(f"webhook_{command.outcome}", **data)
    return f"webhook_{command.outcome}"


def _cancel(step: _Step, command: CancelJob) -> str:
    job = step.job
    if job.terminal:
        step.ignored("cancel_ignored", reason=command.reason, job_state=job.status.value)
        return "cancel_ignored"
    step.cancel_live_attempt(command.reason)
    by = f"tenant {command.tenant_id}" if command.tenant_id else "a producer"
    if command.source:
        by += f" via {command.source}"
    step.finish(
        JobStatus.CANCELLED,
        error=canonical_error(ErrorCode.CANCELLED, command.reason),
        reason="cancelled",
        detail=f"cancelled by {by}: {command.reason}",
        cancelled_by=by,
    )
    return "cancelled"


def fail_internal(job: Job | None, command: Command, ctx: Context, detail: str) -> Decision:
    """The job after `command` could not be applied: FAILED with a canonical `internal` error.

    The control plane's own failure must still end the job with a final response (a client that
    got 202 must not read 404 forever, a failing timer must not fire again and again). Only the
    job's identity and the command's time are used here: nothing that made the step fail.
    """
    if job is not None and command.command_id in job.seen_commands:
        return Decision(job=job, outcome="duplicate_command", publish=tuple(job.outbox))
    if job is None:
        if not isinstance(command, CreateJob):
            return Decision(
                job=None,
                outcome="unknown_job",
                dead_letter=(
                    "unknown_job",
                    f"no job {command.job_id} for a {command.kind} command",
                ),
            )
        step = _created(command, None, ctx)
    elif job.terminal:
        return Decision(job=job, outcome="noop")
    else:
        step = _Step(job, command.at, ctx)
        step.cancel_live_attempt("the job failed inside the control plane")
        step.update(seen_commands=[*job.seen_commands, command.command_id][-SEEN_COMMANDS:])
    message = f"the control plane could not apply a {command.kind} command to this job: {detail}"
    step.finish(
        JobStatus.FAILED,
        error=canonical_error(ErrorCode.INTERNAL, message),
        reason="internal",
        detail=message,
    )
    return Decision(job=step.job, outcome="failed", publish=tuple(step.entries))


def fail_undeliverable(
    job: Job, undeliverable: Mapping[str, str], ctx: Context, at: datetime
) -> Decision | None:
    """Fail at once every attempt whose dispatch cannot be sent, and fall back as usual.

    `undeliverable` maps a provider to why its dispatch queue cannot take records (no topic on
    the broker, not in the catalogue). Each such dispatch leaves the outbox and its attempt fails
    with the canonical `dispatch_failed` (nothing billed: it was never sent), so the job moves on
    to the next target or ends, instead of a record nobody can send being tried again and again.
    A provider cancel to such a queue is dropped: there is nothing there to cancel. None when
    the job's outbox holds nothing undeliverable.
    """
    step = _Step(job, at, ctx)
    changed = False
    while True:
        entry = next(
            (
                e
                for e in step.job.outbox
                if e.topic in ("dispatch", "provider_cancel") and e.provider in undeliverable
            ),
            None,
        )
        if entry is None:
            break
        changed = True
        step.update(outbox=[e for e in step.job.outbox if e.entry_id != entry.entry_id])
        attempt = step.job.attempt(entry.attempt_id or "")
        if entry.topic != "dispatch" or attempt is None or not attempt.status.live:
            continue
        provider = attempt.provider
        error = canonical_error(
            ErrorCode.DISPATCH_FAILED,
            f"the dispatch to {provider} could not be sent: {undeliverable[provider]}",
        )
        cost = _zero_cost(ctx, attempt, "nothing billed: the dispatch was never sent")
        _attempt_failed(step, attempt, error, AttemptStatus.FAILED, 0, cost=cost)
    if not changed:
        return None
    return Decision(job=step.job, outcome="dispatch_failed", publish=tuple(step.entries))
