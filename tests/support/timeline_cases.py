"""Jobs for the timeline page, driven through `decide` at fixed times: the same page every run.

Shared by the HTML unit tests and the Chromium screenshot tests (whose reference images they
must match pixel for pixel, give or take antialiasing).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from domain.catalogue import load_catalogue
from domain.commands import CreateJob, RecordResult, Tick
from domain.decide import Context, decide
from domain.ids import job_id_for
from domain.job import Job
from domain.lifecycle import JobStatus
from domain.messages import JobRequest, Output, ProviderResult, RawProviderError
from domain.policy import load_policy

CONFIG = Path(__file__).resolve().parents[2] / "config"
CTX = Context(
    catalogue=load_catalogue(CONFIG / "catalogue.yaml"), policy=load_policy(CONFIG / "policy.yaml")
)
T0 = datetime(2026, 1, 1, tzinfo=UTC)
TENANT = "tenant-a"
#: Text of the request: the page must never show it, even when a provider echoes it.
SECRET_PROMPT = "Summarise the confidential merger memo for Zebulon Corp."


def at(ms: float) -> datetime:
    return T0 + timedelta(milliseconds=ms)


class Driver:
    """One job through `decide`, with unique command ids."""

    def __init__(self, request_id: str, **fields: Any) -> None:
        body: dict[str, Any] = {
            "request_id": request_id,
            "tenant_id": TENANT,
            "messages": [{"role": "user", "content": SECRET_PROMPT}],
            "preference": "cost",
            **fields,
        }
        request = JobRequest.model_validate(body)
        self.count = 0
        self.job: Job | None = None
        self.apply(
            CreateJob(
                command_id="create",
                job_id=job_id_for(TENANT, request_id),
                at=T0,
                tenant_id=TENANT,
                fingerprint=request.fingerprint(),
                request=request,
            )
        )

    @property
    def state(self) -> Job:
        assert self.job is not None
        return self.job

    def apply(self, command: Any) -> None:
        decision = decide(self.job, command, CTX)
        if decision.job is not None:
            self.job = decision.job

    def result(self, kind: str, ms: float, **fields: Any) -> None:
        self.count += 1
        attempt = self.state.current
        assert attempt is not None
        result = ProviderResult(
            type=kind,
            event_id=f"ev-{self.count}",
            job_id=self.state.job_id,
            attempt_id=attempt.attempt_id,
            provider=attempt.provider,
            model=attempt.model,
            occurred_at=at(ms),
            **fields,
        )
        self.apply(
            RecordResult(
                command_id=f"r-{self.count}", job_id=self.state.job_id, at=at(ms), result=result
            )
        )

    def started(self, ms: float) -> None:
        self.result("started", ms)

    def http_failure(self, ms: float, status: int, message: str, **raw: Any) -> None:
        error = RawProviderError(kind="http", http_status=status, message=message, **raw)
        self.result("failed", ms, error=error)

    def completed(self, ms: float) -> None:
        self.result(
            "completed",
            ms,
            output=Output(text="Done.", finish_reason="stop"),
            raw_usage={"input_tokens": 1200, "output_tokens": 300},
        )

    def tick(self, ms: float) -> None:
        self.count += 1
        self.apply(Tick(command_id=f"t-{self.count}", job_id=self.state.job_id, at=at(ms)))

    def tick_retry(self) -> float:
        """Tick at the job's retry time; return it in ms since T0."""
        assert self.state.status is JobStatus.RETRYING and self.state.retry_at is not None
        ms = (self.state.retry_at - T0).total_seconds() * 1000
        self.tick(ms)
        return ms


def fallback_job() -> Job:
    """sim-cheap fails twice with a 500 (a backoff between), then sim-fast answers."""
    d = Driver("case-fallback")
    d.started(40)
    d.http_failure(300, 500, "upstream server error, please retry")
    ms = d.tick_retry()
    d.started(ms + 30)
    d.http_failure(ms + 220, 503, f"overloaded while handling: {SECRET_PROMPT}")
    d.started(ms + 260)
    d.completed(ms + 900)
    assert d.state.status is JobStatus.COMPLETED, d.state.status
    return d.state


def deadline_job() -> Job:
    """One attempt that never answers: the deadline ends the job and cancels the attempt."""
    d = Driver("case-deadline", deadline_ms=2000)
    d.started(60)
    d.tick(2000)
    assert d.state.status is JobStatus.EXPIRED, d.state.status
    return d.state


def no_target_job() -> Job:
    """Nothing in the catalogue has the capability: no attempt is made."""
    d = Driver("case-no-target", constraints={"capabilities": ["teleportation"]})
    assert d.state.status is JobStatus.FAILED and not d.state.attempts
    return d.state


def failed_job() -> Job:
    """Rate limited (429, backoff), then overloaded, then refused: the job fails with each error."""
    d = Driver("case-failed")
    d.http_failure(150, 429, "rate limit reached for requests", retry_after="1")
    ms = d.tick_retry()
    d.started(ms + 20)
    now = ms + 400
    d.http_failure(now, 503, "the engine is currently overloaded")
    for _ in range(6):
        if d.state.terminal:
            break
        if d.state.status is JobStatus.RETRYING:
            now = d.tick_retry()
        now += 350
        d.http_failure(now, 401, "invalid api key provided", code="invalid_api_key")
    assert d.state.status is JobStatus.FAILED, d.state.status
    return d.state


CASES: dict[str, Callable[[], Job]] = {
    "fallback": fallback_job,
    "deadline": deadline_job,
    "no-target": no_target_job,
    "failed": failed_job,
}
