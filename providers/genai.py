"""Provider calls in the OpenTelemetry GenAI semantic conventions, for GenAI dashboards and viewers.

A provider call is a `chat` operation: its span is named "chat <model>" and carries the
`gen_ai.*` attributes (https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/), and
the provider worker's /metrics has the two client metrics of the conventions in Prometheus naming:
`gen_ai_client_operation_duration_seconds` and `gen_ai_client_token_usage`. The provider's name is
set as `gen_ai.provider.name` and, for viewers that read the older name, `gen_ai.system`: the
catalogue's `genai_provider_id` (a well-known value such as `openai`), else the catalogue name.
Only counts, names and parameters are recorded, never prompt or answer text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opentelemetry.util.types import AttributeValue
from yarl import URL

from domain.catalogue import Catalogue
from domain.messages import Dispatch
from domain.provider_errors import map_provider_error
from domain.usage import normalize_usage
from providers.base import Completed, Failed, Outcome

OPERATION = "chat"
#: Bucket boundaries the conventions advise for gen_ai.client.operation.duration (seconds).
DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
#: Bucket boundaries the conventions advise for gen_ai.client.token.usage (tokens).
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
#: `error.type` of a call that never answered (a hang: the job core times the attempt out).
NO_ANSWER = "timeout"


def provider_name(catalogue: Catalogue, provider: str) -> str:
    """`gen_ai.provider.name`: the catalogue's GenAI provider id, else the provider's own name."""
    spec = catalogue.provider(provider)
    return spec.genai_provider_id if spec is not None and spec.genai_provider_id else provider


def span_name(dispatch: Dispatch) -> str:
    return f"{OPERATION} {dispatch.model}"


def request_attributes(dispatch: Dispatch, catalogue: Catalogue) -> dict[str, AttributeValue]:
    """What is known before the call: operation, provider, model and the sampling parameters."""
    name = provider_name(catalogue, dispatch.provider)
    request = dispatch.request
    attributes: dict[str, AttributeValue] = {
        "gen_ai.operation.name": OPERATION,
        "gen_ai.provider.name": name,
        "gen_ai.system": name,
        "gen_ai.request.model": dispatch.model,
    }
    optional: dict[str, AttributeValue | None] = {
        "gen_ai.request.max_tokens": request.max_output_tokens,
        "gen_ai.request.temperature": request.temperature,
        "gen_ai.request.top_p": request.top_p,
        "gen_ai.request.seed": request.seed,
    }
    if request.stop is not None:
        optional["gen_ai.request.stop_sequences"] = (
            [request.stop] if isinstance(request.stop, str) else list(request.stop)
        )
    if request.response_format is not None:
        optional["gen_ai.output.type"] = (
            "text" if request.response_format.type == "text" else "json"
        )
    attributes.update({k: v for k, v in optional.items() if v is not None})
    spec = catalogue.provider(dispatch.provider)
    if spec is not None and spec.base_url:
        url = URL(spec.base_url)
        if url.host:
            attributes["server.address"] = url.host
            if url.port is not None:
                attributes["server.port"] = url.port
    return attributes


@dataclass(frozen=True, slots=True)
class CallTelemetry:
    """What a finished call adds to its span and to the GenAI metrics."""

    attributes: dict[str, AttributeValue] = field(default_factory=dict)
    #: `error.type` (a canonical error code) when the call did not answer, else None.
    error_type: str | None = None
    response_model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


def outcome_telemetry(dispatch: Dispatch, outcome: Outcome, provider_kind: str) -> CallTelemetry:
    """The response side of a call: model, finish reason and token usage, or the error type."""
    if isinstance(outcome, Completed):
        usage = normalize_usage(
            outcome.raw_usage,
            shape=outcome.usage_shape,
            prompt_text=dispatch.request.prompt_text(),
            output_text=outcome.output.text,
        )
        model = outcome.model or dispatch.model
        attributes: dict[str, AttributeValue] = {
            "gen_ai.response.model": model,
            "gen_ai.usage.input_tokens": usage.input_tokens,
            "gen_ai.usage.output_tokens": usage.output_tokens,
        }
        if usage.cache_read_tokens:
            attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cache_read_tokens
        if usage.cache_write_tokens:
            attributes["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write_tokens
        if outcome.output.finish_reason is not None:
            attributes["gen_ai.response.finish_reasons"] = [outcome.output.finish_reason]
        return CallTelemetry(
            attributes=attributes,
            response_model=model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
        )
    if isinstance(outcome, Failed):
        code = map_provider_error(outcome.error, provider_kind=provider_kind).code.value
        return CallTelemetry(attributes={"error.type": code}, error_type=code)
    return CallTelemetry(attributes={"error.type": NO_ANSWER}, error_type=NO_ANSWER)
