"""Canonical messages that cross the control plane's boundary, one model per kind.

Every model is frozen, rejects unknown fields and carries `schema_version`; parsing of raw bytes
(with upcasting of old versions) lives in `domain.codec`.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
    model_validator,
)

from domain.errors import CanonicalError, ErrorCode
from domain.limits import METADATA, RAW_USAGE, check_tree
from domain.money import Cost, Money
from domain.usage import Usage

SCHEMA_VERSION = 1

Role = Literal["system", "user", "assistant", "tool"]
Preference = Literal["cost", "latency", "reliability", "balanced"]
Identifier = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@/\-]+$")]
ProviderName = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._\-]*$")
]

Capability = Annotated[str, Field(min_length=1, max_length=64)]
#: Free-form JSON, bounded (domain.limits): what is accepted is stored and read back whole.
Metadata = Annotated[
    dict[str, Any], AfterValidator(lambda value: check_tree(value, METADATA, name="metadata"))
]
RawUsage = Annotated[
    dict[str, Any], AfterValidator(lambda value: check_tree(value, RAW_USAGE, name="raw_usage"))
]

#: Outcomes a simulated provider understands besides the canonical error codes.
SIMULATED_OUTCOMES = frozenset({"ok", "hang", "duplicate"})


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class ChatMessage(Message):
    role: Role
    content: str = Field(max_length=2_000_000)


class ProviderFilter(Message):
    allow: list[ProviderName] | None = Field(default=None, max_length=64)
    deny: list[ProviderName] = Field(default_factory=list, max_length=64)


class Constraints(Message):
    capabilities: list[Capability] = Field(default_factory=list, max_length=32)
    max_cost: Money | None = None
    max_latency_ms: int | None = Field(default=None, gt=0)
    providers: ProviderFilter = Field(default_factory=ProviderFilter)


class Simulate(Message):
    """Script for the simulated provider; real providers ignore it."""

    outcomes: dict[ProviderName, Annotated[list[str], Field(max_length=64)]] = Field(
        default_factory=dict, max_length=16
    )
    latency_ms: int | None = Field(default=None, ge=0, le=600_000)
    usage: (
        dict[
            Annotated[str, Field(max_length=64)],
            Annotated[StrictInt, Field(ge=0, le=10**12)],
        ]
        | None
    ) = Field(default=None, max_length=32)

    @field_validator("outcomes")
    @classmethod
    def _known_outcomes(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        known = SIMULATED_OUTCOMES | {code.value for code in ErrorCode}
        for provider, outcomes in value.items():
            if not outcomes:
                raise ValueError(f"simulate.outcomes[{provider!r}] is empty")
            for outcome in outcomes:
                if outcome not in known:
                    raise ValueError(
                        f"unknown simulated outcome {outcome!r} for {provider!r}; "
                        f"use ok, hang, duplicate or a canonical error code"
                    )
        return value


class JobRequest(Message):
    """A canonical prompt job, as producers put it on `cp.intake` or POST it."""

    schema_version: Literal[1] = 1
    type: Literal["job"] = "job"
    request_id: Identifier
    tenant_id: Identifier | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_output_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    constraints: Constraints = Field(default_factory=Constraints)
    preference: Preference = "balanced"
    deadline_ms: int | None = Field(default=None, gt=0, le=7 * 24 * 3600 * 1000)
    metadata: Metadata = Field(default_factory=dict)
    simulate: Simulate | None = None

    def fingerprint(self) -> str:
        """Hash of the payload: the same request_id with another fingerprint is a conflict."""
        body = self.model_dump(mode="json", exclude={"schema_version"})
        return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def prompt_text(self) -> str:
        return "\n".join(m.content for m in self.messages)


class CancelRequest(Message):
    """Cancel a job, by job_id or by the client's request_id."""

    schema_version: Literal[1] = 1
    type: Literal["cancel"] = "cancel"
    tenant_id: Identifier | None = None
    job_id: Identifier | None = None
    request_id: Identifier | None = None
    reason: str | None = Field(default=None, max_length=500)

    @model_validator(mode="after")
    def _one_target(self) -> CancelRequest:
        if (self.job_id is None) == (self.request_id is None):
            raise ValueError("give exactly one of job_id or request_id")
        return self


class TraceContext(Message):
    """W3C trace context carried with a job across topics."""

    traceparent: str | None = Field(default=None, max_length=128)
    tracestate: str | None = Field(default=None, max_length=1024)


class Output(Message):
    text: str
    finish_reason: str | None = None


class Dispatch(Message):
    """One attempt of a job, sent to exactly one provider queue."""

    schema_version: Literal[1] = 1
    type: Literal["dispatch"] = "dispatch"
    job_id: str
    attempt_id: str
    attempt_no: int = Field(ge=1)
    provider_attempt_no: int = Field(ge=1, description="n-th attempt of this job on this provider")
    tenant_id: str
    provider: str
    model: str
    idempotency_key: str
    request: JobRequest
    trace: TraceContext = Field(default_factory=TraceContext)
    dispatched_at: AwareDatetime
    timeout_ms: int = Field(gt=0)


class ProviderCancel(Message):
    """Tells a provider queue to drop an attempt that is no longer wanted."""

    schema_version: Literal[1] = 1
    type: Literal["cancel"] = "cancel"
    job_id: str
    attempt_id: str
    idempotency_key: str
    reason: str


class RawProviderError(Message):
    """What the provider said when an attempt failed, before canonical mapping."""

    kind: Literal["http", "timeout", "connection", "malformed", "simulated"]
    http_status: int | None = None
    code: str | None = None
    message: str = ""
    body: str | None = Field(default=None, max_length=16_384)
    retry_after: str | None = None


class ProviderResult(Message):
    """An event from a provider worker about one attempt."""

    schema_version: Literal[1] = 1
    type: Literal["started", "completed", "failed"]
    event_id: str
    job_id: str
    attempt_id: str
    provider: str
    provider_kind: str = "simulated"
    model: str
    occurred_at: AwareDatetime
    output: Output | None = None
    raw_usage: RawUsage | None = None
    usage_shape: str | None = None
    error: RawProviderError | None = None
    latency_ms: int | None = Field(default=None, ge=0)
    trace: TraceContext = Field(default_factory=TraceContext)


class AttemptCost(Message):
    attempt_id: str
    provider: str
    model: str
    cost: Cost


class JobCost(Message):
    total: Cost | None
    attempts: list[AttemptCost] = Field(default_factory=list)


class FinalResponse(Message):
    """The one normalized answer of a job, identical in shape whatever the provider."""

    schema_version: Literal[1] = 1
    job_id: str
    request_id: str
    tenant_id: str
    state: str
    output: Output | None
    provider: str | None
    model: str | None
    usage: Usage | None
    cost: JobCost
    error: CanonicalError | None
    attempts: int
    created_at: datetime
    finished_at: datetime
    metadata: dict[str, Any] = Field(default_factory=dict)


class JobEvent(Message):
    """One immutable entry of a job's timeline."""

    schema_version: Literal[1] = 1
    job_id: str
    tenant_id: str
    seq: int = Field(ge=1)
    type: str
    at: datetime
    state: str
    attempt_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class DeadLetter(Message):
    """A record no agent could parse or apply, with why and where it came from."""

    schema_version: Literal[1] = 1
    reason: str
    detail: str
    topic: str
    partition: int | None = None
    offset: int | None = None
    key: str | None = None
    payload_b64: str
    payload_size: int
    at: datetime
