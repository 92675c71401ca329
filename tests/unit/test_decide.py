"""Scenarios of the job agent's decision: create, results, retries, fallback, timers, cancel."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from domain.catalogue import (
    Catalogue,
    ConfigError,
    Unavailable,
    load_catalogue,
    resolve_providers,
)
from domain.commands import CancelJob, CreateJob, MarkPublished, RecordResult, Tick
from domain.decide import Context, Decision, decide, fail_internal, fail_undeliverable
from domain.errors import ErrorCode
from domain.health import ProviderHealth
from domain.ids import attempt_id_for, idempotency_key, job_id_for
from domain.job import Job, OutboxEntry
from domain.lifecycle import AttemptStatus, JobStatus, can_transition
from domain.messages import (
    ADDED_FIELDS,
    Dispatch,
    FinalResponse,
    JobEvent,
    JobRequest,
    Output,
    ProviderCancel,
    ProviderResult,
    RawProviderError,
)
from domain.outbox import render
from domain.policy import load_policy

CONFIG = Path(__file__).resolve().parents[2] / "config"
CATALOGUE = load_catalogue(CONFIG / "catalogue.yaml")
POLICY = load_policy(CONFIG / "policy.yaml")
CTX = Context(catalogue=CATALOGUE, policy=POLICY)
T0 = datetime(2026, 1, 1, tzinfo=UTC)
TENANT = "tenant-a"
TIMEOUT = timedelta(milliseconds=POLICY.attempt_timeout_ms)
assert POLICY.start_timeout_ms is not None
START_TIMEOUT = timedelta(milliseconds=POLICY.start_timeout_ms)
TERMINAL_EVENTS = {"completed", "failed", "cancelled", "expired"}


def secs(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_request(request_id: str = "r-1", **fields: Any) -> JobRequest:
    body: dict[str, Any] = {
        "request_id": request_id,
        "tenant_id": TENANT,
        "messages": [{"role": "user", "content": "Say hello."}],
        **fields,
    }
    return JobRequest.model_validate(body)


class Flow:
    """Drives one job through `decide`, keeping the latest state and unique command ids."""

    def __init__(self, ctx: Context = CTX) -> None:
        self.ctx = ctx
        self.job: Job | None = None
        self.count = 0
        self.decisions: list[Decision] = []

    @property
    def state(self) -> Job:
        assert self.job is not None
        return self.job

    def next_id(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}-{self.count}"

    def apply(self, command: Any) -> Decision:
        decision = decide(self.job, command, self.ctx)
        self.decisions.append(decision)
        if decision.job is not None:
            self.job = decision.job
        return decision

    def create_command(
        self, request: JobRequest | None = None, *, at: datetime = T0, command_id: str = ""
    ) -> CreateJob:
        request = request or make_request()
        return CreateJob(
            command_id=command_id or self.next_id("create"),
            job_id=job_id_for(TENANT, request.request_id),
            at=at,
            tenant_id=TENANT,
            fingerprint=request.fingerprint(),
            request=request,
        )

    def create(self, request: JobRequest | None = None, *, at: datetime = T0) -> Decision:
        return self.apply(self.create_command(request, at=at))

    def result_command(
        self,
        kind: str,
        *,
        at: datetime,
        attempt_id: str | None = None,
        provider: str | None = None,
        event_id: str | None = None,
        command_id: str | None = None,
        **fields: Any,
    ) -> RecordResult:
        job = self.state
        attempt = job.attempt(attempt_id) if attempt_id else job.current
        assert attempt is not None or (attempt_id and provider)
        result = ProviderResult(
            type=kind,
            event_id=event_id or self.next_id("ev"),
            job_id=job.job_id,
            attempt_id=attempt_id or (attempt.attempt_id if attempt else ""),
            provider=provider or (attempt.provider if attempt else ""),
            model=attempt.model if attempt else "m",
            occurred_at=at,
            **fields,
        )
        return RecordResult(
            command_id=command_id or self.next_id("result"), job_id=job.job_id, at=at, result=result
        )

    def result(self, kind: str, *, at: datetime, **kwargs: Any) -> Decision:
        return self.apply(self.result_command(kind, at=at, **kwargs))

    def started(self, *, at: datetime, **kwargs: Any) -> Decision:
        return self.result("started", at=at, **kwargs)

    def completed(self, *, at: datetime, **kwargs: Any) -> Decision:
        kwargs.setdefault("output", Output(text="Hello!", finish_reason="stop"))
        kwargs.setdefault("raw_usage", {"input_tokens": 10, "output_tokens": 5})
        return self.result("completed", at=at, **kwargs)

    def fail(
        self,
        code: str = "provider_internal",
        *,
        at: datetime,
        retry_after: str | None = None,
        **kwargs: Any,
    ) -> Decision:
        error = RawProviderError(kind="simulated", code=code, retry_after=retry_after)
        return self.result("failed", at=at, error=error, **kwargs)

    def tick(self, at: datetime) -> Decision:
        return self.apply(Tick(command_id=self.next_id("tick"), job_id=self.state.job_id, at=at))

    def cancel(
        self, *, at: datetime, tenant_id: str | None = TENANT, reason: str = "client gave up"
    ) -> Decision:
        return self.apply(
            CancelJob(
                command_id=self.next_id("cancel"),
                job_id=self.state.job_id,
                at=at,
                tenant_id=tenant_id,
                reason=reason,
            )
        )

    def mark_published(self, entry_ids: list[str], *, at: datetime) -> Decision:
        return self.apply(
            MarkPublished(
                command_id=self.next_id("pub"),
                job_id=self.state.job_id,
                at=at,
                entry_ids=entry_ids,
            )
        )


def created_flow(request: JobRequest | None = None, ctx: Context = CTX) -> Flow:
    flow = Flow(ctx)
    decision = flow.create(request)
    assert decision.outcome == "created"
    return flow


def entries(decision: Decision, topic: str) -> list[OutboxEntry]:
    return [e for e in decision.publish if e.topic == topic]


def wire(job: Job, entry: OutboxEntry) -> dict[str, Any]:
    """Render an outbox entry from the job's state and serialize it as the agent would send it."""
    return render(job, entry).model_dump(mode="json")


def event_types(job: Job) -> list[str]:
    return [e.type for e in job.events]


def new_events(before: Job, after: Job) -> list[JobEvent]:
    assert after.events[: len(before.events)] == before.events
    return after.events[len(before.events) :]


def fail_until_terminal(flow: Flow, code: str = "provider_internal") -> datetime:
    """Fail every attempt (ticking through backoffs) until the job ends; return the last time."""
    at = T0
    for _ in range(50):
        job = flow.state
        if job.terminal:
            return at
        if job.status is JobStatus.RETRYING:
            assert job.retry_at is not None
            at = job.retry_at
            assert flow.tick(at).outcome == "retry_dispatched"
            continue
        at += timedelta(seconds=1)
        flow.fail(code, at=at)
    raise AssertionError("job never ended")


# -- create ---------------------------------------------------------------------------------------


def test_create_routes_and_dispatches_one_attempt() -> None:
    flow = Flow()
    decision = flow.create()
    job = flow.state
    assert decision.outcome == "created"
    assert decision.changed
    assert decision.dead_letter is None
    assert job.status is JobStatus.DISPATCHED
    assert job.job_id == job_id_for(TENANT, "r-1")
    assert event_types(job) == ["created", "routed", "dispatched"]
    assert [e.seq for e in job.events] == [1, 2, 3]
    assert [e.state for e in job.events] == ["CREATED", "ROUTED", "DISPATCHED"]
    assert job.status_times == {"CREATED": T0, "ROUTED": T0, "DISPATCHED": T0}
    assert job.created_at == job.updated_at == T0

    routing = job.decisions[0]
    assert len(job.decisions) == 1
    assert routing.chosen is not None
    assert job.plan == routing.fallback_plan
    assert routing.policy_version == POLICY.version
    assert routing.catalogue_version == CATALOGUE.version

    (attempt,) = job.attempts
    assert attempt.attempt_id == attempt_id_for(job.job_id, 1)
    assert (attempt.provider, attempt.model) == (routing.chosen.provider, routing.chosen.model)
    assert attempt.attempt_no == attempt.provider_attempt_no == 1
    assert attempt.status is AttemptStatus.DISPATCHED
    assert attempt.timeout_at == T0 + TIMEOUT
    assert attempt.start_by == T0 + START_TIMEOUT
    assert job.next_wake() == T0 + START_TIMEOUT  # until the provider starts it

    (entry,) = entries(decision, "dispatch")
    assert entry.entry_id == f"d-{attempt.attempt_id}"
    assert entry.provider == attempt.provider
    message = Dispatch.model_validate(wire(job, entry))
    assert message.idempotency_key == f"{job.job_id}:{attempt.attempt_id}"
    assert message.idempotency_key == idempotency_key(job.job_id, attempt.attempt_id)
    assert (message.provider, message.model) == (attempt.provider, attempt.model)
    assert message.attempt_no == message.provider_attempt_no == 1
    assert message.request == job.request
    assert message.dispatched_at == T0
    assert message.timeout_ms == POLICY.attempt_timeout_ms

    assert list(decision.publish) == job.outbox
    events = [JobEvent.model_validate(wire(job, e)) for e in entries(decision, "events")]
    assert events == job.events
    assert [e.entry_id for e in entries(decision, "events")] == ["e1", "e2", "e3"]
    assert job.events[2].data["idempotency_key"] == message.idempotency_key


def test_create_with_a_deadline_sets_deadline_at() -> None:
    flow = created_flow(make_request(deadline_ms=5_000))
    assert flow.state.deadline_at == secs(5)
    assert flow.state.next_wake() == secs(5)


def test_tick_and_mark_published_for_a_missing_job_are_noops() -> None:
    tick = Tick(command_id="t", job_id="job_missing", at=T0)
    mark = MarkPublished(command_id="m", job_id="job_missing", at=T0, entry_ids=["e1"])
    for command in (tick, mark):
        decision = decide(None, command, CTX)
        assert (decision.job, decision.outcome, decision.publish) == (None, "noop", ())
        assert decision.dead_letter is None


def test_constraints_that_exclude_everything_fail_with_no_eligible_target() -> None:
    flow = Flow()
    decision = flow.create(make_request(constraints={"capabilities": ["teleportation"]}))
    job = flow.state
    assert decision.outcome == "failed"
    assert job.status is JobStatus.FAILED
    assert job.attempts == []
    assert entries(decision, "dispatch") == []
    assert event_types(job) == ["created", "routed", "failed"]
    (routing,) = job.decisions
    assert routing.chosen is None
    assert routing.candidates == []
    assert routing.fallback_plan == []
    assert len(routing.excluded) == sum(1 for _ in CATALOGUE.targets())
    assert {e.reason_code for e in routing.excluded} <= {"capability_missing", "disabled"}
    assert job.events[1].data["chosen"] is None
    assert job.final is not None
    assert job.final.state == "FAILED"
    assert job.final.error is not None
    assert job.final.error.code is ErrorCode.NO_ELIGIBLE_TARGET
    assert "capability_missing" in job.final.error.message
    assert job.final.provider is None
    assert job.final.attempts == 0
    (response,) = entries(decision, "responses")
    assert FinalResponse.model_validate(wire(job, response)) == job.final
    assert job.next_wake() is None


# -- results --------------------------------------------------------------------------------------


def test_started_result_moves_the_job_to_started() -> None:
    flow = created_flow()
    decision = flow.started(at=secs(1))
    job = flow.state
    assert decision.outcome == "started"
    assert job.status is JobStatus.STARTED
    assert job.status_times["STARTED"] == secs(1)
    assert job.attempts[0].status is AttemptStatus.STARTED
    assert job.attempts[0].started_at == secs(1)
    assert event_types(job)[-1] == "started"
    assert [e.topic for e in decision.publish] == ["events"]


def test_completed_result_finishes_with_a_normalized_final_response() -> None:
    flow = created_flow()
    flow.started(at=secs(1))
    decision = flow.completed(at=secs(2))
    job = flow.state
    attempt = job.attempts[0]
    assert decision.outcome == "completed"
    assert job.status is JobStatus.COMPLETED
    assert job.terminal
    assert attempt.status is AttemptStatus.COMPLETED
    assert attempt.latency_ms == 2000
    assert event_types(job)[-1] == "completed"

    final = job.final
    assert final is not None
    assert final.state == "COMPLETED"
    assert final.error is None
    assert final.output == Output(text="Hello!", finish_reason="stop")
    assert (final.provider, final.model) == (attempt.provider, attempt.model)
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (10, 5)
    assert final.usage.total_tokens == 15
    assert final.attempts == 1
    assert (final.created_at, final.finished_at) == (T0, secs(2))

    model = CATALOGUE.model(attempt.provider, attempt.model)
    assert model is not None
    assert model.prices is not None
    expected = (10 * model.prices.input_per_mtok + 5 * model.prices.output_per_mtok) / Decimal(
        1_000_000
    )
    dumped = final.model_dump(mode="json")
    amount = dumped["cost"]["total"]["amount"]
    assert isinstance(amount, str)
    assert Decimal(amount) == expected
    assert dumped["cost"]["total"]["currency"] == "USD"
    assert [a["attempt_id"] for a in dumped["cost"]["attempts"]] == [attempt.attempt_id]

    (response,) = entries(decision, "responses")
    assert wire(job, response) == dumped
    assert FinalResponse.model_validate(wire(job, response)) == final
    assert job.events[-1].data["cost"]["amount"] == amount
    assert [(o.provider, o.ok) for o in decision.observations] == [(attempt.provider, True)]
    assert job.next_wake() is None


def test_completed_straight_from_dispatched_is_legal() -> None:
    flow = created_flow()
    assert flow.completed(at=secs(1)).outcome == "completed"
    assert "STARTED" not in flow.state.status_times
    assert flow.state.status is JobStatus.COMPLETED


def test_rate_limited_result_waits_in_retrying() -> None:
    flow = created_flow()
    first = flow.state.attempts[0]
    decision = flow.fail("rate_limited", at=secs(1))
    job = flow.state
    assert decision.outcome == "attempt_failed"
    assert job.status is JobStatus.RETRYING
    assert job.retry_at is not None
    assert job.retry_at > secs(1)
    assert job.retry_target == first.target
    assert job.next_wake() == job.retry_at
    failed = job.attempts[0]
    assert failed.status is AttemptStatus.FAILED
    assert failed.error is not None
    assert failed.error.code is ErrorCode.RATE_LIMITED
    assert event_types(job)[-2:] == ["attempt_failed", "retried"]
    assert job.events[-1].data["retry_at"] == job.retry_at.isoformat()
    assert entries(decision, "dispatch") == []
    assert [(o.provider, o.ok) for o in decision.observations] == [(first.provider, False)]


def test_tick_before_retry_at_is_a_noop() -> None:
    flow = created_flow()
    flow.fail("rate_limited", at=secs(1))
    job = flow.state
    assert job.retry_at is not None
    decision = flow.tick(job.retry_at - timedelta(milliseconds=1))
    assert decision.outcome == "noop"
    assert decision.job is job
    assert decision.publish == ()
    assert not decision.changed


def test_tick_at_retry_at_dispatches_a_new_attempt_on_the_same_provider() -> None:
    flow = created_flow()
    first = flow.state.attempts[0]
    flow.fail("rate_limited", at=secs(1))
    retry_at = flow.state.retry_at
    assert retry_at is not None
    decision = flow.tick(retry_at)
    job = flow.state
    assert decision.outcome == "retry_dispatched"
    assert job.status is JobStatus.DISPATCHED
    assert job.retry_at is None
    assert job.retry_target is None
    second = job.attempts[1]
    assert second.attempt_id == attempt_id_for(job.job_id, 2)
    assert (second.provider, second.model) == (first.provider, first.model)
    assert second.attempt_no == 2
    assert second.provider_attempt_no == 2
    assert second.dispatched_at == retry_at
    assert second.timeout_at == retry_at + TIMEOUT
    (entry,) = entries(decision, "dispatch")
    message = Dispatch.model_validate(wire(job, entry))
    assert message.attempt_id == second.attempt_id
    assert message.provider_attempt_no == 2
    assert message.idempotency_key == f"{job.job_id}:{second.attempt_id}"
    # A second tick at the same time changes nothing.
    assert flow.tick(retry_at).outcome == "noop"


@pytest.mark.parametrize(
    ("raw", "at_s"),
    [
        (RawProviderError(kind="simulated", code="rate_limited", retry_after="3"), 1),
        (RawProviderError(kind="http", http_status=429, retry_after="3"), 1),
        # An HTTP-date is read against the command's time, never the clock: 3 s after `at`.
        (
            RawProviderError(
                kind="http", http_status=429, retry_after="Thu, 01 Jan 2026 00:00:04 GMT"
            ),
            1,
        ),
    ],
)
def test_retry_after_is_honoured(raw: RawProviderError, at_s: int) -> None:
    flow = created_flow()
    flow.result("failed", at=secs(at_s), error=raw)
    job = flow.state
    assert job.status is JobStatus.RETRYING
    assert job.retry_at is not None
    assert job.retry_at >= secs(at_s) + timedelta(seconds=3)
    assert job.attempts[0].error is not None
    assert job.attempts[0].error.retry_after_s == pytest.approx(3.0)
    assert job.events[-1].data["delay_ms"] >= 3000


def test_retry_after_is_capped_by_the_policy() -> None:
    flow = created_flow()
    flow.fail("rate_limited", at=secs(1), retry_after="3600")
    assert flow.state.retry_at == secs(1) + timedelta(milliseconds=POLICY.retry.max_retry_after_ms)


def test_provider_internal_twice_on_one_provider_falls_back_to_the_next_target() -> None:
    flow = created_flow()
    first = flow.state.attempts[0]
    next_target = flow.state.plan[0]
    assert next_target.provider != first.provider
    flow.fail("provider_internal", at=secs(1))
    assert flow.state.status is JobStatus.RETRYING
    assert flow.state.retry_at is not None
    flow.tick(flow.state.retry_at)
    assert flow.state.attempts[1].provider == first.provider
    before = flow.state
    decision = flow.fail("provider_internal", at=secs(5))
    job = flow.state
    assert decision.outcome == "attempt_failed"
    assert job.status is JobStatus.DISPATCHED
    assert [e.type for e in new_events(before, job)] == ["attempt_failed", "fallback", "dispatched"]
    assert [e.state for e in new_events(before, job)] == ["DISPATCHED", "ROUTED", "DISPATCHED"]
    fallback = job.events[-2].data
    assert (fallback["from_provider"], fallback["from_model"]) == (first.provider, first.model)
    assert (fallback["to_provider"], fallback["to_model"]) == (
        next_target.provider,
        next_target.model,
    )
    assert fallback["reason"] == "provider_internal"
    third = job.attempts[2]
    assert (third.provider, third.model) == (next_target.provider, next_target.model)
    assert third.attempt_no == 3
    assert third.provider_attempt_no == 1
    assert job.plan == before.plan[1:]
    (entry,) = entries(decision, "dispatch")
    assert entry.provider == next_target.provider
    assert Dispatch.model_validate(wire(job, entry)).provider == next_target.provider


def test_a_fallback_error_skips_the_retry() -> None:
    flow = created_flow()
    next_target = flow.state.plan[0]
    flow.fail("quota_exhausted", at=secs(1))
    job = flow.state
    assert job.status is JobStatus.DISPATCHED
    assert len(job.attempts) == 2
    assert job.attempts[1].target == next_target
    assert "retried" not in event_types(job)


def test_a_non_retryable_error_fails_the_job_at_once() -> None:
    flow = created_flow()
    decision = flow.fail("invalid_request", at=secs(1))
    job = flow.state
    assert job.status is JobStatus.FAILED
    assert len(job.attempts) == 1
    assert job.final is not None
    assert job.final.error is not None
    assert job.final.error.code is ErrorCode.INVALID_REQUEST
    assert len(entries(decision, "responses")) == 1


def test_all_providers_failing_ends_failed_within_the_attempt_budget() -> None:
    flow = created_flow()
    fail_until_terminal(flow)
    job = flow.state
    budget = POLICY.retry.max_attempts_per_job
    assert job.status is JobStatus.FAILED
    assert 1 < len(job.attempts) <= budget
    assert len(job.attempts) == min(budget, len(job.decisions[0].targets()) * 2)
    for provider in {a.provider for a in job.attempts}:
        on_provider = sum(1 for a in job.attempts if a.provider == provider)
        assert on_provider <= POLICY.retry.max_attempts_per_provider
    last = job.attempts[-1]
    assert all(a.status is AttemptStatus.FAILED for a in job.attempts)
    assert job.final is not None
    assert job.final.state == "FAILED"
    assert job.final.error == last.error
    assert job.final.error is not None
    assert job.final.error.code is ErrorCode.PROVIDER_INTERNAL
    assert (job.final.provider, job.final.model) == (last.provider, last.model)
    assert job.final.attempts == len(job.attempts)
    assert event_types(job).count("failed") == 1
    assert job.events[-1].data["error"]["code"] == "provider_internal"


def test_exhausted_plan_fails_before_the_budget() -> None:
    flow = created_flow(make_request(constraints={"providers": {"allow": ["sim-fast"]}}))
    assert flow.state.plan == []
    fail_until_terminal(flow)
    job = flow.state
    assert job.status is JobStatus.FAILED
    assert [a.provider for a in job.attempts] == ["sim-fast", "sim-fast"]


def test_fallback_skips_a_target_whose_circuit_is_open() -> None:
    flow = created_flow()
    skipped, after = flow.state.plan[0], flow.state.plan[1]
    health = {
        skipped.provider: ProviderHealth(
            provider=skipped.provider, circuit="open", opened_at=T0, error_rate=0.9, samples=10
        )
    }
    flow.ctx = Context(catalogue=CATALOGUE, policy=POLICY, health=health)
    flow.fail("quota_exhausted", at=secs(1))
    job = flow.state
    assert job.attempts[-1].target == after
    fallback = next(e for e in job.events if e.type == "fallback")
    assert fallback.data["to_provider"] == after.provider
    assert fallback.data["skipped"] == [{**skipped.model_dump(), "reason": "circuit_open"}]
    assert job.plan == []


def test_duplicate_result_event_is_ignored() -> None:
    flow = created_flow()
    flow.started(at=secs(1), event_id="ev-s")
    before = flow.state
    decision = flow.started(at=secs(2), event_id="ev-s")
    assert decision.outcome == "duplicate_result"
    assert flow.state.status is before.status
    assert flow.state.attempts[0].started_at == secs(1)
    assert [e.type for e in new_events(before, flow.state)] == ["duplicate_ignored"]


def test_second_started_event_is_ignored() -> None:
    flow = created_flow()
    flow.started(at=secs(1))
    decision = flow.started(at=secs(2))
    assert decision.outcome == "duplicate_result"
    assert flow.state.status_times["STARTED"] == secs(1)


def test_result_naming_another_provider_is_a_late_result() -> None:
    flow = created_flow()
    before = flow.state
    other = "sim-fast" if before.attempts[0].provider != "sim-fast" else "sim-smart"
    decision = flow.completed(at=secs(1), provider=other)
    assert decision.outcome == "late_result"
    assert flow.state.status is JobStatus.DISPATCHED
    assert [e.type for e in new_events(before, flow.state)] == ["late_result"]


def test_late_result_for_a_superseded_attempt_is_only_recorded() -> None:
    flow = created_flow()
    first = flow.state.attempts[0]
    flow.fail("quota_exhausted", at=secs(1))  # falls back: attempt 2 is current
    before = flow.state
    assert before.current is not None
    assert before.current.attempt_id != first.attempt_id
    decision = flow.completed(at=secs(2), attempt_id=first.attempt_id, provider=first.provider)
    after = flow.state
    assert decision.outcome == "late_result"
    assert [e.type for e in new_events(before, after)] == ["late_result"]
    assert [e.topic for e in decision.publish] == ["events"]
    assert after.status is before.status
    assert [a.status for a in after.attempts] == [a.status for a in before.attempts]
    assert after.final is None
    assert after.attempts[0].output is None


def test_late_result_after_the_job_ended_changes_nothing_but_the_timeline() -> None:
    flow = created_flow()
    flow.cancel(at=secs(1))
    before = flow.state
    decision = flow.completed(at=secs(2))
    assert decision.outcome == "late_result"
    assert flow.state.status is JobStatus.CANCELLED
    assert flow.state.final == before.final
    assert [e.type for e in new_events(before, flow.state)] == ["late_result"]


def test_result_for_an_unknown_attempt_is_a_late_result() -> None:
    flow = created_flow()
    before = flow.state
    decision = flow.completed(
        at=secs(1), attempt_id=attempt_id_for(before.job_id, 9), provider="sim-fast"
    )
    assert decision.outcome == "late_result"
    assert flow.state.status is JobStatus.DISPATCHED
    assert flow.state.attempts == before.attempts


def test_result_for_an_unknown_job_is_dead_lettered() -> None:
    result = ProviderResult(
        type="completed",
        event_id="ev-1",
        job_id="job_missing",
        attempt_id="job_missing-a1",
        provider="sim-fast",
        model="swift-mini-sim",
        occurred_at=T0,
    )
    command = RecordResult(command_id="c-1", job_id="job_missing", at=T0, result=result)
    decision = decide(None, command, CTX)
    assert decision.job is None
    assert decision.outcome == "unknown_job"
    assert decision.dead_letter is not None
    assert decision.dead_letter[0] == "unknown_job"
    assert "job_missing" in decision.dead_letter[1]
    assert decision.publish == ()


# -- timers ---------------------------------------------------------------------------------------


def test_attempt_timeout_cancels_at_the_provider_and_retries() -> None:
    flow = created_flow()
    flow.started(at=secs(5))
    first = flow.state.attempts[0]
    assert first.timeout_at == secs(5) + TIMEOUT  # the answer is due counted from the start
    assert flow.state.next_wake() == first.timeout_at
    assert flow.tick(first.timeout_at - timedelta(milliseconds=1)).outcome == "noop"
    decision = flow.tick(first.timeout_at)
    job = flow.state
    assert decision.outcome == "attempt_timed_out"
    timed_out = job.attempts[0]
    assert timed_out.status is AttemptStatus.TIMED_OUT
    assert timed_out.error is not None
    assert timed_out.error.code is ErrorCode.TIMEOUT
    assert timed_out.error.message.startswith(f"no answer from {first.provider} within")
    assert timed_out.finished_at == first.timeout_at
    assert timed_out.latency_ms == POLICY.attempt_timeout_ms + 5000
    (cancel,) = entries(decision, "provider_cancel")
    assert cancel.provider == first.provider
    assert cancel.entry_id == f"c-{first.attempt_id}"
    message = ProviderCancel.model_validate(wire(job, cancel))
    assert message.attempt_id == first.attempt_id
    assert message.idempotency_key == idempotency_key(job.job_id, first.attempt_id)
    assert job.status is JobStatus.RETRYING
    assert event_types(job)[-2:] == ["attempt_failed", "retried"]


def test_an_attempt_queued_past_its_start_timeout_times_out_and_retries() -> None:
    """Waiting behind the provider's backlog is not the provider failing to answer: an attempt
    not started has the (longer) start timeout, then it is retried like any timeout."""
    flow = created_flow()
    first = flow.state.attempts[0]
    assert first.start_by is not None
    assert flow.tick(T0 + TIMEOUT).outcome == "noop"  # queued for longer than the answer time
    assert flow.tick(first.start_by - timedelta(milliseconds=1)).outcome == "noop"
    decision = flow.tick(first.start_by)
    assert decision.outcome == "attempt_timed_out"
    timed_out = flow.state.attempts[0]
    assert timed_out.status is AttemptStatus.TIMED_OUT
    assert timed_out.error is not None and timed_out.error.code is ErrorCode.TIMEOUT
    assert timed_out.error.message == (
        f"{first.provider} did not start the attempt within {POLICY.start_timeout_ms} ms"
    )
    assert flow.state.status is JobStatus.RETRYING


def test_without_a_start_timeout_an_attempt_times_out_from_its_dispatch() -> None:
    policy = POLICY.model_copy(update={"start_timeout_ms": None})
    flow = Flow(Context(catalogue=CATALOGUE, policy=policy))
    flow.create()
    first = flow.state.attempts[0]
    assert first.start_by is None and first.expires_at == T0 + TIMEOUT
    assert flow.tick(T0 + TIMEOUT).outcome == "attempt_timed_out"


def test_second_timeout_on_a_provider_falls_back() -> None:
    flow = created_flow()
    first = flow.state.attempts[0]
    next_target = flow.state.plan[0]
    flow.tick(first.expires_at)
    assert flow.state.retry_at is not None
    flow.tick(flow.state.retry_at)
    second = flow.state.attempts[1]
    decision = flow.tick(second.expires_at)
    job = flow.state
    assert job.attempts[1].status is AttemptStatus.TIMED_OUT
    assert len(entries(decision, "provider_cancel")) == 1
    assert job.status is JobStatus.DISPATCHED
    assert job.attempts[2].target == next_target
    assert "fallback" in event_types(job)


def test_deadline_expires_the_job_and_cancels_the_live_attempt() -> None:
    flow = created_flow(make_request(deadline_ms=5_000))
    flow.started(at=secs(1))
    assert flow.tick(secs(4.999)).outcome == "noop"
    decision = flow.tick(secs(5))
    job = flow.state
    assert decision.outcome == "expired"
    assert job.status is JobStatus.EXPIRED
    assert job.attempts[0].status is AttemptStatus.CANCELLED
    assert job.final is not None
    assert job.final.error is not None
    assert job.final.error.code is ErrorCode.DEADLINE_EXCEEDED
    assert job.final.state == "EXPIRED"
    assert len(entries(decision, "provider_cancel")) == 1
    assert len(entries(decision, "responses")) == 1
    assert event_types(job)[-1] == "expired"
    assert flow.tick(secs(6)).outcome == "noop"


def test_deadline_while_retrying_expires_without_a_provider_cancel() -> None:
    flow = created_flow(make_request(deadline_ms=2_000))
    flow.fail("rate_limited", at=secs(1), retry_after="10")
    assert flow.state.status is JobStatus.RETRYING
    decision = flow.tick(secs(2))
    job = flow.state
    assert job.status is JobStatus.EXPIRED
    assert entries(decision, "provider_cancel") == []
    assert entries(decision, "dispatch") == []


# -- cancel ---------------------------------------------------------------------------------------


def test_cancel_ends_the_job_and_drops_the_live_attempt() -> None:
    flow = created_flow()
    flow.started(at=secs(1))
    attempt = flow.state.attempts[0]
    decision = flow.cancel(at=secs(2), reason="user pressed stop")
    job = flow.state
    assert decision.outcome == "cancelled"
    assert job.status is JobStatus.CANCELLED
    assert job.attempts[0].status is AttemptStatus.CANCELLED
    (cancel,) = entries(decision, "provider_cancel")
    assert cancel.provider == attempt.provider
    message = ProviderCancel.model_validate(wire(job, cancel))
    assert message.attempt_id == attempt.attempt_id
    assert message.reason == "user pressed stop"
    assert job.final is not None
    assert job.final.error is not None
    assert job.final.error.code is ErrorCode.CANCELLED
    assert job.final.state == "CANCELLED"
    assert event_types(job)[-1] == "cancelled"


def test_cancel_without_a_tenant_is_accepted() -> None:
    flow = created_flow()
    assert flow.cancel(at=secs(1), tenant_id=None).outcome == "cancelled"


def test_cancel_while_retrying_has_no_attempt_to_drop() -> None:
    flow = created_flow()
    flow.fail("rate_limited", at=secs(1))
    decision = flow.cancel(at=secs(1.1))
    assert flow.state.status is JobStatus.CANCELLED
    assert flow.state.retry_at is None
    assert entries(decision, "provider_cancel") == []


def test_cancel_of_a_terminal_job_only_records_cancel_ignored() -> None:
    flow = created_flow()
    flow.completed(at=secs(1))
    before = flow.state
    decision = flow.cancel(at=secs(2))
    after = flow.state
    assert decision.outcome == "cancel_ignored"
    assert after.status is JobStatus.COMPLETED
    assert after.final == before.final
    assert after.attempts == before.attempts
    assert after.status_times == before.status_times
    assert [e.type for e in new_events(before, after)] == ["cancel_ignored"]
    assert [e.topic for e in decision.publish] == ["events"]


def test_cancel_by_another_tenant_is_an_unknown_job() -> None:
    flow = created_flow()
    before = flow.state
    decision = flow.cancel(at=secs(1), tenant_id="tenant-b")
    assert decision.outcome == "unknown_job"
    assert decision.job is None
    assert decision.dead_letter is not None
    assert decision.dead_letter[0] == "unknown_job"
    assert decision.publish == ()
    assert flow.state is before
    assert flow.state.status is JobStatus.DISPATCHED


# -- duplicates and redelivery --------------------------------------------------------------------


def test_duplicate_create_with_the_same_fingerprint_is_one_job() -> None:
    flow = created_flow()
    before = flow.state
    decision = flow.create(at=secs(1))
    after = flow.state
    assert decision.outcome == "duplicate_request"
    assert decision.dead_letter is None
    assert after.job_id == before.job_id
    assert after.attempts == before.attempts
    assert after.status is before.status
    assert [e.type for e in new_events(before, after)] == ["duplicate_ignored"]
    # The pending outbox is offered again, so a lost publish is repaired.
    assert [e.entry_id for e in decision.publish[: len(before.outbox)]] == [
        e.entry_id for e in before.outbox
    ]


def test_create_with_another_fingerprint_is_a_conflict() -> None:
    flow = created_flow()
    before = flow.state
    other = make_request(messages=[{"role": "user", "content": "Something else."}])
    assert other.fingerprint() != before.fingerprint
    decision = flow.create(other, at=secs(1))
    after = flow.state
    assert decision.outcome == "conflict"
    assert decision.dead_letter is not None
    assert decision.dead_letter[0] == "conflict"
    assert after.request == before.request
    assert after.fingerprint == before.fingerprint
    assert after.attempts == before.attempts
    assert [e.type for e in new_events(before, after)] == ["conflict"]


@pytest.mark.parametrize("kind", ["result", "cancel", "create"])
def test_a_redelivered_command_is_a_duplicate_command(kind: str) -> None:
    flow = created_flow()
    if kind == "result":
        command: Any = flow.result_command("started", at=secs(1))
    elif kind == "cancel":
        command = CancelJob(command_id="cancel-x", job_id=flow.state.job_id, at=secs(1))
    else:
        command = flow.create_command(at=T0, command_id="create-x")
        flow.apply(command)
        command = flow.create_command(at=T0, command_id="create-x")
    if kind != "create":
        flow.apply(command)
    job = flow.state
    assert job.outbox  # something is still pending
    decision = decide(job, command, CTX)
    assert decision.outcome == "duplicate_command"
    assert decision.job is job
    assert decision.publish == tuple(job.outbox)
    assert not decision.changed


def test_the_first_create_command_is_remembered() -> None:
    flow = Flow()
    command = flow.create_command()
    flow.apply(command)
    decision = decide(flow.state, command, CTX)
    assert decision.outcome == "duplicate_command"
    assert decision.job is flow.state


# -- outbox ---------------------------------------------------------------------------------------


def test_mark_published_removes_entries_and_is_idempotent() -> None:
    flow = created_flow()
    job = flow.state
    ids = [e.entry_id for e in job.outbox]
    partial = flow.mark_published(ids[:2], at=secs(1))
    assert partial.outcome == "published"
    assert [e.entry_id for e in flow.state.outbox] == ids[2:]
    assert partial.publish == ()
    assert flow.state.events == job.events
    assert flow.state.status is job.status
    full = flow.mark_published(ids, at=secs(1))
    assert full.outcome == "published"
    assert flow.state.outbox == []
    done = flow.state
    again = flow.mark_published(ids, at=secs(2))
    assert again.outcome == "noop"
    assert again.job is done
    unknown = flow.mark_published(["nope"], at=secs(2))
    assert unknown.outcome == "noop"
    assert unknown.job is done


def test_only_new_entries_are_published_after_a_mark() -> None:
    flow = created_flow()
    flow.mark_published([e.entry_id for e in flow.state.outbox], at=secs(1))
    decision = flow.started(at=secs(2))
    assert list(decision.publish) == flow.state.outbox


# -- whole runs -----------------------------------------------------------------------------------


def _script() -> list[Any]:
    flow = created_flow(make_request(deadline_ms=60_000))
    flow.started(at=secs(1))
    flow.fail("overloaded", at=secs(2))
    assert flow.state.retry_at is not None
    flow.tick(flow.state.retry_at)
    flow.fail("provider_internal", at=secs(4))
    flow.mark_published([e.entry_id for e in flow.state.outbox[:3]], at=secs(5))
    flow.completed(at=secs(6))
    flow.cancel(at=secs(7))
    return list(flow.decisions)


def test_a_job_run_is_deterministic() -> None:
    first = [(d.outcome, d.job, d.publish) for d in _script()]
    second = [(d.outcome, d.job, d.publish) for d in _script()]
    assert first == second


def test_a_full_run_follows_the_transition_table() -> None:
    decisions = _script()
    job = decisions[-1].job
    assert job is not None
    assert job.status is JobStatus.COMPLETED
    states = [e.state for e in job.events]
    for before, after in pairwise(states):
        assert before == after or can_transition(JobStatus(before), JobStatus(after))
    assert [e.seq for e in job.events] == list(range(1, len(job.events) + 1))
    assert sum(1 for e in job.events if e.type in TERMINAL_EVENTS) == 1
    assert job.final is not None
    assert job.final.attempts == 3
    assert job.final.cost.total is not None
    # Every attempt is listed; the failed ones carried no usage, so they billed nothing.
    assert [a.attempt_id for a in job.final.cost.attempts] == [a.attempt_id for a in job.attempts]
    failed, won = job.final.cost.attempts[:2], job.final.cost.attempts[2]
    assert [(c.status, c.cost.amount) for c in failed] == [("FAILED", 0), ("FAILED", 0)]
    assert job.final.cost.total.amount == won.cost.amount


# -- attempt timeouts: request over model over provider over policy, capped by the deadline ------


def with_timeouts(
    provider: str, *, on_provider: int | None = None, on_model: int | None = None
) -> Catalogue:
    """The shipped catalogue with attempt timeouts set on one provider and/or its models."""
    providers = []
    for spec in CATALOGUE.providers:
        if spec.name == provider:
            models = [m.model_copy(update={"attempt_timeout_ms": on_model}) for m in spec.models]
            providers.append(
                spec.model_copy(update={"attempt_timeout_ms": on_provider, "models": models})
            )
        else:
            providers.append(spec)
    return CATALOGUE.model_copy(update={"providers": providers})


FIRST = created_flow().state.attempts[0]


def dispatched(job: Job) -> JobEvent:
    return [e for e in job.events if e.type == "dispatched"][-1]


def test_the_policy_attempt_timeout_applies_when_nothing_overrides_it() -> None:
    job = created_flow().state
    event = dispatched(job)
    assert (event.data["timeout_ms"], event.data["timeout_source"]) == (
        POLICY.attempt_timeout_ms,
        "policy",
    )
    assert job.attempts[0].timeout_ms == POLICY.attempt_timeout_ms


def test_a_provider_attempt_timeout_overrides_the_policy() -> None:
    ctx = Context(catalogue=with_timeouts(FIRST.provider, on_provider=5_000), policy=POLICY)
    flow = created_flow(ctx=ctx)
    attempt = flow.state.attempts[0]
    assert attempt.provider == FIRST.provider
    assert attempt.timeout_ms == 5_000
    assert attempt.timeout_at == T0 + timedelta(seconds=5)
    assert (dispatched(flow.state).data["timeout_source"]) == "provider"
    (entry,) = [e for e in flow.state.outbox if e.topic == "dispatch"]
    assert Dispatch.model_validate(wire(flow.state, entry)).timeout_ms == 5_000
    # The answer time counts from the start, with the provider's timeout, not the policy's.
    flow.started(at=secs(2))
    assert flow.state.attempts[0].timeout_at == secs(7)
    decision = flow.tick(secs(7))
    assert decision.outcome == "attempt_timed_out"
    error = flow.state.attempts[0].error
    assert error is not None
    assert error.message == f"no answer from {FIRST.provider} within 5000 ms"


def test_a_model_attempt_timeout_overrides_the_provider() -> None:
    catalogue = with_timeouts(FIRST.provider, on_provider=5_000, on_model=7_000)
    flow = created_flow(ctx=Context(catalogue=catalogue, policy=POLICY))
    assert flow.state.attempts[0].timeout_ms == 7_000
    assert dispatched(flow.state).data["timeout_source"] == "model"


def test_the_request_attempt_timeout_overrides_the_catalogue() -> None:
    catalogue = with_timeouts(FIRST.provider, on_provider=5_000, on_model=7_000)
    flow = created_flow(
        make_request(attempt_timeout_ms=2_500), ctx=Context(catalogue=catalogue, policy=POLICY)
    )
    assert flow.state.attempts[0].timeout_ms == 2_500
    assert flow.state.attempts[0].timeout_at == T0 + timedelta(milliseconds=2_500)
    assert dispatched(flow.state).data["timeout_source"] == "request"


def test_the_deadline_caps_the_attempt_timeout() -> None:
    flow = created_flow(make_request(attempt_timeout_ms=60_000, deadline_ms=4_000))
    assert flow.state.attempts[0].timeout_ms == 4_000
    assert dispatched(flow.state).data["timeout_source"] == "deadline"
    # A retry later in the job gets what is left of the deadline.
    flow.fail("rate_limited", at=secs(1))
    assert flow.state.retry_at is not None
    flow.tick(flow.state.retry_at)
    retry = flow.state.attempts[1]
    assert retry.timeout_ms == 4_000 - int((retry.dispatched_at - T0).total_seconds() * 1000)
    assert dispatched(flow.state).data["timeout_source"] == "deadline"


def test_a_fallback_target_gets_its_own_providers_timeout() -> None:
    plan = created_flow().state.plan
    catalogue = with_timeouts(plan[0].provider, on_provider=9_000)
    flow = created_flow(ctx=Context(catalogue=catalogue, policy=POLICY))
    assert flow.state.attempts[0].timeout_ms == POLICY.attempt_timeout_ms
    flow.fail("quota_exhausted", at=secs(1))
    second = flow.state.attempts[1]
    assert second.target == plan[0]
    assert second.timeout_ms == 9_000
    assert dispatched(flow.state).data["timeout_source"] == "provider"


@pytest.mark.parametrize("value", [0, 999, 600_001])
def test_a_request_attempt_timeout_outside_1s_to_10min_is_rejected(value: int) -> None:
    with pytest.raises(ValueError, match="attempt_timeout_ms"):
        make_request(attempt_timeout_ms=value)


def test_an_unset_attempt_timeout_leaves_the_fingerprint_as_it_was() -> None:
    plain = make_request()
    assert "attempt_timeout_ms" in ADDED_FIELDS  # unset, it stays out of the fingerprint
    assert make_request(attempt_timeout_ms=None).fingerprint() == plain.fingerprint()
    assert make_request(attempt_timeout_ms=5_000).fingerprint() != plain.fingerprint()


# -- outcome: why a job ended --------------------------------------------------------------------


def outcome_of(job: Job) -> Any:
    assert job.final is not None and job.final.outcome is not None
    return job.final.outcome


def terminal_event(job: Job) -> JobEvent:
    (event,) = [e for e in job.events if e.type in TERMINAL_EVENTS]
    return event


def test_all_providers_failing_says_the_attempt_budget_ran_out_and_what_was_left_untried() -> None:
    flow = created_flow()
    plan = list(flow.state.plan)
    fail_until_terminal(flow)
    job = flow.state
    outcome = outcome_of(job)
    budget = POLICY.retry.max_attempts_per_job
    assert outcome.reason == "attempt_budget_exhausted"
    assert (outcome.attempts_used, outcome.attempts_allowed) == (budget, budget)
    assert f"all {budget} of {budget} attempts" in outcome.detail
    tried = {a.target for a in job.attempts}
    untried = [t for t in plan if t not in tried]
    assert untried, "the shipped catalogue has a target the budget never reaches"
    assert [(u.provider, u.model, u.reason) for u in outcome.untried_targets] == [
        (t.provider, t.model, "attempt_budget_exhausted") for t in untried
    ]
    event = terminal_event(job)
    assert event.type == "failed"
    assert event.data["reason"] == "attempt_budget_exhausted"
    assert event.data["outcome"] == outcome.model_dump(mode="json")
    # The error is still the last attempt's, as before.
    assert job.final is not None and job.final.error == job.attempts[-1].error


def test_a_plan_tried_to_its_end_says_targets_exhausted() -> None:
    flow = created_flow(make_request(constraints={"providers": {"allow": ["sim-fast"]}}))
    fail_until_terminal(flow)
    outcome = outcome_of(flow.state)
    assert outcome.reason == "targets_exhausted"
    assert (outcome.attempts_used, outcome.untried_targets) == (2, [])
    assert "no target of the plan is left" in outcome.detail


def test_a_non_retryable_error_says_so() -> None:
    flow = created_flow()
    flow.fail("invalid_request", at=secs(1))
    outcome = outcome_of(flow.state)
    assert outcome.reason == "non_retryable_error"
    assert "invalid_request" in outcome.detail
    assert outcome.attempts_used == 1
    assert [(u.provider, u.model) for u in outcome.untried_targets] == [
        (t.provider, t.model) for t in flow.state.plan
    ]
    assert terminal_event(flow.state).data["reason"] == "non_retryable_error"


def test_no_eligible_target_lists_every_exclusion_with_its_reason() -> None:
    flow = Flow()
    flow.create(make_request(constraints={"capabilities": ["teleportation"]}))
    job = flow.state
    outcome = outcome_of(job)
    assert outcome.reason == "no_eligible_target"
    assert outcome.attempts_used == 0
    assert [(e.provider, e.model, e.reason_code) for e in outcome.excluded] == [
        (e.provider, e.model, e.reason_code) for e in job.decisions[0].excluded
    ]
    assert {e.reason_code for e in outcome.excluded} == {"capability_missing", "disabled"}
    assert job.final is not None
    assert job.final.cost.attempts == []
    total = job.final.cost.total
    assert total is not None and total.amount == 0 and total.reason
    assert terminal_event(job).data["reason"] == "no_eligible_target"


def test_a_deadline_says_deadline_and_leaves_the_plan_untried() -> None:
    flow = created_flow(make_request(deadline_ms=5_000))
    plan = list(flow.state.plan)
    flow.tick(secs(5))
    outcome = outcome_of(flow.state)
    assert flow.state.status is JobStatus.EXPIRED
    assert outcome.reason == "deadline"
    assert "5000 ms" in outcome.detail
    assert [(u.provider, u.reason) for u in outcome.untried_targets] == [
        (t.provider, "deadline") for t in plan
    ]
    assert terminal_event(flow.state).data["reason"] == "deadline"


def test_a_cancel_says_who_cancelled() -> None:
    flow = created_flow()
    flow.apply(
        CancelJob(
            command_id="cancel-http",
            job_id=flow.state.job_id,
            at=secs(1),
            tenant_id=TENANT,
            reason="user pressed stop",
            source="http",
        )
    )
    outcome = outcome_of(flow.state)
    assert outcome.reason == "cancelled"
    assert outcome.cancelled_by == f"tenant {TENANT} via http"
    assert "user pressed stop" in outcome.detail
    assert terminal_event(flow.state).data["reason"] == "cancelled"


def test_a_cancel_without_tenant_or_source_still_says_who() -> None:
    flow = created_flow()
    flow.cancel(at=secs(1), tenant_id=None)
    assert outcome_of(flow.state).cancelled_by == "a producer"


def test_an_internal_failure_says_internal() -> None:
    flow = created_flow()
    tick = Tick(command_id="tick-x", job_id=flow.state.job_id, at=secs(1))
    decision = fail_internal(flow.state, tick, CTX, "KeyError")
    assert decision.job is not None
    outcome = outcome_of(decision.job)
    assert outcome.reason == "internal"
    assert "KeyError" in outcome.detail
    assert terminal_event(decision.job).data["reason"] == "internal"


def test_a_completed_job_says_completed_with_nothing_untried() -> None:
    flow = created_flow()
    flow.completed(at=secs(1))
    outcome = outcome_of(flow.state)
    assert outcome.reason == "completed"
    assert (outcome.attempts_used, outcome.untried_targets) == (1, [])
    assert terminal_event(flow.state).data["reason"] == "completed"


def test_targets_skipped_for_an_open_circuit_are_listed_as_untried() -> None:
    flow = created_flow()
    plan = list(flow.state.plan)
    health = {
        t.provider: ProviderHealth(
            provider=t.provider, circuit="open", opened_at=T0, error_rate=0.9, samples=10
        )
        for t in plan
    }
    flow.ctx = Context(catalogue=CATALOGUE, policy=POLICY, health=health)
    flow.fail("quota_exhausted", at=secs(1))
    outcome = outcome_of(flow.state)
    assert outcome.reason == "targets_exhausted"
    assert [(u.provider, u.reason) for u in outcome.untried_targets] == [
        (t.provider, "circuit_open") for t in plan
    ]


# -- the cost of every attempt -------------------------------------------------------------------


def test_a_provider_error_without_usage_costs_zero_saying_why() -> None:
    flow = created_flow()
    flow.fail("provider_internal", at=secs(1))
    cost = flow.state.attempts[0].cost
    assert cost is not None
    assert (cost.amount, cost.estimated) == (Decimal(0), False)
    assert cost.reason is not None and "nothing billed" in cost.reason


def test_a_failure_that_reports_usage_is_priced_as_an_estimate() -> None:
    flow = created_flow()
    attempt = flow.state.attempts[0]
    flow.fail("provider_internal", at=secs(1), raw_usage={"input_tokens": 1000, "output_tokens": 0})
    cost = flow.state.attempts[0].cost
    model = CATALOGUE.model(attempt.provider, attempt.model)
    assert cost is not None and model is not None and model.prices is not None
    assert cost.amount == 1000 * model.prices.input_per_mtok / Decimal(1_000_000)
    assert cost.estimated is True
    assert cost.reason is not None and "reported with its provider_internal" in cost.reason


def test_a_timed_out_attempt_costs_unknown_with_a_reason() -> None:
    flow = created_flow()
    flow.started(at=secs(1))
    flow.tick(flow.state.attempts[0].expires_at)
    cost = flow.state.attempts[0].cost
    assert cost is not None
    assert (cost.amount, cost.estimated) == (None, True)
    assert cost.reason is not None and cost.reason.startswith("unknown: timed out")


def test_a_cancelled_attempt_costs_unknown_with_a_reason() -> None:
    flow = created_flow()
    flow.started(at=secs(1))
    flow.cancel(at=secs(2))
    job = flow.state
    cost = job.attempts[0].cost
    assert cost is not None and cost.amount is None
    assert cost.reason is not None and "cancelled while running" in cost.reason
    assert job.final is not None
    (listed,) = job.final.cost.attempts
    assert (listed.status, listed.cost) == ("CANCELLED", cost)
    total = job.final.cost.total
    assert total is not None and total.amount is None and total.reason


def test_the_job_cost_lists_every_attempt_and_sums_them() -> None:
    flow = created_flow()
    fail_until_terminal(flow)
    job = flow.state
    assert job.final is not None
    listed = job.final.cost.attempts
    assert [(c.attempt_id, c.status) for c in listed] == [
        (a.attempt_id, "FAILED") for a in job.attempts
    ]
    assert all(c.cost.amount == 0 and c.cost.reason for c in listed)
    total = job.final.cost.total
    assert total is not None
    assert (total.amount, total.estimated) == (Decimal(0), False)


def test_a_completed_job_after_a_timeout_sums_to_a_lower_bound() -> None:
    flow = created_flow()
    flow.tick(flow.state.attempts[0].expires_at)  # timed out: unknown
    retry_at = flow.state.retry_at
    assert retry_at is not None
    flow.tick(retry_at)
    flow.completed(at=retry_at + timedelta(seconds=1))
    job = flow.state
    assert job.final is not None
    won = job.attempts[1].cost
    total = job.final.cost.total
    assert total is not None and won is not None
    assert total.amount == won.amount
    assert total.estimated is True
    assert total.reason == "1 of 2 attempts have no known price; amount is a lower bound"


# -- providers that cannot be routed to or sent to -----------------------------------------------


def test_an_enabled_provider_without_credentials_is_excluded_with_the_reason() -> None:
    unavailable = {
        FIRST.provider: Unavailable("missing_credentials", f"{FIRST.provider} has no key")
    }
    flow = created_flow(ctx=Context(catalogue=CATALOGUE, policy=POLICY, unavailable=unavailable))
    job = flow.state
    assert all(a.provider != FIRST.provider for a in job.attempts)
    assert all(t.provider != FIRST.provider for t in job.plan)
    excluded = [e for e in job.decisions[0].excluded if e.provider == FIRST.provider]
    assert excluded
    assert {(e.reason_code, e.reason) for e in excluded} == {
        ("missing_credentials", f"{FIRST.provider} has no key")
    }


def test_a_fallback_passes_over_a_provider_that_lost_its_credentials() -> None:
    flow = created_flow()
    gone, after = flow.state.plan[0], flow.state.plan[1]
    flow.ctx = Context(
        catalogue=CATALOGUE,
        policy=POLICY,
        unavailable={gone.provider: Unavailable("missing_credentials", "no key")},
    )
    flow.fail("quota_exhausted", at=secs(1))
    assert flow.state.attempts[-1].target == after
    fallback = next(e for e in flow.state.events if e.type == "fallback")
    assert fallback.data["skipped"] == [{**gone.model_dump(), "reason": "missing_credentials"}]


def test_resolve_providers_switches_on_from_the_environment_and_checks_keys() -> None:
    resolved = resolve_providers(CATALOGUE, enable=["openai"], env={})
    openai = resolved.catalogue.provider("openai")
    assert openai is not None and openai.enabled
    assert resolved.unavailable["openai"].reason_code == "missing_credentials"
    assert "OPENAI_API_KEY" in resolved.unavailable["openai"].reason
    assert "openai" not in resolved.routable()
    keyed = resolve_providers(CATALOGUE, enable=["openai"], env={"OPENAI_API_KEY": "sk-x"})
    assert keyed.unavailable == {}
    assert "openai" in keyed.routable()
    anthropic = keyed.catalogue.provider("anthropic")
    assert anthropic is not None and not anthropic.enabled  # not named: as the catalogue says
    assert "anthropic" not in keyed.unavailable  # disabled providers need no key


def test_resolve_providers_refuses_an_unknown_name() -> None:
    with pytest.raises(ConfigError, match="cannot enable nope"):
        resolve_providers(CATALOGUE, enable=["nope"], env={})


def test_an_undeliverable_dispatch_fails_its_attempt_at_once_and_falls_back() -> None:
    flow = created_flow()
    job = flow.state
    first, next_target = job.attempts[0], job.plan[0]
    decision = fail_undeliverable(job, {first.provider: "no topic"}, CTX, T0)
    assert decision is not None and decision.job is not None
    after = decision.job
    failed = after.attempts[0]
    assert failed.status is AttemptStatus.FAILED
    assert failed.error is not None
    assert failed.error.code is ErrorCode.DISPATCH_FAILED
    assert failed.error.message == f"the dispatch to {first.provider} could not be sent: no topic"
    assert failed.cost is not None and failed.cost.amount == 0
    assert after.attempts[1].target == next_target
    assert after.status is JobStatus.DISPATCHED
    dispatch_entries = [e for e in after.outbox if e.topic == "dispatch"]
    assert [e.provider for e in dispatch_entries] == [next_target.provider]
    assert event_types(after)[-3:] == ["attempt_failed", "fallback", "dispatched"]
    # Nothing undeliverable left: nothing to do.
    assert fail_undeliverable(after, {first.provider: "no topic"}, CTX, T0) is None


def test_when_no_dispatch_can_be_sent_the_job_fails_saying_why() -> None:
    flow = created_flow()
    everyone = {p.name: "no topic" for p in CATALOGUE.providers}
    decision = fail_undeliverable(flow.state, everyone, CTX, T0)
    assert decision is not None and decision.job is not None
    job = decision.job
    assert job.status is JobStatus.FAILED
    assert all(a.error and a.error.code is ErrorCode.DISPATCH_FAILED for a in job.attempts)
    assert not [e for e in job.outbox if e.topic in ("dispatch", "provider_cancel")]
    outcome = outcome_of(job)
    assert outcome.reason == "targets_exhausted"
    assert job.final is not None and job.final.error is not None
    assert job.final.error.code is ErrorCode.DISPATCH_FAILED
