"""Render a job's outbox entries into the messages they stand for."""

from __future__ import annotations

from pydantic import BaseModel

from domain.ids import idempotency_key
from domain.job import Job, OutboxEntry
from domain.messages import Dispatch, ProviderCancel, WebhookDelivery
from domain.webhooks import delivery_id


class UnrenderableEntry(ValueError):
    """An outbox entry names something the job does not hold (a bug, or a corrupted state)."""


def render(job: Job, entry: OutboxEntry) -> BaseModel:
    """Build the message an outbox entry stands for, from the job's state alone."""
    if entry.topic == "events":
        if entry.seq is None or not 1 <= entry.seq <= len(job.events):
            raise UnrenderableEntry(f"{job.job_id}: no event {entry.seq}")
        return job.events[entry.seq - 1]
    if entry.topic == "responses":
        if job.final is None:
            raise UnrenderableEntry(f"{job.job_id}: no final response")
        return job.final
    if entry.topic == "webhook":
        callback = job.request.callback_url
        if job.final is None or callback is None:
            raise UnrenderableEntry(f"{job.job_id}: no final response or no callback_url")
        return WebhookDelivery(
            delivery_id=delivery_id(job.job_id),
            job_id=job.job_id,
            tenant_id=job.tenant_id,
            callback_url=callback,
            response=job.final,
            trace=job.trace,
        )
    attempt = job.attempt(entry.attempt_id or "")
    if attempt is None:
        raise UnrenderableEntry(f"{job.job_id}: no attempt {entry.attempt_id}")
    key = idempotency_key(job.job_id, attempt.attempt_id)
    if entry.topic == "provider_cancel":
        return ProviderCancel(
            job_id=job.job_id,
            attempt_id=attempt.attempt_id,
            idempotency_key=key,
            reason=entry.reason or "cancelled",
        )
    timeout = attempt.timeout_at - attempt.dispatched_at
    return Dispatch(
        job_id=job.job_id,
        attempt_id=attempt.attempt_id,
        attempt_no=attempt.attempt_no,
        provider_attempt_no=attempt.provider_attempt_no,
        tenant_id=job.tenant_id,
        provider=attempt.provider,
        model=attempt.model,
        idempotency_key=key,
        request=job.request,
        trace=job.trace,
        dispatched_at=attempt.dispatched_at,
        timeout_ms=int(timeout.total_seconds() * 1000),
    )
