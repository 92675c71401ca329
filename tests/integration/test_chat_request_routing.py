"""A tools + JSON schema + image request on the real broker: routed only to capable targets.

The test catalogue gets an OpenAI-compatible provider served by a local server with a capable
model and a text-only one. Routing excludes every target lacking `tools`, `vision` or `json_mode`,
saying which and why, and records the derived requirements and the pin; the answer (a tool call)
comes back in the one output shape from the OpenAI-compatible adapter and the simulated provider.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.admin import ensure_topics
from tests.support.llm_server import LocalLLM, local_llm
from tests.support.stack import Stack, TopicReader, produce, to_json, write_test_config

pytestmark = pytest.mark.integration

KEY_ENV = "CP_TEST_CHAT_LLM_KEY"
PNG = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgAAIAAAUAAXpeqz8="
)
PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": PARAMETERS,
    },
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
}
NEEDS = ["json_mode", "tools", "vision"]


@pytest.fixture
def llm_server() -> Iterator[LocalLLM]:
    with local_llm() as server:
        yield server


def model_entry(name: str, capabilities: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "capabilities": capabilities,
        "context_window": 32_000,
        "max_output_tokens": 2048,
        "prices": {"currency": "USD", "input_per_mtok": "1.00", "output_per_mtok": "2.00"},
        "expected_latency_ms": 50,
    }


def chat_stack(bootstrap: str, run_id: str, root: Path, base_url: str) -> Stack:
    """The test catalogue plus a local OpenAI-compatible provider with a capable model (no
    topics yet)."""
    catalogue_path, policy_path = write_test_config(root / "config")
    catalogue = yaml.safe_load(catalogue_path.read_text())
    catalogue["providers"].append(
        {
            "name": "local-llm",
            "kind": "openai-compatible",
            "region": "local",
            "base_url": base_url,
            "api_key_env": KEY_ENV,
            "models": [
                model_entry("vision-tools-1", ["chat", "json_mode", "tools", "vision"]),
                model_entry("text-only-1", ["chat"]),
            ],
        }
    )
    catalogue["providers"].append(
        {
            "name": "local-claude",
            "kind": "anthropic",
            "region": "local",
            "base_url": base_url.removesuffix("/v1"),
            "api_key_env": KEY_ENV,
            "models": [model_entry("claude-local-1", ["chat", "json_mode", "tools", "vision"])],
        }
    )
    catalogue["version"] = f"{catalogue['version']}-chat"
    catalogue_path.write_text(yaml.safe_dump(catalogue, sort_keys=False))
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CP_APP_ID": f"{run_id}-chatreq",
        "CP_TOPIC_PREFIX": f"{run_id}.chatreq.",
        "CP_CATALOGUE_FILE": str(catalogue_path),
        "CP_POLICY_FILE": str(policy_path),
        "CP_LOG_FORMAT": "json",
        "CP_TIMER_INTERVAL_S": "0.1",
        KEY_ENV: "sk-local-test",
    }
    return Stack(bootstrap=bootstrap, env=env, root=root)


def job(tenant: str, request_id: str, **fields: Any) -> bytes:
    return to_json(
        {
            "request_id": request_id,
            "tenant_id": tenant,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Which city is this? What is its weather?"},
                        {"type": "image_url", "image_url": {"url": PNG}},
                    ],
                }
            ],
            "tools": [TOOL],
            "response_format": RESPONSE_FORMAT,
            "stop": ["END"],
            "seed": 11,
            "user": "user-1",
            **fields,
        }
    )


async def test_tools_json_schema_and_image_go_only_to_capable_targets(
    kafka_bootstrap: str, run_id: str, tmp_path: Path, llm_server: LocalLLM
) -> None:
    stack = chat_stack(kafka_bootstrap, run_id, tmp_path, f"http://127.0.0.1:{llm_server.port}/v1")
    report = await ensure_topics(stack.settings())
    assert not report.errors, report.errors
    tenant = f"chat-{uuid.uuid4().hex[:8]}"
    try:
        await asyncio.to_thread(stack.start_cp)
        await asyncio.to_thread(stack.start_providers)
        await produce(
            stack.bootstrap,
            stack.topic("cp.intake"),
            [
                job(
                    tenant,
                    "open",
                    tool_choice="auto",
                    constraints={"providers": {"allow": ["local-llm", "sim-fast", "sim-cheap"]}},
                ),
                job(
                    tenant,
                    "pinned",
                    tool_choice="required",
                    model=["local-llm/text-only-1", "sim-smart/sage-pro-sim"],
                ),
                job(
                    tenant, "anthropic", tool_choice="required", model="local-claude/claude-local-1"
                ),
            ],
        )
        async with TopicReader(stack.bootstrap, stack.topic("cp.responses")) as responses:
            await responses.until(
                lambda _: len({v["request_id"] for v in responses.values()}) >= 3,
                timeout=90,
                what="the three final responses",
            )
            finals = {v["request_id"]: v for v in responses.values() if v["tenant_id"] == tenant}
        async with TopicReader(stack.bootstrap, stack.topic("cp.events")) as events:
            await events.until(
                lambda _: sum(1 for v in events.values() if v["type"] == "routed") >= 3,
                timeout=30,
                what="the three routed events",
            )
            job_ids = {final["job_id"]: rid for rid, final in finals.items()}
            decisions = {
                job_ids[v["job_id"]]: v["data"]["decision"]
                for v in events.values()
                if v["type"] == "routed" and v["job_id"] in job_ids
            }
    finally:
        await asyncio.to_thread(stack.stop)

    # Unpinned: of every allowed target only the capable one is a candidate.
    open_decision = decisions["open"]
    assert open_decision["required_capabilities"] == NEEDS
    assert open_decision["pin"] is None
    assert [(c["provider"], c["model"]) for c in open_decision["candidates"]] == [
        ("local-llm", "vision-tools-1")
    ]
    excluded = {(e["provider"], e["model"]): e for e in open_decision["excluded"]}
    text_only = excluded[("local-llm", "text-only-1")]
    assert text_only["reason_code"] == "capability_missing"
    for capability in NEEDS:
        assert capability in text_only["reason"]
    assert excluded[("sim-fast", "swift-mini-sim")]["reason"] == (
        "model lacks capabilities: vision (needed by image content)"
    )
    assert excluded[("sim-cheap", "thrift-nano-sim")]["reason_code"] == "capability_missing"
    assert excluded[("sim-smart", "sage-pro-sim")]["reason_code"] == "provider_not_allowed"

    # Pinned: the incapable pinned target is excluded saying why; the capable one runs.
    pinned_decision = decisions["pinned"]
    assert pinned_decision["pin"] == ["local-llm/text-only-1", "sim-smart/sage-pro-sim"]
    assert pinned_decision["required_capabilities"] == NEEDS
    assert pinned_decision["chosen"] == {"provider": "sim-smart", "model": "sage-pro-sim"}
    pinned_excluded = {(e["provider"], e["model"]): e for e in pinned_decision["excluded"]}
    assert pinned_excluded[("local-llm", "text-only-1")]["reason_code"] == "capability_missing"
    assert pinned_excluded[("local-llm", "vision-tools-1")]["reason_code"] == "not_pinned"

    # The OpenAI-compatible provider got every field, as Chat Completions takes it.
    (call,) = [c for c in llm_server.calls if "tool_choice" in c and c["model"] != "claude-local-1"]
    assert call["model"] == "vision-tools-1"
    assert call["tools"] == [TOOL]
    assert call["tool_choice"] == "auto"
    assert call["response_format"] == RESPONSE_FORMAT
    assert call["messages"][0]["content"][1] == {"type": "image_url", "image_url": {"url": PNG}}
    assert (call["stop"], call["seed"], call["user"]) == (["END"], 11, "user-1")

    # The Anthropic adapter sent the same request as Messages takes it.
    (claude,) = [c for c in llm_server.calls if c["model"] == "claude-local-1"]
    assert claude["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather of a city",
            "input_schema": PARAMETERS,
        }
    ]
    assert claude["tool_choice"]["type"] == "any"
    image = claude["messages"][0]["content"][1]
    assert (image["type"], image["source"]["type"]) == ("image", "base64")
    assert claude["stop_sequences"] == ["END"]

    # Every answer is a tool call in the one output shape, whatever the provider.
    for request_id, provider in (
        ("open", "local-llm"),
        ("pinned", "sim-smart"),
        ("anthropic", "local-claude"),
    ):
        final = finals[request_id]
        assert (final["state"], final["provider"]) == ("COMPLETED", provider), final
        output = final["output"]
        assert set(output) == {
            "text",
            "finish_reason",
            "provider_finish_reason",
            "tool_calls",
            "refusal",
        }
        assert (output["text"], output["finish_reason"], output["refusal"]) == (
            "",
            "tool_calls",
            None,
        )
        (tool_call,) = output["tool_calls"]
        assert tool_call["type"] == "function"
        assert tool_call["function"]["name"] == "get_weather"
        assert set(json.loads(tool_call["function"]["arguments"])) == {"city"}
