"""Provider calls described in the OpenTelemetry GenAI semantic conventions (providers.genai)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from domain.catalogue import Catalogue, load_catalogue
from domain.messages import Dispatch, JobRequest, Output, RawProviderError
from providers import genai
from providers.base import Completed, Failed, NoAnswer
from tests.support.workers import ROOT


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return load_catalogue(ROOT / "config" / "catalogue.yaml")


def dispatch(provider: str = "sim-fast", model: str = "swift-mini-sim", **request: Any) -> Dispatch:
    job = JobRequest.model_validate(
        {"request_id": "r", "messages": [{"role": "user", "content": "hello"}], **request}
    )
    return Dispatch(
        job_id="job_1",
        attempt_id="job_1-a1",
        attempt_no=1,
        provider_attempt_no=1,
        tenant_id="t",
        provider=provider,
        model=model,
        idempotency_key="job_1:job_1-a1",
        request=job,
        dispatched_at=datetime.now(UTC),
        timeout_ms=5000,
    )


def test_request_attributes(catalogue: Catalogue) -> None:
    call = dispatch(max_output_tokens=64, temperature=0.2, top_p=0.9, seed=3, stop="END")
    assert genai.span_name(call) == "chat swift-mini-sim"
    assert genai.request_attributes(call, catalogue) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "sim-fast",
        "gen_ai.system": "sim-fast",
        "gen_ai.request.model": "swift-mini-sim",
        "gen_ai.request.max_tokens": 64,
        "gen_ai.request.temperature": 0.2,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.request.seed": 3,
        "gen_ai.request.stop_sequences": ["END"],
    }
    # Parameters not given are left out.
    assert set(genai.request_attributes(dispatch(), catalogue)) == {
        "gen_ai.operation.name",
        "gen_ai.provider.name",
        "gen_ai.system",
        "gen_ai.request.model",
    }


def test_a_real_provider_is_named_by_its_genai_id_with_its_server(catalogue: Catalogue) -> None:
    attributes = genai.request_attributes(
        dispatch("openai", "gpt-4o-mini", response_format={"type": "json_object"}), catalogue
    )
    assert attributes["gen_ai.provider.name"] == attributes["gen_ai.system"] == "openai"
    assert attributes["server.address"] == "api.openai.com"
    assert attributes["gen_ai.output.type"] == "json"


def test_an_answer_has_model_usage_and_finish_reason() -> None:
    completed = Completed(
        output=Output(text="hi", finish_reason="stop"),
        raw_usage={"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
        usage_shape="openai_chat",
        latency_ms=5,
        model="swift-mini-sim-2026",
    )
    call = genai.outcome_telemetry(dispatch(), completed, "simulated")
    assert call.attributes == {
        "gen_ai.response.model": "swift-mini-sim-2026",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 3,
        "gen_ai.response.finish_reasons": ["stop"],
    }
    assert (call.error_type, call.input_tokens, call.output_tokens) == (None, 12, 3)


def test_a_failure_has_the_canonical_error_type() -> None:
    failed = Failed(RawProviderError(kind="http", http_status=429, message="slow down"), 10)
    call = genai.outcome_telemetry(dispatch(), failed, "openai-compatible")
    assert call.attributes == {"error.type": "rate_limited"}
    assert (call.error_type, call.input_tokens, call.response_model) == ("rate_limited", None, None)
    assert genai.outcome_telemetry(dispatch(), NoAnswer(), "simulated").error_type == "timeout"
