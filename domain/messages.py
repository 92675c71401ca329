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

from domain.chat import (
    CANONICAL_FINISH_REASONS,
    ContentPart,
    FinishReason,
    ImagePart,
    ResponseFormat,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
    normalize_finish_reason,
)
from domain.errors import CanonicalError, ErrorCode
from domain.limits import INT_MAX, INT_MIN, METADATA, RAW_USAGE, check_tree
from domain.money import Cost, Money
from domain.usage import Usage
from domain.webhooks import check_callback_url

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

#: A model pin: "<provider>/<model>", or "<model>" for any provider serving that model.
ModelPin = Annotated[str, Field(min_length=1, max_length=193, pattern=r"^[A-Za-z0-9._:@/\-]+$")]
StopSequence = Annotated[str, Field(min_length=1, max_length=256)]

#: Outcomes a simulated provider understands besides the canonical error codes.
SIMULATED_OUTCOMES = frozenset({"ok", "hang", "duplicate", "tool_call"})


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class ChatMessage(Message):
    """One message of a conversation: text, or content parts (text and images, user only).

    A `tool` message answers the assistant's tool call named by `tool_call_id` (providers need
    it); an `assistant` message may carry the `tool_calls` it made (its `content` then may be "").
    """

    role: Role
    content: (
        Annotated[str, Field(max_length=2_000_000)]
        | Annotated[list[ContentPart], Field(min_length=1, max_length=256)]
    )
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=256)
    tool_calls: list[ToolCall] | None = Field(default=None, min_length=1, max_length=128)

    @model_validator(mode="after")
    def _role_fields(self) -> ChatMessage:
        # A tool message without tool_call_id is the form accepted before tool calls existed
        # (stored requests must still read): Anthropic gets it as user text, OpenAI refuses it.
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only a tool message has tool_call_id")
        if self.tool_calls is not None:
            if self.role != "assistant":
                raise ValueError("only an assistant message has tool_calls")
            for call in self.tool_calls:
                try:
                    arguments = orjson.loads(call.function.arguments)
                except orjson.JSONDecodeError:
                    arguments = None
                if not isinstance(arguments, dict):
                    raise ValueError(
                        f"tool call {call.id}: arguments must be a JSON object as text"
                    )
        if self.role != "user" and self.images():
            raise ValueError("only a user message can have image parts")
        return self

    def text(self) -> str:
        """The message's text: its content, or its text parts joined by newlines."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))

    def images(self) -> list[ImagePart]:
        if isinstance(self.content, str):
            return []
        return [p for p in self.content if isinstance(p, ImagePart)]


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


#: Optional JobRequest fields added after its first release: left out of the fingerprint when
#: unset, so a request re-sent after an upgrade is still the same job.
ADDED_FIELDS = (
    "attempt_timeout_ms",
    "model",
    "tools",
    "tool_choice",
    "response_format",
    "stop",
    "top_p",
    "seed",
    "user",
    "callback_url",
)
#: The same for the optional fields ChatMessage gained.
ADDED_MESSAGE_FIELDS = ("tool_call_id", "tool_calls")


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
    attempt_timeout_ms: int | None = Field(default=None, ge=1000, le=600_000)
    metadata: Metadata = Field(default_factory=dict)
    simulate: Simulate | None = None
    #: Pin: one target, or targets to try in this order (still subject to the constraints).
    model: ModelPin | Annotated[list[ModelPin], Field(min_length=1, max_length=16)] | None = None
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=128)
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
    stop: StopSequence | Annotated[list[StopSequence], Field(min_length=1, max_length=4)] | None = (
        None
    )
    top_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=INT_MIN, le=INT_MAX)
    user: str | None = Field(default=None, min_length=1, max_length=256)
    #: Where the final response is POSTed, signed, when the job ends (domain.webhooks).
    callback_url: Annotated[str, AfterValidator(check_callback_url)] | None = None

    @model_validator(mode="after")
    def _tools_agree(self) -> JobRequest:
        names = [tool.function.name for tool in self.tools or ()]
        dupes = sorted({name for name in names if names.count(name) > 1})
        if dupes:
            raise ValueError(f"tool names must be unique: {', '.join(dupes)}")
        if self.tool_choice is not None and not names:
            raise ValueError("tool_choice needs tools")
        if not isinstance(self.tool_choice, str | None):
            wanted = self.tool_choice.function.name
            if wanted not in names:
                raise ValueError(f"tool_choice names {wanted!r}, which is not among the tools")
        return self

    def pins(self) -> list[str]:
        """The model pin as an ordered list without repeats (empty when nothing is pinned)."""
        pins = [self.model] if isinstance(self.model, str) else list(self.model or ())
        return list(dict.fromkeys(pins))

    def fingerprint(self) -> str:
        """Hash of the payload: the same request_id with another fingerprint is a conflict."""
        # Fields added after v1 count only when set: an unchanged request keeps its fingerprint.
        unset = {name for name in ADDED_FIELDS if getattr(self, name) is None}
        body = self.model_dump(mode="json", exclude={"schema_version", *unset})
        for message in body["messages"]:
            for name in ADDED_MESSAGE_FIELDS:
                if message.get(name, ...) is None:
                    del message[name]
        return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def prompt_text(self) -> str:
        """The text of every message (text parts only): what token estimates are made from."""
        return "\n".join(m.text() for m in self.messages)


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
    """A provider's answer in one shape for every provider.

    `text` may be "" when the answer is only tool calls (`finish_reason` "tool_calls") or a
    refusal (`refusal` set, `finish_reason` "content_filter"). `provider_finish_reason` keeps
    what the provider said (OpenAI `finish_reason`, Anthropic `stop_reason`).
    """

    text: str
    finish_reason: FinishReason | None = None
    provider_finish_reason: str | None = Field(default=None, max_length=64)
    tool_calls: list[ToolCall] = Field(default_factory=list)
    refusal: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _canonical_finish_reason(cls, data: Any) -> Any:
        """Read a raw provider reason (as written before the vocabulary) as its canonical one."""
        if isinstance(data, dict):
            raw = data.get("finish_reason")
            if isinstance(raw, str) and raw not in CANONICAL_FINISH_REASONS:
                data = {
                    **data,
                    "finish_reason": normalize_finish_reason(raw),
                    "provider_finish_reason": data.get("provider_finish_reason") or raw[:64],
                }
        return data

    def generated_text(self) -> str:
        """Everything the model generated as text (answer, refusal, tool calls): usage estimates."""
        calls = "".join(c.function.name + c.function.arguments for c in self.tool_calls)
        return self.text + (self.refusal or "") + calls


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
    #: The attempt's final state (COMPLETED, FAILED, TIMED_OUT, CANCELLED); absent in older records.
    status: str | None = None


class JobCost(Message):
    """Every attempt's cost (zero, priced, estimated or unknown, each saying why) and their sum."""

    total: Cost | None
    attempts: list[AttemptCost] = Field(default_factory=list)


OutcomeReason = Literal[
    "completed",
    "attempt_budget_exhausted",
    "targets_exhausted",
    "non_retryable_error",
    "no_eligible_target",
    "deadline",
    "cancelled",
    "internal",
]


class UntriedTarget(Message):
    """A target of the job's routing plan that no attempt went to, and why."""

    provider: str
    model: str
    reason: str


class ExcludedTarget(Message):
    """A (provider, model) routing ruled out, with the routing reason code."""

    provider: str
    model: str
    reason_code: str
    reason: str


class JobOutcome(Message):
    """Why a job ended as it did, in words a client can act on."""

    reason: OutcomeReason
    detail: str
    attempts_used: int = Field(ge=0)
    attempts_allowed: int = Field(ge=0)
    untried_targets: list[UntriedTarget] = Field(default_factory=list)
    excluded: list[ExcludedTarget] = Field(default_factory=list)
    cancelled_by: str | None = None


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
    #: Why the job ended (absent in responses written before it existed).
    outcome: JobOutcome | None = None


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


class WebhookDelivery(Message):
    """A job's completion webhook, owed to its callback URL (cp.webhooks, key job_id).

    `delivery_id` is the same on every attempt (the `webhook-id` header): receivers dedup by it.
    """

    schema_version: Literal[1] = 1
    type: Literal["webhook_delivery"] = "webhook_delivery"
    delivery_id: str
    job_id: str
    tenant_id: str
    callback_url: str
    response: FinalResponse
    trace: TraceContext = Field(default_factory=TraceContext)


class HealthRecord(Message):
    """One attempt outcome as every worker reads it from the cluster's health topic (cp.health).

    The job core writes one per outcome inside the step's transaction, so an outcome counts once
    and only when its step committed; every worker folds the topic in its order
    (`domain.health.observe`), so all of them hold the same health and open the same circuits.
    """

    schema_version: Literal[1] = 1
    provider: str = Field(min_length=1, max_length=256)
    ok: bool
    latency_ms: int | None = Field(default=None, ge=0, le=2**31)
    at: AwareDatetime
    #: The job and the worker whose step saw it (to trace a circuit back to its causes).
    job_id: str | None = Field(default=None, max_length=256)
    worker: str | None = Field(default=None, max_length=1024)
