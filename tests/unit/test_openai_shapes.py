"""The OpenAI front door's mapping, without a worker: request -> JobRequest, final -> answer."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from openai.types import Model
from openai.types.chat import ChatCompletion

from api.openai_shapes import (
    DEFAULT_WAIT_S,
    OpenAIError,
    completion_body,
    failure,
    find_model,
    from_problem,
    job_request,
    model_list,
    request_id_for,
    still_running,
    wait_seconds,
)
from api.problems import Problem
from domain.catalogue import Catalogue, load_catalogue
from domain.errors import ErrorCode, canonical_error
from domain.messages import FinalResponse, JobCost, Output
from domain.usage import Usage
from tests.support.workers import ROOT


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return load_catalogue(ROOT / "config" / "catalogue.yaml")


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": "hi"}], **extra}


def mapped(catalogue: Catalogue, **extra: Any) -> dict[str, Any]:
    request = job_request(body(**extra), tenant="t", request_id="r1", catalogue=catalogue)
    return request.model_dump(mode="json", exclude_defaults=True)


def rejected(catalogue: Catalogue, data: dict[str, Any]) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        job_request(data, tenant="t", request_id="r1", catalogue=catalogue)
    return caught.value


def test_auto_pins_nothing_and_a_target_or_model_name_is_a_pin(catalogue: Catalogue) -> None:
    assert "model" not in mapped(catalogue)
    assert mapped(catalogue, model="sim-fast/swift-mini-sim")["model"] == "sim-fast/swift-mini-sim"
    assert mapped(catalogue, model="sage-pro-sim")["model"] == "sage-pro-sim"
    fallbacks = mapped(catalogue, model="sim-cheap/thrift-nano-sim", models=["sage-lite-sim"])
    assert fallbacks["model"] == ["sim-cheap/thrift-nano-sim", "sage-lite-sim"]


@pytest.mark.parametrize("model", ["gpt-17", "sim-fast/gpt-17", "openai/gpt-4o-mini", ""])
def test_unknown_or_disabled_model_is_404_model_not_found(catalogue: Catalogue, model: str) -> None:
    error = rejected(catalogue, body(model=model))
    if model:
        assert (error.status, error.code, error.param) == (404, "model_not_found", "model")
        assert model in error.message and "/v1/models" in error.message
    else:
        assert error.status == 400


def test_openai_parameters_map_by_name(catalogue: Catalogue) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    job = mapped(
        catalogue,
        max_tokens=50,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop=["END"],
        tools=tools,
        tool_choice="auto",
        response_format={"type": "json_object"},
        user="u-1",
        metadata={"team": "search"},
        n=1,
        stream=False,
        presence_penalty=0,
        logprobs=None,
    )
    assert job["max_output_tokens"] == 50
    assert (job["temperature"], job["top_p"], job["seed"], job["stop"]) == (0.5, 0.9, 7, ["END"])
    assert job["tools"][0]["function"]["name"] == "lookup"
    assert (job["tool_choice"], job["response_format"]) == ("auto", {"type": "json_object"})
    assert (job["user"], job["metadata"]) == ("u-1", {"team": "search"})
    assert (job["request_id"], job["tenant_id"]) == ("r1", "t")
    assert mapped(catalogue, max_tokens=5, max_completion_tokens=9)["max_output_tokens"] == 9


def test_messages_map_developer_and_tool_call_turns(catalogue: Catalogue) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    job = job_request(
        {"model": "auto", "messages": messages}, tenant="t", request_id="r", catalogue=catalogue
    )
    assert [m.role for m in job.messages] == ["system", "user", "assistant", "tool"]
    assert job.messages[2].content == "" and job.messages[2].tool_calls is not None


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"stream": True}, "stream", "stream_not_supported"),
        ({"n": 2}, "n", "n"),
        ({"logit_bias": {"1": 5}}, "logit_bias", "unsupported_parameter"),
        ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
        ({"reasoning_effort": "high"}, "reasoning_effort", "unknown_parameter"),
        ({"temperature": 3}, "temperature", "invalid_value"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "invalid_value"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": [{"role": "user", "content": 1}]}, "messages[0].content", "invalid_value"),
    ],
)
def test_bad_input_is_400_naming_the_parameter(
    catalogue: Catalogue, extra: dict[str, Any], param: str, code: str
) -> None:
    error = rejected(catalogue, body(**extra))
    assert (error.status, error.param, error.code) == (400, param, code), error.message
    assert error.type == "invalid_request_error"


def test_a_model_is_required(catalogue: Catalogue) -> None:
    error = rejected(catalogue, {"messages": [{"role": "user", "content": "hi"}]})
    assert (error.status, error.param) == (400, "model")


def test_idempotency_keys_become_request_ids() -> None:
    assert request_id_for("order-42:retry@1") == "order-42:retry@1"
    hashed = request_id_for("with spaces and ünïcode")
    assert hashed.startswith("idem-") and len(hashed) == 5 + 64
    assert hashed == request_id_for("with spaces and ünïcode")
    assert request_id_for("k" * 129).startswith("idem-")


def test_wait_bounds() -> None:
    assert wait_seconds(None) == DEFAULT_WAIT_S
    assert wait_seconds("2.5") == 2.5
    for bad in ("0", "0.5", "301", "nan", "inf", "soon"):
        with pytest.raises(OpenAIError) as caught:
            wait_seconds(bad)
        assert (caught.value.status, caught.value.param) == (400, "wait")


def final(**overrides: Any) -> FinalResponse:
    at = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    fields: dict[str, Any] = {
        "job_id": "job_x",
        "request_id": "r",
        "tenant_id": "t",
        "state": "COMPLETED",
        "output": Output(text="hello", finish_reason="stop"),
        "provider": "sim-fast",
        "model": "swift-mini-sim",
        "usage": Usage(input_tokens=10, output_tokens=5, total_tokens=15, cache_read_tokens=2),
        "cost": JobCost(total=None),
        "error": None,
        "attempts": 1,
        "created_at": at,
        "finished_at": at,
    }
    return FinalResponse(**{**fields, **overrides})


def test_completion_is_what_the_sdk_parses() -> None:
    answer = ChatCompletion.model_validate(completion_body(final()))
    assert answer.id == "chatcmpl-job_x"
    assert answer.model == "sim-fast/swift-mini-sim"
    assert answer.choices[0].message.content == "hello"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (10, 5)
    assert answer.usage.total_tokens == 15
    assert answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 2
    assert answer.created == int(datetime(2026, 11, 26, 12, 0, tzinfo=UTC).timestamp())


def test_tool_calls_and_refusals_come_back_in_openai_shape() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    output = Output.model_validate(
        {"text": "", "finish_reason": "tool_calls", "tool_calls": [call]}
    )
    answer = ChatCompletion.model_validate(completion_body(final(output=output)))
    message = answer.choices[0].message
    assert message.content is None
    assert message.tool_calls is not None
    assert message.tool_calls[0].model_dump(mode="json", exclude_none=True) == call
    assert answer.choices[0].finish_reason == "tool_calls"
    refused = Output(text="", finish_reason="content_filter", refusal="no")
    choice = ChatCompletion.model_validate(completion_body(final(output=refused))).choices[0]
    assert (choice.message.refusal, choice.finish_reason) == ("no", "content_filter")


@pytest.mark.parametrize(
    ("code", "status", "type_"),
    [
        (ErrorCode.RATE_LIMITED, 429, "rate_limit_error"),
        (ErrorCode.INVALID_REQUEST, 400, "invalid_request_error"),
        (ErrorCode.NO_ELIGIBLE_TARGET, 400, "invalid_request_error"),
        (ErrorCode.PROVIDER_INTERNAL, 502, "upstream_error"),
        (ErrorCode.TIMEOUT, 504, "timeout_error"),
        (ErrorCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
        (ErrorCode.CANCELLED, 409, "cancelled"),
        (ErrorCode.INTERNAL, 500, "server_error"),
    ],
)
def test_a_failed_job_is_an_openai_error_naming_it(
    code: ErrorCode, status: int, type_: str
) -> None:
    error = canonical_error(code, "what happened", retry_after_s=3.2)
    failed = failure(final(state="FAILED", output=None, error=error), idempotent=False)
    assert (failed.status, failed.type, failed.code) == (status, type_, code.value)
    assert "job_x" in failed.message and "what happened" in failed.message
    assert failed.body()["error"]["job_id"] == "job_x"
    response = failed.response()
    assert response.headers["X-Job-Id"] == "job_x"
    assert response.headers["x-should-retry"] == ("true" if error.retryable else "false")
    assert (response.headers.get("Retry-After") == "3") is (status == 429)
    again = failure(final(state="FAILED", output=None, error=error), idempotent=True)
    assert again.response().headers["x-should-retry"] == "false"


def test_still_running_names_the_job_to_poll() -> None:
    error = still_running("job_x", "STARTED", 5, idempotent=False)
    assert error.status == 504 and error.code == "job_still_running"
    assert "job job_x is still running" in error.message
    assert "GET /jobs/job_x/result" in error.message
    assert error.response().headers["x-should-retry"] == "false"
    idempotent = still_running("job_x", "STARTED", 5, idempotent=True).response()
    assert idempotent.headers["x-should-retry"] == "true"
    body = orjson.loads(idempotent.body)  # type: ignore[arg-type]
    assert set(body["error"]) == {"message", "type", "param", "code", "job_id"}


def test_problems_keep_status_and_headers_in_openai_shape() -> None:
    problem = Problem(503, "unavailable", "Unavailable", "moving", headers={"Retry-After": "2"})
    error = from_problem(problem)
    assert (error.status, error.code, error.message) == (503, "unavailable", "moving")
    assert error.response().headers["Retry-After"] == "2"
    assert from_problem(Problem(422, "invalid-request", "Invalid", "bad")).status == 400


def test_model_list_has_auto_and_every_enabled_target(catalogue: Catalogue) -> None:
    listed = model_list(catalogue)
    ids = [Model.model_validate(m).id for m in listed["data"]]
    assert ids[0] == "auto"
    assert set(ids[1:]) == {f"{p.name}/{m.name}" for p, m in catalogue.targets() if p.enabled}
    assert "openai/gpt-4o-mini" not in ids
    assert find_model("sage-lite-sim", catalogue)["owned_by"] == "sim-smart"
    assert find_model("sim-fast/swift-mini-sim", catalogue)["id"] == "sim-fast/swift-mini-sim"
    with pytest.raises(OpenAIError) as caught:
        find_model("openai/gpt-4o-mini", catalogue)
    assert caught.value.status == 404


def test_a_provider_without_its_key_is_not_offered(catalogue: Catalogue) -> None:
    ids = {m["id"] for m in model_list(catalogue, unavailable={"sim-fast"})["data"]}
    assert "sim-fast/swift-mini-sim" not in ids and "sim-cheap/thrift-nano-sim" in ids
    with pytest.raises(OpenAIError) as caught:
        job_request(
            body(model="swift-mini-sim"),
            tenant="t",
            request_id="r",
            catalogue=catalogue,
            unavailable={"sim-fast"},
        )
    assert caught.value.status == 404 and "no API key" in caught.value.message
