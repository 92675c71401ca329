"""Tools, content parts and response formats through both SDK adapters, against local servers.

One canonical request (tools + a JSON schema answer + an image) goes to the OpenAI-compatible and
the Anthropic adapter; each must send what its official SDK sends for it, and the same tool-call
answer must come back from both in one `Output` shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
import pytest

from domain.messages import Output
from providers import Completed, Failed
from providers.anthropic_adapter import JSON_OBJECT_INSTRUCTION, REFUSED, AnthropicProvider
from providers.openai_compat import OpenAICompatibleProvider
from providers.simulated import SimulatedProvider, SimulationProfile, example_value

if TYPE_CHECKING:
    from tests.unit.providers.conftest import FakeProvider, MakeDispatch

OPENAI_PATH = "/v1/chat/completions"
ANTHROPIC_PATH = "/v1/messages"
#: A 1x1 PNG.
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAC"
    + "hwGA60e6kgAAAABJRU5ErkJggg=="
)
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": WEATHER_SCHEMA,
        },
    },
    {"type": "function", "function": {"name": "now"}},
]
ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"summary": {"type": "string"}},
    "required": ["summary"],
    "additionalProperties": False,
}
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a weather bot."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Where is this, and what is the weather there?"},
            {"type": "image_url", "image_url": {"url": "https://example.test/a.png"}},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        ],
    },
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    {"role": "user", "content": "And tomorrow?"},
]
RICH: dict[str, Any] = {
    "messages": CONVERSATION,
    "tools": TOOLS,
    "tool_choice": "required",
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True},
    },
    "stop": ["END"],
    "top_p": 0.9,
    "seed": 42,
    "user": "user-7",
    "max_output_tokens": 300,
}

OPENAI_TOOL_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-2",
    "object": "chat.completion",
    "created": 1_760_000_000,
    "model": "gpt-test",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "toolu_01",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"city":"Paris","unit":"celsius"}',
                        },
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 80, "completion_tokens": 12, "total_tokens": 92},
}
ANTHROPIC_TOOL_ANSWER: dict[str, Any] = {
    "id": "msg_02",
    "type": "message",
    "role": "assistant",
    "model": "claude-test",
    "content": [
        {
            "type": "tool_use",
            "id": "toolu_01",
            "name": "get_weather",
            "input": {"city": "Paris", "unit": "celsius"},
        }
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 80, "output_tokens": 12},
}


@pytest.fixture
async def openai_adapter(fake_provider: FakeProvider) -> AsyncIterator[OpenAICompatibleProvider]:
    provider = OpenAICompatibleProvider(
        "fake", base_url=f"{fake_provider.origin}/v1", api_key="sk-test", timeout_s=2.0
    )
    yield provider
    await provider.close()


@pytest.fixture
async def anthropic_adapter(fake_provider: FakeProvider) -> AsyncIterator[AnthropicProvider]:
    provider = AnthropicProvider(
        "fake",
        api_key="sk-ant-test",
        base_url=fake_provider.origin,
        timeout_s=2.0,
        default_max_output_tokens=512,
    )
    yield provider
    await provider.close()


# -- what the SDKs send ----------------------------------------------------------------------------


async def test_openai_sends_every_field_as_chat_completions_takes_it(
    openai_adapter: OpenAICompatibleProvider,
    fake_provider: FakeProvider,
    make_dispatch: MakeDispatch,
) -> None:
    fake_provider.reply(OPENAI_PATH, json=OPENAI_TOOL_ANSWER)
    assert isinstance(await openai_adapter.call(make_dispatch(**RICH)), Completed)
    (received,) = fake_provider.received
    body = received.body
    assert body["messages"] == [
        {"role": "system", "content": "You are a weather bot."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Where is this, and what is the weather there?"},
                {"type": "image_url", "image_url": {"url": "https://example.test/a.png"}},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert body["tools"] == TOOLS
    assert body["tool_choice"] == "required"
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True},
    }
    assert body["stop"] == ["END"]
    assert body["top_p"] == 0.9
    assert body["seed"] == 42
    assert body["user"] == "user-7"
    assert body["max_tokens"] == 300


async def test_openai_named_tool_choice_and_single_stop(
    openai_adapter: OpenAICompatibleProvider,
    fake_provider: FakeProvider,
    make_dispatch: MakeDispatch,
) -> None:
    fake_provider.reply(OPENAI_PATH, json=OPENAI_TOOL_ANSWER)
    choice = {"type": "function", "function": {"name": "now"}}
    await openai_adapter.call(make_dispatch(tools=TOOLS, tool_choice=choice, stop="STOP"))
    (received,) = fake_provider.received
    assert received.body["tool_choice"] == choice
    assert received.body["stop"] == "STOP"
    for absent in ("response_format", "top_p", "seed", "user"):
        assert absent not in received.body


async def test_anthropic_sends_what_its_sdk_expects(
    anthropic_adapter: AnthropicProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(ANTHROPIC_PATH, json=ANTHROPIC_TOOL_ANSWER)
    assert isinstance(await anthropic_adapter.call(make_dispatch(**RICH)), Completed)
    (received,) = fake_provider.received
    body = received.body
    assert body["system"] == "You are a weather bot."
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Where is this, and what is the weather there?"},
                {
                    "type": "image",
                    "source": {"type": "url", "url": "https://example.test/a.png"},
                },
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "call_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "18 C, sunny"}],
        },
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert body["tools"] == [
        {
            "name": "get_weather",
            "input_schema": WEATHER_SCHEMA,
            "description": "Current weather of a city",
        },
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert body["tool_choice"] == {"type": "any"}
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": ANSWER_SCHEMA}}
    assert body["stop_sequences"] == ["END"]
    assert body["metadata"] == {"user_id": "user-7"}
    assert body["max_tokens"] == 300
    for absent in ("seed", "top_p", "temperature", "response_format", "user", "stop"):
        assert absent not in body


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ({"type": "function", "function": {"name": "now"}}, {"type": "tool", "name": "now"}),
    ],
)
async def test_anthropic_tool_choice(
    anthropic_adapter: AnthropicProvider,
    fake_provider: FakeProvider,
    make_dispatch: MakeDispatch,
    choice: Any,
    expected: dict[str, Any],
) -> None:
    fake_provider.reply(ANTHROPIC_PATH, json=ANTHROPIC_TOOL_ANSWER)
    await anthropic_adapter.call(make_dispatch(tools=TOOLS, tool_choice=choice))
    (received,) = fake_provider.received
    assert received.body["tool_choice"] == expected


async def test_anthropic_json_object_is_an_instruction_and_consecutive_results_share_a_turn(
    fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(ANTHROPIC_PATH, json=ANTHROPIC_TOOL_ANSWER)
    provider = AnthropicProvider(
        "fake",
        api_key="sk-ant-test",
        base_url=fake_provider.origin,
        timeout_s=2.0,
        default_max_output_tokens=64,
        send_temperature=True,
    )
    calls = [{"id": f"c{i}", "function": {"name": "now", "arguments": "{}"}} for i in range(2)]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Times?"},
        {"role": "assistant", "content": "Looking.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c0", "content": "12:00"},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "13:00"}]},
    ]
    try:
        await provider.call(
            make_dispatch(
                messages=messages,
                tools=TOOLS,
                response_format={"type": "json_object"},
                top_p=0.5,
                stop="END",
            )
        )
    finally:
        await provider.close()
    (received,) = fake_provider.received
    body = received.body
    assert body["system"] == f"Be brief.\n\n{JSON_OBJECT_INSTRUCTION}"
    assert "output_config" not in body
    assert body["top_p"] == 0.5
    assert body["stop_sequences"] == ["END"]
    assert body["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "id": "c0", "name": "now", "input": {}},
            {"type": "tool_use", "id": "c1", "name": "now", "input": {}},
        ],
    }
    assert body["messages"][2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "c0", "content": "12:00"},
            {
                "type": "tool_result",
                "tool_use_id": "c1",
                "content": [{"type": "text", "text": "13:00"}],
            },
        ],
    }


# -- one answer shape -----------------------------------------------------------------------------


def _shape(output: Output) -> dict[str, Any]:
    """An output without what only says which provider it came from."""
    return output.model_dump(mode="json", exclude={"provider_finish_reason"})


async def test_the_same_tool_call_answer_has_one_shape_from_both_adapters(
    openai_adapter: OpenAICompatibleProvider,
    anthropic_adapter: AnthropicProvider,
    fake_provider: FakeProvider,
    make_dispatch: MakeDispatch,
) -> None:
    fake_provider.reply(OPENAI_PATH, json=OPENAI_TOOL_ANSWER)
    fake_provider.reply(ANTHROPIC_PATH, json=ANTHROPIC_TOOL_ANSWER)
    from_openai = await openai_adapter.call(make_dispatch(**RICH))
    from_anthropic = await anthropic_adapter.call(make_dispatch(**RICH))
    assert isinstance(from_openai, Completed) and isinstance(from_anthropic, Completed)
    assert _shape(from_openai.output) == _shape(from_anthropic.output)
    assert _shape(from_openai.output) == {
        "text": "",
        "finish_reason": "tool_calls",
        "tool_calls": [
            {
                "id": "toolu_01",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"city":"Paris","unit":"celsius"}',
                },
            }
        ],
        "refusal": None,
    }
    assert from_openai.output.provider_finish_reason == "tool_calls"
    assert from_anthropic.output.provider_finish_reason == "tool_use"
    arguments = from_anthropic.output.tool_calls[0].function.arguments
    assert orjson.loads(arguments) == {"city": "Paris", "unit": "celsius"}


async def test_text_and_tool_calls_together_have_one_shape(
    openai_adapter: OpenAICompatibleProvider,
    anthropic_adapter: AnthropicProvider,
    fake_provider: FakeProvider,
    make_dispatch: MakeDispatch,
) -> None:
    openai_body = orjson.loads(orjson.dumps(OPENAI_TOOL_ANSWER))
    openai_body["choices"][0]["message"]["content"] = "Checking."
    anthropic_body = {
        **ANTHROPIC_TOOL_ANSWER,
        "content": [{"type": "text", "text": "Checking."}, *ANTHROPIC_TOOL_ANSWER["content"]],
    }
    fake_provider.reply(OPENAI_PATH, json=openai_body)
    fake_provider.reply(ANTHROPIC_PATH, json=anthropic_body)
    from_openai = await openai_adapter.call(make_dispatch(tools=TOOLS))
    from_anthropic = await anthropic_adapter.call(make_dispatch(tools=TOOLS))
    assert isinstance(from_openai, Completed) and isinstance(from_anthropic, Completed)
    assert _shape(from_openai.output) == _shape(from_anthropic.output)
    assert from_openai.output.text == "Checking."


async def test_a_refusal_has_one_shape_from_both_adapters(
    openai_adapter: OpenAICompatibleProvider,
    anthropic_adapter: AnthropicProvider,
    fake_provider: FakeProvider,
    make_dispatch: MakeDispatch,
) -> None:
    refused = orjson.loads(orjson.dumps(OPENAI_TOOL_ANSWER))
    refused["choices"][0] = {
        "index": 0,
        "message": {"role": "assistant", "content": None, "refusal": "I can't help with that."},
        "finish_reason": "stop",
    }
    fake_provider.reply(OPENAI_PATH, json=refused)
    fake_provider.reply(
        ANTHROPIC_PATH,
        json={
            **ANTHROPIC_TOOL_ANSWER,
            "content": [{"type": "text", "text": "I can't help with that."}],
            "stop_reason": "refusal",
        },
    )
    from_openai = await openai_adapter.call(make_dispatch())
    from_anthropic = await anthropic_adapter.call(make_dispatch())
    assert isinstance(from_openai, Completed) and isinstance(from_anthropic, Completed)
    expected = {
        "text": "",
        "finish_reason": "content_filter",
        "tool_calls": [],
        "refusal": "I can't help with that.",
    }
    assert _shape(from_openai.output) == expected
    assert _shape(from_anthropic.output) == expected
    assert from_openai.output.provider_finish_reason == "stop"
    assert from_anthropic.output.provider_finish_reason == "refusal"


async def test_anthropic_refusal_without_text_still_says_it_refused(
    anthropic_adapter: AnthropicProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(
        ANTHROPIC_PATH, json={**ANTHROPIC_TOOL_ANSWER, "content": [], "stop_reason": "refusal"}
    )
    outcome = await anthropic_adapter.call(make_dispatch())
    assert isinstance(outcome, Completed)
    assert outcome.output.refusal == REFUSED
    assert outcome.output.finish_reason == "content_filter"


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [("length", "length"), ("content_filter", "content_filter"), ("surprise", None)],
)
async def test_openai_finish_reasons_are_normalized(
    openai_adapter: OpenAICompatibleProvider,
    fake_provider: FakeProvider,
    make_dispatch: MakeDispatch,
    raw: str,
    canonical: str | None,
) -> None:
    body = orjson.loads(orjson.dumps(OPENAI_TOOL_ANSWER))
    body["choices"][0] = {
        "index": 0,
        "message": {"role": "assistant", "content": "partial"},
        "finish_reason": raw,
    }
    fake_provider.reply(OPENAI_PATH, json=body)
    outcome = await openai_adapter.call(make_dispatch())
    assert isinstance(outcome, Completed)
    assert outcome.output.finish_reason == canonical
    assert outcome.output.provider_finish_reason == raw


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("pause_turn", None),
    ],
)
async def test_anthropic_stop_reasons_are_normalized(
    anthropic_adapter: AnthropicProvider,
    fake_provider: FakeProvider,
    make_dispatch: MakeDispatch,
    raw: str,
    canonical: str | None,
) -> None:
    fake_provider.reply(
        ANTHROPIC_PATH,
        json={
            **ANTHROPIC_TOOL_ANSWER,
            "content": [{"type": "text", "text": "hi"}],
            "stop_reason": raw,
        },
    )
    outcome = await anthropic_adapter.call(make_dispatch())
    assert isinstance(outcome, Completed)
    assert outcome.output.finish_reason == canonical
    assert outcome.output.provider_finish_reason == raw


async def test_openai_tool_call_that_is_not_a_function_is_malformed(
    openai_adapter: OpenAICompatibleProvider,
    fake_provider: FakeProvider,
    make_dispatch: MakeDispatch,
) -> None:
    body = orjson.loads(orjson.dumps(OPENAI_TOOL_ANSWER))
    body["choices"][0]["message"]["tool_calls"] = [
        {"id": "c", "type": "custom", "custom": {"name": "x", "input": "y"}}
    ]
    fake_provider.reply(OPENAI_PATH, json=body)
    outcome = await openai_adapter.call(make_dispatch())
    assert isinstance(outcome, Failed)
    assert outcome.error.kind == "malformed"
    assert "not a function call" in outcome.error.message


async def test_anthropic_tool_use_without_an_input_object_is_malformed(
    anthropic_adapter: AnthropicProvider, fake_provider: FakeProvider, make_dispatch: MakeDispatch
) -> None:
    fake_provider.reply(
        ANTHROPIC_PATH,
        json={
            **ANTHROPIC_TOOL_ANSWER,
            "content": [{"type": "tool_use", "id": "t", "name": "now", "input": "not an object"}],
        },
    )
    outcome = await anthropic_adapter.call(make_dispatch())
    assert isinstance(outcome, Failed)
    assert outcome.error.kind == "malformed"
    assert "not an object" in outcome.error.message


# -- the simulated provider ------------------------------------------------------------------------


@pytest.fixture
async def simulated() -> AsyncIterator[SimulatedProvider]:
    provider = SimulatedProvider(
        "sim", SimulationProfile(latency_ms=0, latency_jitter_ms=0, error_rate=0)
    )
    yield provider
    await provider.close()


async def test_simulated_answers_required_tools_with_a_call_following_the_schema(
    simulated: SimulatedProvider, make_dispatch: MakeDispatch
) -> None:
    outcome = await simulated.call(
        make_dispatch(provider="sim", tools=TOOLS, tool_choice="required")
    )
    assert isinstance(outcome, Completed)
    (call,) = outcome.output.tool_calls
    assert call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"city": "simulated", "unit": "celsius"}
    assert outcome.output.text == ""
    assert outcome.output.finish_reason == "tool_calls"
    again = await simulated.call(make_dispatch(provider="sim", tools=TOOLS, tool_choice="required"))
    assert isinstance(again, Completed) and again.output == outcome.output  # deterministic


async def test_simulated_calls_the_named_tool_or_on_the_scripted_outcome(
    simulated: SimulatedProvider, make_dispatch: MakeDispatch
) -> None:
    named = await simulated.call(
        make_dispatch(
            provider="sim",
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "now"}},
        )
    )
    assert isinstance(named, Completed)
    assert [c.function.name for c in named.output.tool_calls] == ["now"]
    assert named.output.tool_calls[0].function.arguments == "{}"
    scripted = await simulated.call(
        make_dispatch(provider="sim", tools=TOOLS, simulate={"outcomes": {"sim": ["tool_call"]}})
    )
    assert isinstance(scripted, Completed)
    assert [c.function.name for c in scripted.output.tool_calls] == ["get_weather"]
    auto = await simulated.call(make_dispatch(provider="sim", tools=TOOLS))
    assert isinstance(auto, Completed)
    assert auto.output.tool_calls == [] and auto.output.finish_reason == "stop"
    assert auto.output.text.startswith("simulated answer from sim/")


async def test_simulated_answers_json_formats_with_json(
    simulated: SimulatedProvider, make_dispatch: MakeDispatch
) -> None:
    schema_answer = await simulated.call(
        make_dispatch(provider="sim", response_format=RICH["response_format"])
    )
    object_answer = await simulated.call(
        make_dispatch(provider="sim", response_format={"type": "json_object"})
    )
    assert isinstance(schema_answer, Completed) and isinstance(object_answer, Completed)
    assert orjson.loads(schema_answer.output.text) == {"summary": "simulated"}
    assert isinstance(orjson.loads(object_answer.output.text), dict)


@pytest.mark.parametrize(
    ("schema", "value"),
    [
        ({"type": "integer"}, 0),
        ({"type": ["null", "number"]}, 0.0),
        ({"type": "boolean"}, False),
        ({"type": "array", "items": {"type": "string"}}, []),
        ({"const": "x"}, "x"),
        ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "simulated"),
        (
            {"properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}}},
            {"a": {"b": 0}},
        ),
        ({}, None),
    ],
)
def test_example_value_follows_common_schema_keywords(schema: dict[str, Any], value: Any) -> None:
    assert example_value(schema) == value
