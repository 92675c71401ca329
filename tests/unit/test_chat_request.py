"""The chat fields of a job request and the one output shape: parsing, validation and limits."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from domain.chat import normalize_finish_reason
from domain.codec import DecodeError, decode_intake, decode_result
from domain.limits import TOOL_SCHEMA
from domain.messages import ChatMessage, JobRequest, Output, ProviderResult
from tables.jobs import decode_request, encode_request
from tests.unit.test_bounded_input import accepted_path

PNG_URL = "data:image/png;base64,iVBORw0KGgo="
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
FULL: dict[str, Any] = {
    "request_id": "r-1",
    "tenant_id": "acme",
    "messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is the weather here?"},
                {"type": "image_url", "image_url": {"url": "https://example.test/a.png"}},
                {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}},
            ],
        },
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_1", "function": {"name": "get_weather", "arguments": '{"city":"X"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ],
    "model": ["sim-smart/sage-pro-sim", "gpt-4o-mini"],
    "tools": [WEATHER],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
    },
    "stop": ["END", "STOP"],
    "top_p": 0.5,
    "seed": -(2**63),
    "user": "u" * 256,
}


def request(**fields: Any) -> dict[str, Any]:
    return {"request_id": "r-1", "messages": [{"role": "user", "content": "Hi"}], **fields}


def refused(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        JobRequest.model_validate(data)


# -- parsing and storage ---------------------------------------------------------------------------


def test_a_request_with_every_new_field_parses_stores_and_reads_back() -> None:
    parsed = JobRequest.model_validate(FULL)
    assert decode_request(encode_request(parsed)) == parsed
    assert JobRequest.model_validate_json(parsed.model_dump_json()) == parsed
    wire = orjson.loads(parsed.model_dump_json())
    assert wire["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert "schema_" not in wire["response_format"]["json_schema"]
    assert wire["tools"][0]["type"] == "function"
    accepted_path(parsed)


def test_the_kafka_intake_decodes_it() -> None:
    decoded = decode_intake(orjson.dumps(FULL), max_bytes=900_000)
    assert decoded == JobRequest.model_validate(FULL)


def test_prompt_text_keeps_text_parts_only() -> None:
    parsed = JobRequest.model_validate(FULL)
    assert parsed.prompt_text() == "Be brief.\nWhat is the weather here?\n\nsunny"
    assert parsed.messages[1].images()[1].image_url.detail == "low"


def test_pins_are_a_list_without_repeats() -> None:
    assert JobRequest.model_validate(request()).pins() == []
    assert JobRequest.model_validate(request(model="gpt-4o-mini")).pins() == ["gpt-4o-mini"]
    pinned = JobRequest.model_validate(request(model=["a/b", "c", "a/b"]))
    assert pinned.pins() == ["a/b", "c"]


def test_a_request_without_the_new_fields_keeps_its_fingerprint() -> None:
    # Computed before the fields existed: a request re-sent after an upgrade is the same job.
    legacy = JobRequest.model_validate(
        {
            "request_id": "r-1",
            "tenant_id": "acme",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ],
            "max_output_tokens": 256,
            "temperature": 0.2,
            "constraints": {"capabilities": ["json_mode"]},
            "metadata": {"order": 42},
        }
    )
    expected = "42d7f056bf34d71ea3985e1d5515fc2beddbb62e6a6eaf2abada0745cbf3fe0e"
    assert legacy.fingerprint() == expected
    minimal = JobRequest.model_validate(request())
    assert minimal.fingerprint() == (
        "aa06c0f7f2e04ce0e8138f08e33e0d6265feee895953c1d0489295e660453f9c"
    )


@pytest.mark.parametrize(
    "change",
    [
        {"model": "gpt-4o-mini"},
        {"tools": [WEATHER]},
        {"tools": [WEATHER], "tool_choice": "auto"},
        {"response_format": {"type": "json_object"}},
        {"stop": "END"},
        {"top_p": 0.1},
        {"seed": 1},
        {"user": "u"},
        {"messages": [{"role": "tool", "tool_call_id": "c", "content": "Hi"}]},
    ],
)
def test_every_new_field_changes_the_fingerprint(change: dict[str, Any]) -> None:
    base = JobRequest.model_validate(request())
    assert JobRequest.model_validate(request(**change)).fingerprint() != base.fingerprint()


def test_a_legacy_tool_message_without_a_call_id_still_reads() -> None:
    stored = request(messages=[{"role": "tool", "content": "42"}])
    assert JobRequest.model_validate(stored).messages[0].tool_call_id is None


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("http://example.test/a.png", "https:// URL or a data:image"),
        ("ftp://example.test/a.png", "https:// URL or a data:image"),
        ("data:text/plain;base64,aGk=", "data URL must be"),
        ("data:image/png;base64,not base64!", "data URL must be"),
        ("data:image/png;base64,abc", "data URL must be"),
        ("data:image/svg+xml;base64,aGk=", "data URL must be"),
        ("https://example.test/" + "a" * 8_200, "longer than 8192"),
    ],
)
def test_image_urls_are_https_or_base64_data(url: str, match: str) -> None:
    part = {"type": "image_url", "image_url": {"url": url}}
    refused(request(messages=[{"role": "user", "content": [part]}]), match)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        ({"role": "user", "content": "x", "tool_call_id": "c"}, "only a tool message"),
        (
            {
                "role": "user",
                "content": "x",
                "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}],
            },
            "only an assistant message has tool_calls",
        ),
        (
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}],
            },
            "JSON object",
        ),
        (
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}],
            },
            "JSON object",
        ),
        (
            {
                "role": "system",
                "content": [{"type": "image_url", "image_url": {"url": PNG_URL}}],
            },
            "only a user message can have image parts",
        ),
        ({"role": "user", "content": []}, "at least 1"),
        ({"role": "user", "content": [{"type": "audio", "audio": "x"}]}, "does not match any"),
    ],
)
def test_message_shapes_follow_their_role(message: dict[str, Any], match: str) -> None:
    refused(request(messages=[message]), match)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"tools": [WEATHER, WEATHER]}, "unique: get_weather"),
        ({"tool_choice": "auto"}, "tool_choice needs tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "not among the tools",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": []}, "at least 1"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "pattern"),
        ({"tools": [{"type": "retrieval"}]}, "function"),
        ({"response_format": {"type": "xml"}}, "does not match any"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
            "schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema_": {}},
                }
            },
            "schema",
        ),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"stop": ""}, "at least 1"),
        ({"stop": []}, "at least 1"),
        ({"top_p": 1.5}, "less than or equal to 1"),
        ({"seed": 2**63}, "less than or equal to"),
        ({"user": "u" * 257}, "at most 256"),
        ({"model": "has space"}, "pattern"),
        ({"model": [f"m{i}" for i in range(17)]}, "at most 16"),
        ({"model": []}, "at least 1"),
    ],
)
def test_request_fields_are_validated(fields: dict[str, Any], match: str) -> None:
    refused(request(**fields), match)


def _nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(
    ("schema", "limit"),
    [
        (_nested(16), "deeper than 32 levels"),
        ({"type": "object", "description": "x" * 16_385}, "string longer than 16384"),
        (
            {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(2_100)}},
            "more than 4000 values",
        ),
        (
            {
                "type": "object",
                "properties": {f"p{i}": {"description": "d" * 100} for i in range(700)},
            },
            "over 65536",
        ),
        ({"type": "object", "default": 2**63}, "64-bit"),
    ],
)
def test_tool_and_response_schemas_are_bounded(schema: dict[str, Any], limit: str) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    refused(request(tools=[tool]), limit)
    response_format = {"type": "json_schema", "json_schema": {"name": "f", "schema": schema}}
    refused(request(response_format=response_format), limit)
    raw = json.dumps(request(tools=[tool])).encode()  # json writes any integer
    with pytest.raises(DecodeError) as at_intake:
        decode_intake(raw, max_bytes=10_000_000)
    assert at_intake.value.reason == "schema"


def test_a_schema_at_the_limits_is_accepted_and_read_back() -> None:
    deep = _nested(TOOL_SCHEMA.max_depth // 2 - 1)
    tool = {"type": "function", "function": {"name": "f", "parameters": deep}}
    parsed = JobRequest.model_validate(request(tools=[tool]))
    assert decode_request(encode_request(parsed)) == parsed
    accepted_path(parsed)


def test_a_text_or_content_parts_message_gives_its_text() -> None:
    text = ChatMessage.model_validate({"role": "user", "content": "plain"})
    parts = ChatMessage.model_validate(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "one"},
                {"type": "image_url", "image_url": {"url": PNG_URL}},
                {"type": "text", "text": "two"},
            ],
        }
    )
    assert text.text() == "plain" and text.images() == []
    assert parts.text() == "one\ntwo" and len(parts.images()) == 1


# -- the output shape ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("tool_calls", "tool_calls"),
        ("function_call", "tool_calls"),
        ("content_filter", "content_filter"),
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", None),
        (None, None),
    ],
)
def test_finish_reasons_map_to_one_vocabulary(raw: str | None, canonical: str | None) -> None:
    assert normalize_finish_reason(raw) == canonical


def test_an_output_stored_with_a_raw_provider_reason_reads_as_its_canonical_one() -> None:
    # ProviderResults and rows written before the vocabulary carry Anthropic's stop_reason.
    old = Output.model_validate_json(b'{"text": "hi", "finish_reason": "end_turn"}')
    assert old == Output(text="hi", finish_reason="stop", provider_finish_reason="end_turn")
    unknown = Output.model_validate({"text": "hi", "finish_reason": "x" * 100})
    assert unknown.finish_reason is None and unknown.provider_finish_reason == "x" * 64
    result = decode_result(
        orjson.dumps(
            {
                "type": "completed",
                "event_id": "e-1",
                "job_id": "j",
                "attempt_id": "j-a1",
                "provider": "anthropic",
                "model": "m",
                "occurred_at": "2026-01-01T00:00:00Z",
                "output": {"text": "hi", "finish_reason": "max_tokens"},
            }
        ),
        max_bytes=100_000,
    )
    assert isinstance(result, ProviderResult) and result.output is not None
    assert result.output.finish_reason == "length"


def test_output_carries_tool_calls_and_refusal() -> None:
    output = Output.model_validate(
        {
            "text": "",
            "finish_reason": "tool_calls",
            "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": '{"a":1}'}}],
        }
    )
    assert output.tool_calls[0].type == "function"
    assert output.generated_text() == 'f{"a":1}'
    assert Output(text="", refusal="no").generated_text() == "no"
    with pytest.raises(ValidationError):
        Output.model_validate({"text": "", "finish_reason": None, "tool_calls": [{"id": ""}]})
