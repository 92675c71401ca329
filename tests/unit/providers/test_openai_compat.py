"""The OpenAI-compatible adapter against a local fake `/v1/chat/completions` server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest

from providers import Completed, Failed, ProviderAdapter
from providers.base import MAX_BODY_BYTES
from providers.openai_compat import OpenAICompatibleProvider

if TYPE_CHECKING:
    from tests.unit.providers.conftest import FakeProvider, MakeDispatch

PATH = "/v1/chat/completions"

SUCCESS = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1_760_000_000,
    "model": "gpt-test-2026-01-01",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello, test suite."},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 21,
        "completion_tokens": 5,
        "total_tokens": 26,
        "prompt_tokens_details": {"cached_tokens": 16},
        "completion_tokens_details": {"reasoning_tokens": 0},
    },
}


def error_body(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


@pytest.fixture
async def adapter(fake_provider: FakeProvider) -> AsyncIterator[OpenAICompatibleProvider]:
    provider = OpenAICompatibleProvider(
        "fake",
        base_url=f"{fake_provider.origin}/v1",
        api_key="sk-test",
        timeout_s=2.0,
        default_max_output_tokens=256,
    )
    yield provider
    await provider.close()


async def test_is_a_provider_adapter(adapter: OpenAICompatibleProvider) -> None:
    assert isinstance(adapter, ProviderAdapter)
    assert adapter.kind == "openai_compatible"


async def test_success_maps_text_finish_reason_usage_and_model(
    adapter: OpenAICompatibleProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(PATH, json=SUCCESS)
    outcome = await adapter.call(make_dispatch(model="gpt-test"))
    assert isinstance(outcome, Completed)
    assert outcome.output.text == "Hello, test suite."
    assert outcome.output.finish_reason == "stop"
    assert outcome.model == "gpt-test-2026-01-01"
    assert outcome.usage_shape == "openai_chat"
    assert outcome.raw_usage is not None
    assert outcome.raw_usage["prompt_tokens"] == 21
    assert outcome.raw_usage["completion_tokens"] == 5
    assert outcome.raw_usage["prompt_tokens_details"]["cached_tokens"] == 16
    assert outcome.repeat == 1
    assert outcome.latency_ms >= 0
    assert fake_provider.count(PATH) == 1


async def test_request_carries_model_messages_limits_and_auth(
    adapter: OpenAICompatibleProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(PATH, json=SUCCESS)
    await adapter.call(
        make_dispatch(
            model="gpt-test",
            messages=[("system", "Be terse."), ("user", "Hi")],
            temperature=0.2,
        )
    )
    (received,) = fake_provider.received
    assert received.headers["authorization"] == "Bearer sk-test"
    assert received.body["model"] == "gpt-test"
    assert received.body["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
    ]
    assert received.body["max_tokens"] == 256
    assert received.body["temperature"] == 0.2
    assert "response_format" not in received.body


async def test_json_mode_capability_only_routes_response_format_asks(
    adapter: OpenAICompatibleProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(PATH, json=SUCCESS)
    await adapter.call(
        make_dispatch(max_output_tokens=64, constraints={"capabilities": ["json_mode"]})
    )
    await adapter.call(make_dispatch(response_format={"type": "json_object"}))
    routed_only, asked = fake_provider.received
    assert "response_format" not in routed_only.body
    assert routed_only.body["max_tokens"] == 64
    assert "temperature" not in routed_only.body
    assert asked.body["response_format"] == {"type": "json_object"}


async def test_max_completion_tokens_can_replace_max_tokens(
    fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(PATH, json=SUCCESS)
    provider = OpenAICompatibleProvider(
        "fake",
        base_url=f"{fake_provider.origin}/v1",
        api_key="sk-test",
        timeout_s=2.0,
        default_max_output_tokens=128,
        max_tokens_param="max_completion_tokens",
    )
    try:
        assert isinstance(await provider.call(make_dispatch()), Completed)
    finally:
        await provider.close()
    (received,) = fake_provider.received
    assert received.body["max_completion_tokens"] == 128
    assert "max_tokens" not in received.body


async def test_429_keeps_retry_after_verbatim_and_is_not_retried(
    adapter: OpenAICompatibleProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(
        PATH,
        status=429,
        json=error_body("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
        headers={"Retry-After": "7"},
    )
    outcome = await adapter.call(make_dispatch())
    assert isinstance(outcome, Failed)
    assert outcome.error.kind == "http"
    assert outcome.error.http_status == 429
    assert outcome.error.code == "rate_limit_exceeded"
    assert outcome.error.retry_after == "7"
    assert outcome.error.body is not None
    assert "Rate limit reached" in outcome.error.body
    assert "Rate limit reached" in outcome.error.message
    assert fake_provider.count(PATH) == 1


async def test_500_asking_to_be_retried_is_still_sent_once(
    adapter: OpenAICompatibleProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(
        PATH,
        status=500,
        json=error_body("The server had an error", "server_error", None),
        headers={"x-should-retry": "true"},
    )
    outcome = await adapter.call(make_dispatch())
    assert isinstance(outcome, Failed)
    assert outcome.error.kind == "http"
    assert outcome.error.http_status == 500
    assert outcome.error.code == "server_error"
    assert outcome.error.retry_after is None
    assert fake_provider.count(PATH) == 1


async def test_error_with_a_non_json_body_keeps_the_text(
    adapter: OpenAICompatibleProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(PATH, status=502, text="<html>Bad Gateway</html>", content_type="text/html")
    outcome = await adapter.call(make_dispatch())
    assert isinstance(outcome, Failed)
    assert outcome.error.kind == "http"
    assert outcome.error.http_status == 502
    assert outcome.error.code is None
    assert outcome.error.body == "<html>Bad Gateway</html>"


async def test_huge_error_body_is_truncated_to_16_kib(
    adapter: OpenAICompatibleProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(PATH, status=500, text="é" * 20_000, content_type="text/plain")
    outcome = await adapter.call(make_dispatch())
    assert isinstance(outcome, Failed)
    assert outcome.error.body is not None
    assert len(outcome.error.body.encode()) <= MAX_BODY_BYTES
    assert outcome.error.body.startswith("éé")


async def test_slow_server_times_out_after_one_request(
    fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(PATH, json=SUCCESS, delay_s=5.0)
    provider = OpenAICompatibleProvider(
        "fake", base_url=f"{fake_provider.origin}/v1", api_key="sk-test", timeout_s=0.3
    )
    try:
        outcome = await provider.call(make_dispatch())
    finally:
        await provider.close()
    assert isinstance(outcome, Failed)
    assert outcome.error.kind == "timeout"
    assert outcome.error.http_status is None
    assert 250 <= outcome.latency_ms < 4_000
    assert fake_provider.count(PATH) == 1


async def test_refused_connection_is_a_connection_failure(
    closed_port: int, make_dispatch: MakeDispatch
) -> None:
    provider = OpenAICompatibleProvider(
        "fake", base_url=f"http://127.0.0.1:{closed_port}/v1", api_key="sk-test", timeout_s=2.0
    )
    try:
        outcome = await provider.call(make_dispatch())
    finally:
        await provider.close()
    assert isinstance(outcome, Failed)
    assert outcome.error.kind == "connection"
    assert outcome.error.http_status is None


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ({"text": "<html>oops</html>", "content_type": "text/html"}, "not a chat completion"),
        ({"text": "{not json", "content_type": "application/json"}, "unparseable"),
        ({"json": {"id": "chatcmpl-1", "object": "chat.completion"}}, "no choices"),
        ({"json": {**SUCCESS, "choices": []}}, "no choices"),
        ({"json": {**SUCCESS, "choices": [{"index": 0, "finish_reason": "stop"}]}}, "message"),
        ({"json": [1, 2, 3]}, "not a chat completion"),
        ({"json": {**SUCCESS, "usage": {"prompt_tokens": "many"}}}, "usage"),
    ],
)
async def test_malformed_200_is_a_malformed_failure(
    adapter: OpenAICompatibleProvider,
    fake_provider: FakeProvider,
    make_dispatch: MakeDispatch,
    reply: dict[str, Any],
    why: str,
) -> None:
    fake_provider.reply(PATH, status=200, **reply)
    outcome = await adapter.call(make_dispatch())
    assert isinstance(outcome, Failed)
    assert outcome.error.kind == "malformed"
    assert why in outcome.error.message
    assert outcome.error.body is not None
    assert fake_provider.count(PATH) == 1


async def test_null_content_and_missing_usage_still_complete(
    adapter: OpenAICompatibleProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    body = {
        **SUCCESS,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": None}}],
    }
    del body["usage"]
    fake_provider.reply(PATH, json=body)
    outcome = await adapter.call(make_dispatch())
    assert isinstance(outcome, Completed)
    assert outcome.output.text == ""
    assert outcome.output.finish_reason is None
    assert outcome.raw_usage is None


async def test_dispatch_for_another_provider_is_a_programmer_error(
    adapter: OpenAICompatibleProvider, make_dispatch: MakeDispatch
) -> None:
    with pytest.raises(ValueError, match="other"):
        await adapter.call(make_dispatch(provider="other"))


def test_rejects_non_positive_timeout() -> None:
    with pytest.raises(ValueError):
        OpenAICompatibleProvider("fake", "http://127.0.0.1:1/v1", "sk-test", timeout_s=0)
