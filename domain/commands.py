"""Commands of the job agent: every input about a job, re-keyed by job_id onto one topic."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from domain.messages import JobRequest, ProviderResult, TraceContext


class _Command(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    command_id: str = Field(min_length=1, max_length=256)
    job_id: str
    at: AwareDatetime

    @field_validator("at")
    @classmethod
    def _sane_time(cls, value: datetime) -> datetime:
        # Deadlines and timeouts are added to it: a time near the end of the calendar overflows.
        if not 2000 <= value.year <= 9000:
            raise ValueError("a command's time must fall in the years 2000 to 9000")
        return value


class CreateJob(_Command):
    """A validated request accepted from intake or HTTP."""

    kind: Literal["create"] = "create"
    tenant_id: str
    fingerprint: str
    request: JobRequest
    trace: TraceContext = Field(default_factory=TraceContext)
    source: str = "kafka"


class RecordResult(_Command):
    """A provider result event, re-keyed by job_id."""

    kind: Literal["result"] = "result"
    result: ProviderResult


class Tick(_Command):
    """A timer fired for this job: deadlines, backoff and attempt timeouts are checked at `at`."""

    kind: Literal["tick"] = "tick"


class CancelJob(_Command):
    kind: Literal["cancel"] = "cancel"
    tenant_id: str | None = None
    reason: str = "cancelled by client"
    #: Where the cancel came from (`http`, `kafka`); None in commands written before.
    source: str | None = None


class MarkPublished(_Command):
    """The outbox entries named here reached Kafka; drop them from the job's outbox."""

    kind: Literal["published"] = "published"
    entry_ids: list[str]


class RecordWebhook(_Command):
    """One attempt at delivering the job's completion webhook, from the webhook sender.

    `outcome`: `delivered` (2xx), `failed` (will be retried) or `gave_up` (no more attempts).
    """

    kind: Literal["webhook"] = "webhook"
    delivery_id: str = Field(min_length=1, max_length=256)
    attempt: int = Field(ge=1)
    outcome: Literal["delivered", "failed", "gave_up"]
    status_code: int | None = None
    latency_ms: int | None = Field(default=None, ge=0)
    error: str | None = Field(default=None, max_length=1000)
    next_attempt_at: AwareDatetime | None = None


Command = Annotated[
    CreateJob | RecordResult | Tick | CancelJob | MarkPublished | RecordWebhook,
    Field(discriminator="kind"),
]
