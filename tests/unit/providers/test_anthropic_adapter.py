"""The Anthropic adapter against a local fake `/v1/messages` server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest

from providers import Completed, Failed, ProviderAdapter
from providers.anthropic_adapter import AnthropicProvider

if TYPE_CHECKING:
    from tests.unit.providers.conftest import FakeProvider, MakeDispatch

PATH = "/v1/messages"
MODEL = "claude-sonnet-4-6"

SUCCESS = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": MODEL,
    "content": [
        {"type": "thinking", "thinking": "Greet them.", "signature": "sig"},
        {"type": "text", "text": "Hello, "},
        {"type": "text", "text": "test suite."},
    ],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 12,
        "output_tokens": 5,
        "cache_read_input_tokens": 1024,
        "cache_creation_input_tokens": 256,
    },
}


def error_body(type_: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}, "request_id": "req_1"}


@pytest.fixture
async def adapter(fake_provider: FakeProvider) -> AsyncIterator[AnthropicProvider]:
    provider = AnthropicProvider(
        "fake",
        api_key="sk-ant-test",
        base_url=fake_provider.origin,
        timeout_s=2.0,
        default_max_output_tokens=512,
    )
    yield provider
    await provider.close()


async def test_is_a_provider_adapter(adapter: AnthropicProvider) -> None:
    assert isinstance(adapter, ProviderAdapter)
    assert adapter.kind == "anthropic"


async def test_success_joins_text_blocks_and_keeps_cache_usage(
    adapter: AnthropicProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(PATH, json=SUCCESS)
    outcome = await adapter.call(make_dispatch(model=MODEL))
    assert isinstance(outcome, Completed)
    assert outcome.output.text == "Hello, test suite."
    assert outcome.output.finish_reason == "stop"
    assert outcome.output.provider_finish_reason == "end_turn"
    assert outcome.output.tool_calls == []
    assert outcome.output.refusal is None
    assert outcome.model == MODEL
    assert outcome.usage_shape == "anthropic"
    assert outcome.raw_usage is not None
    assert outcome.raw_usage["input_tokens"] == 12
    assert outcome.raw_usage["output_tokens"] == 5
    assert outcome.raw_usage["cache_read_input_tokens"] == 1024
    assert outcome.raw_usage["cache_creation_input_tokens"] == 256
    assert fake_provider.count(PATH) == 1


async def test_system_messages_go_to_system_and_max_tokens_is_always_sent(
    adapter: AnthropicProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(PATH, json=SUCCESS)
    await adapter.call(
        make_dispatch(
            model=MODEL,
            messages=[
                ("system", "Be terse."),
                ("user", "Hi"),
                ("assistant", "Hello."),
                ("system", "Answer in English."),
                ("user", "Again"),
            ],
            temperature=0.3,
        )
    )
    (received,) = fake_provider.received
    # SDK 2.x sends the API key as a bearer token, not as x-api-key.
    assert received.headers["authorization"] == "Bearer sk-ant-test"
    assert "anthropic-version" in received.headers
    assert received.body["model"] == MODEL
    assert received.body["system"] == "Be terse.\n\nAnswer in English."
    assert received.body["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ]
    assert received.body["max_tokens"] == 512
    assert "temperature" not in received.body


async def test_request_max_output_tokens_wins_and_no_system_is_omitted(
    adapter: AnthropicProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(PATH, json=SUCCESS)
    await adapter.call(make_dispatch(model=MODEL, max_output_tokens=32))
    (received,) = fake_provider.received
    assert received.body["max_tokens"] == 32
    assert "system" not in received.body


async def test_temperature_is_sent_clamped_when_enabled(
    fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(PATH, json=SUCCESS)
    provider = AnthropicProvider(
        "fake",
        api_key="sk-ant-test",
        base_url=fake_provider.origin,
        timeout_s=2.0,
        default_max_output_tokens=64,
        send_temperature=True,
    )
    try:
        await provider.call(make_dispatch(model=MODEL, temperature=1.7))
    finally:
        await provider.close()
    (received,) = fake_provider.received
    assert received.body["temperature"] == 1.0


async def test_429_keeps_retry_after_verbatim_and_is_not_retried(
    adapter: AnthropicProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(
        PATH,
        status=429,
        json=error_body("rate_limit_error", "Number of request tokens has exceeded your limit"),
        headers={"retry-after": "12"},
    )
    outcome = await adapter.call(make_dispatch(model=MODEL))
    assert isinstance(outcome, Failed)
    assert outcome.error.kind == "http"
    assert outcome.error.http_status == 429
    assert outcome.error.code == "rate_limit_error"
    assert outcome.error.retry_after == "12"
    assert outcome.error.message == (
        "Error code: 429 - Number of request tokens has exceeded your limit"
    )
    assert outcome.error.body is not None
    assert "rate_limit_error" in outcome.error.body
    assert fake_provider.count(PATH) == 1


async def test_529_overloaded_is_an_http_failure_sent_once(
    adapter: AnthropicProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(
        PATH,
        status=529,
        json=error_body("overloaded_error", "Overloaded"),
        headers={"x-should-retry": "true"},
    )
    outcome = await adapter.call(make_dispatch(model=MODEL))
    assert isinstance(outcome, Failed)
    assert outcome.error.kind == "http"
    assert outcome.error.http_status == 529
    assert outcome.error.code == "overloaded_error"
    assert outcome.error.retry_after is None
    assert fake_provider.count(PATH) == 1


async def test_500_is_an_http_failure(
    adapter: AnthropicProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(PATH, status=500, json=error_body("api_error", "Internal server error"))
    outcome = await adapter.call(make_dispatch(model=MODEL))
    assert isinstance(outcome, Failed)
    assert outcome.error.kind == "http"
    assert outcome.error.http_status == 500
    assert outcome.error.code == "api_error"
    assert fake_provider.count(PATH) == 1


async def test_error_with_a_non_json_body_keeps_the_text(
    adapter: AnthropicProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(PATH, status=503, text="upstream unavailable", content_type="text/plain")
    outcome = await adapter.call(make_dispatch(model=MODEL))
    assert isinstance(outcome, Failed)
    assert outcome.error.http_status == 503
    assert outcome.error.code is None
    assert outcome.error.body == "upstream unavailable"
    assert outcome.error.message == "Error code: 503"


async def test_slow_server_times_out_after_one_request(
    fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(PATH, json=SUCCESS, delay_s=5.0)
    provider = AnthropicProvider(
        "fake",
        api_key="sk-ant-test",
        base_url=fake_provider.origin,
        timeout_s=0.3,
        default_max_output_tokens=64,
    )
    try:
        outcome = await provider.call(make_dispatch(model=MODEL))
    finally:
        await provider.close()
    assert isinstance(outcome, Failed)
    assert outcome.error.kind == "timeout"
    assert 250 <= outcome.latency_ms < 4_000
    assert fake_provider.count(PATH) == 1


async def test_refused_connection_is_a_connection_failure(
    closed_port: int, make_dispatch: MakeDispatch
) -> None:
    provider = AnthropicProvider(
        "fake",
        api_key="sk-ant-test",
        base_url=f"http://127.0.0.1:{closed_port}",
        timeout_s=2.0,
        default_max_output_tokens=64,
    )
    try:
        outcome = await provider.call(make_dispatch(model=MODEL))
    finally:
        await provider.close()
    assert isinstance(outcome, Failed)
    assert outcome.error.kind == "connection"


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ({"text": "<html>oops</html>", "content_type": "text/html"}, "not a message"),
        ({"text": "{not json", "content_type": "application/json"}, "unparseable"),
        ({"json": {"id": "msg_01", "type": "message", "role": "assistant"}}, "content"),
        ({"json": {**SUCCESS, "content": [{"type": "text"}]}}, "text block"),
        ({"json": {**SUCCESS, "usage": {"input_tokens": 3}}}, "usage"),
        ({"json": "just a string"}, "not a message"),
    ],
)
async def test_malformed_200_is_a_malformed_failure(
    adapter: AnthropicProvider,
    fake_provider: FakeProvider,
    make_dispatch: MakeDispatch,
    reply: dict[str, Any],
    why: str,
) -> None:
    fake_provider.reply(PATH, status=200, **reply)
    outcome = await adapter.call(make_dispatch(model=MODEL))
    assert isinstance(outcome, Failed)
    assert outcome.error.kind == "malformed"
    assert outcome.error.http_status == 200
    assert why in outcome.error.message
    assert outcome.error.body is not None
    assert fake_provider.count(PATH) == 1


async def test_empty_content_completes_with_empty_text(
    adapter: AnthropicProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(PATH, json={**SUCCESS, "content": [], "stop_reason": "max_tokens"})
    outcome = await adapter.call(make_dispatch(model=MODEL))
    assert isinstance(outcome, Completed)
    assert outcome.output.text == ""
    assert outcome.output.finish_reason == "length"
    assert outcome.output.provider_finish_reason == "max_tokens"


async def test_call_after_close_is_a_programmer_error(
    adapter: AnthropicProvider, make_dispatch: MakeDispatch
) -> None:
    await adapter.close()
    with pytest.raises(RuntimeError, match="closed"):
        await adapter.call(make_dispatch(model=MODEL))
