"""The JSON shapes clients read: the same whatever provider ran the job."""

from __future__ import annotations

from typing import Any

from domain.job import Attempt, Job


def timestamp(value: Any) -> str | None:
    """RFC 3339 in UTC with `Z`, as pydantic writes the final response and the events."""
    if value is None:
        return None
    text: str = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def attempt_body(attempt: Attempt) -> dict[str, Any]:
    return {
        "attempt_id": attempt.attempt_id,
        "attempt_no": attempt.attempt_no,
        "provider": attempt.provider,
        "model": attempt.model,
        "state": attempt.status.value,
        "dispatched_at": timestamp(attempt.dispatched_at),
        "started_at": timestamp(attempt.started_at),
        "finished_at": timestamp(attempt.finished_at),
        "latency_ms": attempt.latency_ms,
        "error": attempt.error.model_dump(mode="json") if attempt.error else None,
        "cost": attempt.cost.model_dump(mode="json") if attempt.cost else None,
    }


def status_body(job: Job) -> dict[str, Any]:
    """Everything about a job but its output and timeline."""
    routing = None
    if job.decisions:
        first = job.decisions[0]
        routing = {
            "policy_version": first.policy_version,
            "catalogue_version": first.catalogue_version,
            "preference": first.preference,
            "chosen": first.chosen.model_dump() if first.chosen else None,
            "fallback_plan": [t.model_dump() for t in first.fallback_plan],
            "candidates": [
                {"provider": c.provider, "model": c.model, "score": c.score}
                for c in first.candidates
            ],
            "excluded": [
                {"provider": e.provider, "model": e.model, "reason": e.reason_code}
                for e in first.excluded
            ],
        }
    return {
        "job_id": job.job_id,
        "request_id": job.request_id,
        "tenant_id": job.tenant_id,
        "state": job.status.value,
        "terminal": job.terminal,
        "created_at": timestamp(job.created_at),
        "updated_at": timestamp(job.updated_at),
        "deadline_at": timestamp(job.deadline_at),
        "transitions": {state: timestamp(at) for state, at in job.status_times.items()},
        "attempts": [attempt_body(a) for a in job.attempts],
        "routing": routing,
        "error": job.final.error.model_dump(mode="json") if job.final and job.final.error else None,
        "links": links(job.job_id),
    }


def links(job_id: str) -> dict[str, str]:
    return {
        "self": f"/jobs/{job_id}",
        "result": f"/jobs/{job_id}/result",
        "events": f"/jobs/{job_id}/events",
        "timeline": f"/jobs/{job_id}/timeline",
    }


def accepted_body(job_id: str, state: str, **flags: bool) -> dict[str, Any]:
    """The body of a 202: the job, its state now, what happened, where to look next."""
    return {"job_id": job_id, "state": state, **flags, "links": links(job_id)}


def events_body(job: Job, after: int) -> dict[str, Any]:
    events = [e.model_dump(mode="json") for e in job.events if e.seq > after]
    return {
        "job_id": job.job_id,
        "state": job.status.value,
        "events": events,
        "last_seq": job.seq,
        "ignored_events": job.ignored_events,
    }
