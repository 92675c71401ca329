"""The job lifecycle: the transition table, and properties of `decide` over random command logs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.catalogue import load_catalogue
from domain.codec import decode_command, encode
from domain.commands import CancelJob, CreateJob, MarkPublished, RecordResult, Tick
from domain.decide import Context, Decision, decide
from domain.ids import idempotency_key, job_id_for
from domain.job import Job
from domain.lifecycle import (
    TERMINAL,
    TRANSITIONS,
    AttemptStatus,
    JobStatus,
    can_transition,
)
from domain.messages import Dispatch, JobRequest, Output, ProviderResult, RawProviderError
from domain.outbox import render
from domain.policy import RetryPolicy, RoutingPolicy, load_policy

CONFIG = Path(__file__).resolve().parents[2] / "config"
CATALOGUE = load_catalogue(CONFIG / "catalogue.yaml")
POLICY = load_policy(CONFIG / "policy.yaml")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
TENANT = "tenant-a"
TERMINAL_EVENTS = frozenset({"completed", "failed", "cancelled", "expired"})
ENDINGS = (JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED)


# -- the transition table -------------------------------------------------------------------------


def test_every_status_has_a_row() -> None:
    assert set(TRANSITIONS) == set(JobStatus)


def test_terminal_statuses_have_no_way_out() -> None:
    assert {
        JobStatus.COMPLETED,
        JobStatus.FAILED,
        JobStatus.CANCELLED,
        JobStatus.EXPIRED,
    } == TERMINAL
    for status in JobStatus:
        assert status.terminal == (status in TERMINAL)
        assert (TRANSITIONS[status] == frozenset()) == status.terminal


@pytest.mark.parametrize("status", [s for s in JobStatus if not s.terminal])
def test_every_live_status_can_fail_cancel_or_expire(status: JobStatus) -> None:
    for ending in ENDINGS:
        assert can_transition(status, ending)


def test_no_status_returns_to_created_or_loops_on_itself() -> None:
    for status, targets in TRANSITIONS.items():
        assert JobStatus.CREATED not in targets
        assert status not in targets


def test_only_a_dispatched_or_started_job_completes() -> None:
    sources = {s for s, targets in TRANSITIONS.items() if JobStatus.COMPLETED in targets}
    assert sources == {JobStatus.DISPATCHED, JobStatus.STARTED}


def test_every_status_is_reachable_from_created() -> None:
    seen = {JobStatus.CREATED}
    frontier = [JobStatus.CREATED]
    while frontier:
        for target in TRANSITIONS[frontier.pop()]:
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(JobStatus)


@pytest.mark.parametrize("current", list(JobStatus))
@pytest.mark.parametrize("target", list(JobStatus))
def test_can_transition_reads_the_table(current: JobStatus, target: JobStatus) -> None:
    assert can_transition(current, target) == (target in TRANSITIONS[current])


def test_only_dispatched_and_started_attempts_are_live() -> None:
    assert {s for s in AttemptStatus if s.live} == {AttemptStatus.DISPATCHED, AttemptStatus.STARTED}


# -- random command logs --------------------------------------------------------------------------


def _policy(per_job: int, per_provider: int) -> RoutingPolicy:
    retry = RetryPolicy.model_validate(
        {
            **POLICY.retry.model_dump(),
            "max_attempts_per_job": per_job,
            "max_attempts_per_provider": per_provider,
        }
    )
    return POLICY.model_copy(update={"retry": retry})


POLICIES = (POLICY, _policy(2, 1), _policy(3, 3), _policy(6, 2))
REQUESTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "one_provider": {"constraints": {"providers": {"allow": ["sim-fast"]}}},
    "nothing_fits": {"constraints": {"capabilities": ["teleportation"]}},
}
CODES = (
    "provider_internal",
    "provider_internal",
    "rate_limited",
    "rate_limited",
    "overloaded",
    "timeout",
    "connection_error",
    "quota_exhausted",
    "context_length_exceeded",
    "invalid_request",
    "not-a-canonical-code",
)


@dataclass(frozen=True)
class Op:
    """One abstract step; `_resolve` makes it a concrete command against the current state."""

    kind: str
    dt_ms: int = 0
    result: str = "failed"
    target: str = "current"
    event: int | None = None
    code: str = "provider_internal"
    retry_after: str | None = None
    wrong_provider: bool = False
    tick_mode: str = "wake"
    tenant: str | None = TENANT
    mark: str = "all"
    same_fingerprint: bool = True
    index: int = 0


_small_dt = st.integers(0, 3_000)
_results = st.builds(
    Op,
    kind=st.just("result"),
    dt_ms=_small_dt,
    result=st.sampled_from(["failed", "failed", "started", "completed"]),
    target=st.sampled_from(["current"] * 6 + ["first", "previous", "unknown"]),
    event=st.sampled_from([None, None, None, 0, 1]),  # None: a fresh event id
    code=st.sampled_from(CODES),
    retry_after=st.sampled_from([None, None, "1", "3", "86400"]),
    wrong_provider=st.sampled_from([False] * 7 + [True]),
)
_ticks = st.builds(
    Op,
    kind=st.just("tick"),
    dt_ms=st.integers(0, 40_000),
    tick_mode=st.sampled_from(["wake", "wake", "advance"]),
)
_cancels = st.builds(
    Op, kind=st.just("cancel"), dt_ms=_small_dt, tenant=st.sampled_from([TENANT, None, "tenant-b"])
)
_marks = st.builds(
    Op, kind=st.just("mark"), dt_ms=_small_dt, mark=st.sampled_from(["all", "first", "events"])
)
_creates = st.builds(Op, kind=st.just("create"), dt_ms=_small_dt, same_fingerprint=st.booleans())
_redeliveries = st.builds(Op, kind=st.just("redeliver"), index=st.integers(0, 1_000))
#: Moves a job along: fails the live attempt, or ticks at the retry time of a waiting job.
_progress = st.builds(
    Op,
    kind=st.just("progress"),
    dt_ms=_small_dt,
    code=st.sampled_from(CODES),
    retry_after=st.none(),
)
#: Weighted by repetition: mostly provider results and timer ticks, now and then everything else.
OPS = st.lists(
    st.one_of(
        *[_progress] * 10,
        *[_results] * 16,
        *[_ticks] * 12,
        *[_marks] * 4,
        *[_redeliveries] * 4,
        *[_creates] * 2,
        _cancels,
    ),
    min_size=8,
    max_size=40,
)
SCENARIOS = st.fixed_dictionaries(
    {
        "policy": st.sampled_from(POLICIES),
        "request": st.sampled_from(["plain"] * 4 + ["one_provider", "nothing_fits"]),
        "deadline_ms": st.sampled_from([None, None, 20_000, 90_000]),
        "ops": OPS,
    }
)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _request(variant: str, deadline_ms: int | None, text: str = "Say hello.") -> JobRequest:
    return JobRequest.model_validate(
        {
            "request_id": "r-prop",
            "tenant_id": TENANT,
            "messages": [{"role": "user", "content": text}],
            "deadline_ms": deadline_ms,
            **REQUESTS[variant],
        }
    )


def _create(request: JobRequest, at: datetime, command_id: str) -> CreateJob:
    return CreateJob(
        command_id=command_id,
        job_id=job_id_for(TENANT, request.request_id),
        at=at,
        tenant_id=TENANT,
        fingerprint=request.fingerprint(),
        request=request,
    )


def _resolve(
    op: Op, job: Job, now: datetime, n: int, log: list[Any], scenario: dict[str, Any]
) -> Any:
    """Make the concrete command of one abstract step, given the state it will apply to."""
    cid = f"c{n}"
    at = now + timedelta(milliseconds=op.dt_ms)
    if op.kind == "redeliver":
        return log[op.index % len(log)]
    if op.kind == "progress":
        current = job.current
        if job.status is JobStatus.RETRYING and job.retry_at is not None:
            return Tick(command_id=cid, job_id=job.job_id, at=max(now, job.retry_at))
        if current is None or not current.status.live:
            return Tick(command_id=cid, job_id=job.job_id, at=at)
        op = Op(kind="result", dt_ms=op.dt_ms, code=op.code)
    if op.kind == "tick":
        wake = job.next_wake()
        if op.tick_mode == "wake" and wake is not None:
            at = max(now, wake)
        return Tick(command_id=cid, job_id=job.job_id, at=at)
    if op.kind == "cancel":
        return CancelJob(command_id=cid, job_id=job.job_id, at=at, tenant_id=op.tenant)
    if op.kind == "mark":
        ids = [e.entry_id for e in job.outbox]
        if op.mark == "first":
            ids = ids[:1]
        elif op.mark == "events":
            ids = [e.entry_id for e in job.outbox if e.topic == "events"]
        return MarkPublished(command_id=cid, job_id=job.job_id, at=at, entry_ids=ids)
    if op.kind == "create":
        text = "Say hello." if op.same_fingerprint else "Say something else."
        request = _request(scenario["request"], scenario["deadline_ms"], text)
        return _create(request, at, cid)
    attempts = job.attempts
    attempt = {
        "current": job.current,
        "first": attempts[0] if attempts else None,
        "previous": attempts[-2] if len(attempts) > 1 else job.current,
        "unknown": None,
    }[op.target]
    attempt_id = attempt.attempt_id if attempt else f"{job.job_id}-a99"
    provider = attempt.provider if attempt else "sim-fast"
    if op.wrong_provider:
        provider = "sim-elsewhere"
    fields: dict[str, Any] = {}
    if op.result == "completed":
        fields["output"] = Output(text="Hello!", finish_reason="stop")
        fields["raw_usage"] = {"input_tokens": 7, "output_tokens": 3}
    elif op.result == "failed":
        fields["error"] = RawProviderError(
            kind="simulated", code=op.code, retry_after=op.retry_after
        )
    result = ProviderResult(
        type=op.result,
        event_id=f"ev-{n}" if op.event is None else f"ev-dup-{op.event}",
        job_id=job.job_id,
        attempt_id=attempt_id,
        provider=provider,
        model=attempt.model if attempt else "swift-mini-sim",
        occurred_at=at,
        **fields,
    )
    return RecordResult(command_id=cid, job_id=job.job_id, at=at, result=result)


@dataclass(frozen=True)
class Step:
    command: Any
    before: Job
    decision: Decision
    after: Job


def _context(scenario: dict[str, Any]) -> Context:
    return Context(catalogue=CATALOGUE, policy=scenario["policy"])


def _generate(scenario: dict[str, Any]) -> tuple[list[Any], list[Job]]:
    """Turn the abstract ops into a command log, returning it with the state after each command."""
    ctx = _context(scenario)
    create = _create(_request(scenario["request"], scenario["deadline_ms"]), T0, "c-create")
    first = decide(None, create, ctx)
    assert first.job is not None
    job, now = first.job, T0
    log: list[Any] = [create]
    states = [job]
    for n, op in enumerate(scenario["ops"]):
        command = _resolve(op, job, now, n, log, scenario)
        now = max(now, command.at)
        decision = decide(job, command, ctx)
        job = decision.job or job
        log.append(command)
        states.append(job)
    return log, states


def _replay(log: list[Any], ctx: Context, *, twice: bool = False) -> list[Step]:
    steps: list[Step] = []
    job: Job | None = None
    for command in log:
        decision = decide(job, command, ctx)
        after = decision.job or job
        assert after is not None
        if twice:
            again = decide(after, command, ctx)
            assert (again.job or after) == after, f"applying {command.kind} twice changed the job"
        steps.append(Step(command, job or after, decision, after))
        job = after
    return steps


def _check_step(step: Step, latest: datetime, policy: RoutingPolicy) -> None:
    before, decision, after, command = step.before, step.decision, step.after, step.command
    retry = policy.retry

    # An unchanged decision leaves the job as it was.
    if decision.outcome in ("noop", "duplicate_command"):
        assert after == before
    if decision.outcome == "duplicate_command":
        assert decision.publish == tuple(before.outbox)
    if decision.outcome == "unknown_job":
        assert isinstance(command, CancelJob)
        assert decision.dead_letter is not None
        assert decision.dead_letter[0] == "unknown_job"

    # Terminal is forever; final is set exactly when terminal, and never changes once set.
    if before.terminal:
        assert after.status is before.status
        assert after.final == before.final
    assert (after.final is not None) == after.terminal
    terminal_events = [e for e in after.events if e.type in TERMINAL_EVENTS]
    assert len(terminal_events) == (1 if after.terminal else 0)
    assert after.next_wake() is None if after.terminal else after.next_wake() is not None

    # The timeline is append-only with seq 1, 2, 3, ... and legal state changes.
    if after.job_id == before.job_id and before is not after:
        assert after.events[: len(before.events)] == before.events
    assert [e.seq for e in after.events] == list(range(1, len(after.events) + 1))
    for a, b in pairwise(after.events):
        assert a.state == b.state or can_transition(JobStatus(a.state), JobStatus(b.state))
    assert after.events[-1].state == after.status.value

    # Attempt budgets, and at most one live attempt: the current one, never in a terminal job.
    assert len(after.attempts) <= retry.max_attempts_per_job
    per_provider = Counter(a.provider for a in after.attempts)
    assert all(n <= retry.max_attempts_per_provider for n in per_provider.values())
    live = [a for a in after.attempts if a.status.live]
    assert len(live) <= 1
    if live:
        assert live[0] is after.attempts[-1]
        assert not after.terminal
    assert [a.attempt_no for a in after.attempts] == list(range(1, len(after.attempts) + 1))
    assert (after.status is JobStatus.RETRYING) == (after.retry_at is not None)

    # Times come from commands: nothing is stamped later than the latest command seen.
    stamps = [*after.status_times.values(), after.updated_at, *(e.at for e in after.events)]
    stamps += [a.dispatched_at for a in after.attempts]
    stamps += [t for a in after.attempts for t in (a.started_at, a.finished_at) if t is not None]
    assert all(T0 <= t <= latest for t in stamps)
    assert after.status_times["CREATED"] == after.created_at == T0
    if after.final is not None:
        assert after.final.finished_at <= latest

    # Every effect published is also in the new state's outbox (until marked published), and
    # every pending entry can be rendered into its message from the state alone.
    if decision.outcome not in ("duplicate_command", "duplicate_request", "unknown_job"):
        outbox_ids = {e.entry_id for e in after.outbox}
        for entry in decision.publish:
            assert entry.entry_id in outbox_ids
            assert entry.created_at == command.at
    assert len({e.entry_id for e in after.outbox}) == len(after.outbox)
    for entry in [*after.outbox, *decision.publish]:
        message = render(after, entry)
        if entry.topic in ("dispatch", "provider_cancel"):
            attempt = after.attempt(entry.attempt_id or "")
            assert attempt is not None
            assert entry.provider == attempt.provider
            assert getattr(message, "attempt_id", None) == attempt.attempt_id
        if isinstance(message, Dispatch):
            assert attempt is not None
            assert (message.provider, message.model) == (attempt.provider, attempt.model)


def _new_dispatches(steps: list[Step]) -> list[Dispatch]:
    sent: list[Dispatch] = []
    for step in steps:
        if step.decision.outcome in ("duplicate_command", "duplicate_request"):
            continue  # the pending outbox offered again, not new dispatches
        for entry in step.decision.publish:
            if entry.topic == "dispatch":
                message = Dispatch.model_validate(render(step.after, entry).model_dump(mode="json"))
                assert entry.provider == message.provider
                sent.append(message)
    return sent


@PROPERTY
@given(SCENARIOS)
def test_random_command_logs_keep_the_lifecycle_invariants(scenario: dict[str, Any]) -> None:
    log, _states = _generate(scenario)
    steps = _replay(log, _context(scenario))
    latest = T0
    seen: set[str] = set()
    for step in steps:
        latest = max(latest, step.command.at)
        _check_step(step, latest, scenario["policy"])
        if step.command.command_id in seen:  # a redelivered command never changes the job
            assert step.after == step.before
            assert step.decision.outcome in ("duplicate_command", "noop", "unknown_job")
        seen.add(step.command.command_id)

    # Each attempt is dispatched once, to exactly the provider of that attempt.
    final = steps[-1].after
    assert Job.model_validate_json(final.model_dump_json()) == final  # the state survives storage
    sent = _new_dispatches(steps)
    assert len({m.attempt_id for m in sent}) == len(sent)
    assert [m.attempt_id for m in sent] == [a.attempt_id for a in final.attempts]
    for message, attempt in zip(sent, final.attempts, strict=True):
        assert (message.provider, message.model) == (attempt.provider, attempt.model)
        assert message.idempotency_key == idempotency_key(final.job_id, attempt.attempt_id)
        assert message.provider_attempt_no == attempt.provider_attempt_no


@PROPERTY
@given(SCENARIOS)
def test_replaying_a_log_gives_the_same_states(scenario: dict[str, Any]) -> None:
    log, states = _generate(scenario)
    first = _replay(log, _context(scenario))
    # The second replay reads the log back from bytes, as the agent does after a restart.
    decoded = [decode_command(encode(command)) for command in log]
    assert decoded == log
    second = _replay(decoded, _context(scenario))
    assert [s.after for s in first] == states
    assert [s.after for s in second] == states
    assert [(s.decision.outcome, s.decision.publish) for s in first] == [
        (s.decision.outcome, s.decision.publish) for s in second
    ]


@PROPERTY
@given(SCENARIOS)
def test_applying_every_command_twice_equals_applying_it_once(scenario: dict[str, Any]) -> None:
    log, states = _generate(scenario)
    twice = _replay(log, _context(scenario), twice=True)
    assert [s.after for s in twice] == states


@PROPERTY
@given(SCENARIOS)
def test_ticking_at_each_wake_time_always_ends_the_job(scenario: dict[str, Any]) -> None:
    log, states = _generate(scenario)
    ctx = _context(scenario)
    policy: RoutingPolicy = scenario["policy"]
    job = states[-1]
    latest = max(c.at for c in log)
    for n in range(4 * policy.retry.max_attempts_per_job + 4):
        wake = job.next_wake()
        if wake is None:
            break
        latest = max(latest, wake)
        tick = Tick(command_id=f"wake-{n}", job_id=job.job_id, at=latest)
        decision = decide(job, tick, ctx)
        assert decision.job is not None
        assert decision.outcome != "noop", "a wake-up time that changes nothing"
        _check_step(Step(tick, job, decision, decision.job), latest, policy)
        job = decision.job
    assert job.terminal, f"job stuck in {job.status}"
    assert job.final is not None


@PROPERTY
@given(
    policy=st.sampled_from(POLICIES),
    request=st.sampled_from(["plain", "one_provider"]),
    failures=st.lists(
        st.tuples(st.sampled_from(CODES), st.sampled_from([None, "1", "3", "7"]), st.booleans()),
        min_size=1,
        max_size=12,
    ),
)
def test_failing_every_attempt_ends_failed_within_the_budget(
    policy: RoutingPolicy, request: str, failures: list[tuple[str, str | None, bool]]
) -> None:
    """Fail (or time out) each attempt in turn: the job ends FAILED with the last error."""
    ctx = Context(catalogue=CATALOGUE, policy=policy)
    create = _create(_request(request, None), T0, "c-create")
    created = decide(None, create, ctx)
    assert created.job is not None
    job, now = created.job, T0
    steps = [Step(create, created.job, created, created.job)]
    plan = created.job.decisions[0].targets()
    for n in range(100):
        if job.terminal:
            break
        code, retry_after, by_timeout = failures[n % len(failures)]
        current = job.current
        assert current is not None
        command: Any
        if job.status is JobStatus.RETRYING:
            assert job.retry_at is not None
            now = max(now, job.retry_at)
            command = Tick(command_id=f"t{n}", job_id=job.job_id, at=now)
        elif by_timeout:
            now = max(now, current.expires_at)
            command = Tick(command_id=f"t{n}", job_id=job.job_id, at=now)
        else:
            now += timedelta(milliseconds=250)
            error = RawProviderError(kind="simulated", code=code, retry_after=retry_after)
            result = ProviderResult(
                type="failed",
                event_id=f"ev-{n}",
                job_id=job.job_id,
                attempt_id=current.attempt_id,
                provider=current.provider,
                model=current.model,
                occurred_at=now,
                error=error,
            )
            command = RecordResult(command_id=f"r{n}", job_id=job.job_id, at=now, result=result)
        decision = decide(job, command, ctx)
        assert decision.job is not None
        assert decision.outcome in ("attempt_failed", "attempt_timed_out", "retry_dispatched")
        steps.append(Step(command, job, decision, decision.job))
        _check_step(steps[-1], now, policy)
        job = decision.job
    assert job.status is JobStatus.FAILED
    assert 1 <= len(job.attempts) <= policy.retry.max_attempts_per_job
    # Attempts follow the routing plan: each provider's attempts are consecutive, in plan order.
    providers = [a.provider for a in job.attempts]
    order = list(dict.fromkeys(providers))
    assert order == [t.provider for t in plan][: len(order)]
    assert providers == sorted(providers, key=order.index)
    last = job.attempts[-1]
    assert job.final is not None
    assert job.final.error == last.error
    assert (job.final.provider, job.final.model) == (last.provider, last.model)
    sent = _new_dispatches(steps)
    assert [m.attempt_id for m in sent] == [a.attempt_id for a in job.attempts]
