"""The state of one job: attempts, routing decisions, timeline and outbox, as one frozen value."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from domain.errors import CanonicalError
from domain.lifecycle import AttemptStatus, JobStatus
from domain.messages import FinalResponse, JobEvent, JobRequest, Output, TraceContext
from domain.money import Cost
from domain.routing import RoutingDecision, Target
from domain.usage import Usage

#: How many processed command ids a job remembers to recognise a redelivered command.
SEEN_COMMANDS = 64
#: Ignored duplicates and late results recorded in the timeline before they are only counted.
MAX_IGNORED_EVENTS = 50

OutboxTopic = Literal["dispatch", "provider_cancel", "events", "responses", "webhook"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Attempt(_Frozen):
    attempt_id: str
    attempt_no: int
    provider: str
    model: str
    provider_kind: str
    provider_attempt_no: int
    status: AttemptStatus
    dispatched_at: datetime
    timeout_at: datetime
    published_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    output: Output | None = None
    usage: Usage | None = None
    cost: Cost | None = None
    error: CanonicalError | None = None
    latency_ms: int | None = None
    result_event_ids: list[str] = Field(default_factory=list)
    #: When a dispatched attempt that has not started times out (policy `start_timeout_ms`).
    start_by: datetime | None = None
    #: How long the provider has to answer once it started the attempt (request, model, provider
    #: or policy, capped by the job's deadline); None in rows written before: the policy's.
    timeout_ms: int | None = None

    @property
    def waiting_to_start(self) -> bool:
        """Dispatched, not started yet, and held to a start timeout rather than an answer time."""
        return self.status is AttemptStatus.DISPATCHED and self.start_by is not None

    @property
    def expires_at(self) -> datetime:
        """When this attempt times out if no answer comes: its start timeout until it starts."""
        if self.waiting_to_start and self.start_by is not None:
            return self.start_by
        return self.timeout_at

    @property
    def target(self) -> Target:
        return Target(provider=self.provider, model=self.model)


class OutboxEntry(_Frozen):
    """A message the job owes to a topic, kept until a later command marks it published.

    It names what to send (an event by seq, an attempt's dispatch or cancel, the final response)
    rather than copying it: `domain.outbox.render` builds the message from the job's state.
    """

    entry_id: str
    topic: OutboxTopic
    provider: str | None = None
    attempt_id: str | None = None
    seq: int | None = None
    reason: str | None = None
    created_at: datetime


class Job(_Frozen):
    schema_version: Literal[1] = 1
    job_id: str
    tenant_id: str
    request_id: str
    fingerprint: str
    request: JobRequest
    trace: TraceContext
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    deadline_at: datetime | None
    status_times: dict[str, datetime] = Field(default_factory=dict)
    attempts: list[Attempt] = Field(default_factory=list)
    decisions: list[RoutingDecision] = Field(default_factory=list)
    plan: list[Target] = Field(default_factory=list)
    retry_at: datetime | None = None
    retry_target: Target | None = None
    events: list[JobEvent] = Field(default_factory=list)
    ignored_events: int = 0
    outbox: list[OutboxEntry] = Field(default_factory=list)
    seen_commands: list[str] = Field(default_factory=list)
    final: FinalResponse | None = None

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    def attempt(self, attempt_id: str) -> Attempt | None:
        for attempt in self.attempts:
            if attempt.attempt_id == attempt_id:
                return attempt
        return None

    def next_wake(self) -> datetime | None:
        """Return the earliest time a timer must look at this job again, if any."""
        if self.terminal:
            return None
        times = [t for t in (self.deadline_at, self.retry_at) if t is not None]
        current = self.current
        if current is not None and current.status.live:
            times.append(current.expires_at)
        return min(times) if times else None
