"""The OpenAI-compatible front door, driven by the official `openai` SDK on the two-worker stack.

`AsyncOpenAI(base_url=<worker>/v1, api_key=<key>)` against real workers: completions answered
(text, usage, model, the job id in `X-Job-Id`), idempotency keys, failures as the SDK's error
classes naming the job, a job that outlives the wait, forwarding through either worker, tenant
isolation and the non-streaming limit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiokafka.partitioner import DefaultPartitioner
from openai import AsyncOpenAI

from domain.ids import job_id_for
from tests.api.conftest import HANG, TERMINAL, USAGE, ApiStack, bearer, get_json, wait_state
from tests.support.workers import ROOT

pytestmark = pytest.mark.integration

MESSAGES: list[Any] = [{"role": "user", "content": "What is a partition?"}]
SIM_FAST = "sim-fast/swift-mini-sim"


def key(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}"


def simulate(outcomes: dict[str, list[str]], latency_ms: int = 5) -> dict[str, Any]:
    return {"simulate": {"outcomes": outcomes, "latency_ms": latency_ms, "usage": USAGE}}


Clients = Callable[..., AsyncOpenAI]


@pytest.fixture
async def sdk(api_stack: ApiStack) -> AsyncIterator[Clients]:
    """Make SDK clients (closed after the test): `sdk(worker=0, key="key-a", **options)`."""
    made: list[AsyncOpenAI] = []

    def make(worker: int = 0, api_key: str = "key-a", **options: Any) -> AsyncOpenAI:
        options.setdefault("max_retries", 0)
        options.setdefault("timeout", 60)
        client = AsyncOpenAI(base_url=api_stack.urls[worker] + "/v1", api_key=api_key, **options)
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            await client.close()


async def cancel(http: aiohttp.ClientSession, api: ApiStack, job_id: str) -> None:
    async with http.post(f"{api.cp1}/jobs/{job_id}/cancel", headers=bearer("key-a")) as r:
        assert r.status in (202, 409), await r.text()


# -- models ---------------------------------------------------------------------------------------


async def test_models_list_auto_and_every_enabled_target(sdk: Clients) -> None:
    client = sdk()
    models = [model async for model in client.models.list()]
    ids = [model.id for model in models]
    assert ids[0] == "auto"
    assert {SIM_FAST, "sim-cheap/thrift-nano-sim", "sim-smart/sage-pro-sim"} <= set(ids)
    assert "openai/gpt-4o-mini" not in ids  # disabled in the catalogue
    assert all(model.object == "model" for model in models)
    assert {m.owned_by for m in models if m.id == SIM_FAST} == {"sim-fast"}
    assert (await client.models.retrieve(SIM_FAST)).id == SIM_FAST
    assert (await client.models.retrieve("swift-mini-sim")).owned_by == "sim-fast"
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("gpt-17")
    assert caught.value.code == "model_not_found"


# -- completions ----------------------------------------------------------------------------------


async def test_completion_answered_with_text_usage_model_and_job_id(
    sdk: Clients, http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    client = sdk()
    raw = await client.chat.completions.with_raw_response.create(
        model=SIM_FAST, messages=MESSAGES, max_tokens=200, extra_body=simulate({"sim-fast": ["ok"]})
    )
    job_id = raw.headers["X-Job-Id"]
    assert raw.headers["Location"] == f"/jobs/{job_id}"
    completion = raw.parse()
    assert completion.id == f"chatcmpl-{job_id}"
    assert completion.object == "chat.completion"
    assert completion.model == SIM_FAST
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert "What is a partition?" in (choice.message.content or "")
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls is None
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == USAGE["input_tokens"]
    assert completion.usage.completion_tokens == USAGE["output_tokens"]
    assert completion.usage.total_tokens == USAGE["input_tokens"] + USAGE["output_tokens"]
    # The same job through the job API, owned by the key's tenant.
    status, result = await get_json(http, f"{api_stack.cp2}/jobs/{job_id}/result")
    assert status == 200, result
    assert (result["state"], result["provider"], result["tenant_id"]) == (
        "COMPLETED",
        "sim-fast",
        "tenant-a",
    )
    assert result["output"]["text"] == choice.message.content


async def test_auto_lets_the_policy_route_and_tools_need_a_tools_model(sdk: Clients) -> None:
    """`auto` pins nothing: by cost sim-cheap answers, unless the request's tools rule it out."""
    client = sdk()
    extra = {"preference": "cost", **simulate({p: ["ok"] for p in HANG})}
    cheap = await client.chat.completions.create(model="auto", messages=MESSAGES, extra_body=extra)
    assert cheap.model == "sim-cheap/thrift-nano-sim"
    tools: list[Any] = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "look a word up",
                "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
            },
        }
    ]
    with_tools = await client.chat.completions.create(
        model="auto", messages=MESSAGES, tools=tools, extra_body=extra
    )
    assert with_tools.model != "sim-cheap/thrift-nano-sim"  # no `tools` capability


async def test_idempotency_key_gives_the_same_job(
    sdk: Clients, http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    idem = key("idem")
    answers = []
    for worker in (0, 1, 0):
        client = sdk(worker)
        answers.append(
            await client.chat.completions.with_raw_response.create(
                model=SIM_FAST,
                messages=MESSAGES,
                extra_body=simulate({"sim-fast": ["ok"]}),
                extra_headers={"Idempotency-Key": idem},
            )
        )
    job_ids = {raw.headers["X-Job-Id"] for raw in answers}
    assert job_ids == {job_id_for("tenant-a", idem)}
    completions = [raw.parse() for raw in answers]
    assert len({c.model_dump_json() for c in completions}) == 1, "replays differ"
    [job_id] = job_ids
    status, job = await get_json(http, f"{api_stack.cp1}/jobs/{job_id}")
    assert status == 200, job
    assert (job["request_id"], len(job["attempts"])) == (idem, 1)


async def test_same_key_with_another_body_is_409(sdk: Clients) -> None:
    idem = key("conflict")
    client = sdk(max_retries=2)  # x-should-retry: false keeps the SDK from retrying a 409
    first = await client.chat.completions.with_raw_response.create(
        model=SIM_FAST, messages=MESSAGES, extra_headers={"Idempotency-Key": idem}
    )
    job_id = first.headers["X-Job-Id"]
    for worker in (0, 1):
        with pytest.raises(openai.ConflictError) as caught:
            await sdk(worker, max_retries=2).chat.completions.create(
                model=SIM_FAST,
                messages=[{"role": "user", "content": "another question"}],
                extra_headers={"Idempotency-Key": idem},
            )
        error = caught.value
        assert error.status_code == 409
        assert error.code == "idempotency_key_reused"
        assert job_id in error.message
        assert error.response.headers["X-Job-Id"] == job_id
        assert error.response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(
    ("outcomes", "error_class", "status", "code"),
    [
        ({"sim-fast": ["invalid_request"]}, openai.BadRequestError, 400, "invalid_request"),
        ({"sim-fast": ["rate_limited"]}, openai.RateLimitError, 429, "rate_limited"),
        (
            {p: ["provider_internal"] for p in HANG},
            openai.InternalServerError,
            502,
            "provider_internal",
        ),
    ],
)
async def test_a_failed_job_raises_the_sdk_error_naming_the_job(
    sdk: Clients,
    http: aiohttp.ClientSession,
    api_stack: ApiStack,
    outcomes: dict[str, list[str]],
    error_class: type[openai.APIStatusError],
    status: int,
    code: str,
) -> None:
    idem = key("fails")
    model = SIM_FAST if len(outcomes) == 1 else "auto"
    with pytest.raises(error_class) as caught:
        await sdk(1).chat.completions.create(
            model=model,
            messages=MESSAGES,
            extra_body=simulate(outcomes),
            extra_headers={"Idempotency-Key": idem},
        )
    error = caught.value
    job_id = job_id_for("tenant-a", idem)
    assert error.status_code == status
    assert error.code == code
    assert error.response.headers["X-Job-Id"] == job_id
    assert f"job {job_id} failed" in error.message
    assert isinstance(error.body, dict) and error.body["job_id"] == job_id
    # Sent again with the key it is the same failed job: the SDK must not retry it.
    assert error.response.headers["x-should-retry"] == "false"
    status_code, final = await get_json(http, f"{api_stack.cp1}/jobs/{job_id}/result")
    assert (status_code, final["state"], final["error"]["code"]) == (200, "FAILED", code)


async def test_a_job_that_outlives_the_wait_is_504_naming_the_job(
    sdk: Clients, http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    idem = key("slow")
    job_id = job_id_for("tenant-a", idem)
    try:
        for worker in (0, 1):
            with pytest.raises(openai.InternalServerError) as caught:
                await sdk(worker).chat.completions.create(
                    model="auto",
                    messages=MESSAGES,
                    extra_body=simulate(HANG, latency_ms=600_000),
                    extra_query={"wait": 1},
                    extra_headers={"Idempotency-Key": idem},
                )
            error = caught.value
            assert error.status_code == 504
            assert error.code == "job_still_running"
            assert f"job {job_id} is still running" in error.message
            assert f"GET /jobs/{job_id}/result" in error.message
            assert error.response.headers["X-Job-Id"] == job_id
            # With a key a retry waits for the same job again.
            assert error.response.headers["x-should-retry"] == "true"
        status, body = await get_json(http, f"{api_stack.cp2}/jobs/{job_id}/result")
        assert (status, body["final"]) == (202, False)
        # Without a key a retry would start another job: the SDK is told not to.
        with pytest.raises(openai.InternalServerError) as caught:
            await sdk().chat.completions.create(
                model="auto",
                messages=MESSAGES,
                extra_body=simulate(HANG, latency_ms=600_000),
                extra_query={"wait": 1},
            )
        unkeyed = caught.value.response.headers["X-Job-Id"]
        assert caught.value.response.headers["x-should-retry"] == "false"
        await cancel(http, api_stack, unkeyed)
    finally:
        await cancel(http, api_stack, job_id)
    await wait_state(http, api_stack, job_id, TERMINAL)


def partition_of(job_id: str) -> int:
    topics = yaml.safe_load((ROOT / "topics.yaml").read_text())
    spec = topics["topics"]["cp.commands"] or {}
    partitions = int(spec.get("partitions", topics["defaults"]["partitions"]))
    every = list(range(partitions))
    return int(DefaultPartitioner()(job_id.encode(), every, every))


async def test_completions_through_either_worker_on_every_partition(sdk: Clients) -> None:
    """Each worker answers for jobs on every partition: half of them forwarded to the owner."""
    topics = yaml.safe_load((ROOT / "topics.yaml").read_text())
    spec = topics["topics"]["cp.commands"] or {}
    partitions = int(spec.get("partitions", topics["defaults"]["partitions"]))
    for worker in (0, 1):
        client = sdk(worker)
        keys: dict[int, str] = {}
        while len(keys) < partitions:
            idem = key("either")
            keys.setdefault(partition_of(job_id_for("tenant-a", idem)), idem)
        for idem in keys.values():
            raw = await client.chat.completions.with_raw_response.create(
                model=SIM_FAST,
                messages=MESSAGES,
                extra_body=simulate({"sim-fast": ["ok"]}),
                extra_headers={"Idempotency-Key": idem},
            )
            assert raw.headers["X-Job-Id"] == job_id_for("tenant-a", idem)
            assert raw.parse().choices[0].message.content
        # Without a key the forwarding worker chooses the request id and the owner keeps it.
        seen = set()
        for _ in range(2 * partitions):
            raw = await client.chat.completions.with_raw_response.create(
                model=SIM_FAST, messages=MESSAGES, extra_body=simulate({"sim-fast": ["ok"]})
            )
            seen.add(partition_of(raw.headers["X-Job-Id"]))
            assert raw.parse().id == f"chatcmpl-{raw.headers['X-Job-Id']}"
        assert len(seen) > 1, "every unkeyed job landed on one partition"


async def test_another_tenant_cannot_see_or_poll_the_job(
    sdk: Clients, http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    idem = key("mine")
    raw = await sdk().chat.completions.with_raw_response.create(
        model=SIM_FAST, messages=MESSAGES, extra_headers={"Idempotency-Key": idem}
    )
    job_id = raw.headers["X-Job-Id"]
    for url in api_stack.urls:
        for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/result", f"/jobs/{job_id}/events"):
            status, body = await get_json(http, url + path, key="key-b")
            assert status == 404, (path, body)
    # The same key under tenant B is B's own job, not A's answer.
    theirs = await sdk(1, api_key="key-b").chat.completions.with_raw_response.create(
        model=SIM_FAST,
        messages=[{"role": "user", "content": "something else"}],
        extra_headers={"Idempotency-Key": idem},
    )
    assert theirs.headers["X-Job-Id"] == job_id_for("tenant-b", idem) != job_id
    with pytest.raises(openai.AuthenticationError):
        await sdk(api_key="no-such-key").chat.completions.create(model=SIM_FAST, messages=MESSAGES)


async def test_stream_true_is_400(sdk: Clients) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk().chat.completions.create(model=SIM_FAST, messages=MESSAGES, stream=True)
    assert caught.value.code == "stream_not_supported"
    assert caught.value.param == "stream"


async def test_unknown_model_and_parameters_are_openai_errors(sdk: Clients) -> None:
    client = sdk()
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(model="gpt-17", messages=MESSAGES)
    assert (not_found.value.code, not_found.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model=SIM_FAST, messages=MESSAGES, n=3)
    assert bad.value.param == "n"
    with pytest.raises(openai.BadRequestError) as invalid:
        await client.chat.completions.create(model=SIM_FAST, messages=MESSAGES, temperature=9)
    assert (invalid.value.param, invalid.value.code) == ("temperature", "invalid_value")


async def test_every_v1_error_is_in_openai_shape(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    probes = [
        ("GET", "/v1/chat/completions", 405),
        ("GET", "/v1/no-such-route", 404),
        ("POST", "/v1/models", 405),
    ]
    for url in api_stack.urls:
        for method, path, expected in probes:
            async with http.request(method, url + path, headers=bearer("key-a")) as response:
                body = await response.json(content_type=None)
                assert response.status == expected, body
                assert response.content_type == "application/json"
                assert {"message", "type", "param", "code"} <= set(body["error"]), body
        async with http.post(url + "/v1/chat/completions", data=b"{") as response:
            assert response.status == 401
            assert (await response.json(content_type=None))["error"]["code"] == "unauthorized"
        async with http.post(
            url + "/v1/chat/completions", data=b"{", headers=bearer("key-a")
        ) as response:
            assert response.status == 415
        async with http.post(
            url + "/v1/chat/completions",
            data=b"{not json",
            headers={**bearer("key-a"), "Content-Type": "application/json"},
        ) as response:
            assert response.status == 400
            assert (await response.json(content_type=None))["error"]["code"] == "invalid_json"


async def test_openapi_documents_the_front_door(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    async with http.get(api_stack.cp1 + "/openapi.json") as response:
        document = await response.json()
    assert "post" in document["paths"]["/v1/chat/completions"]
    assert "get" in document["paths"]["/v1/models"]
    assert {"ChatCompletion", "ChatCompletionRequest", "OpenAIError"} <= set(
        document["components"]["schemas"]
    )


def test_the_readme_front_door_example_runs_as_written(api_stack: ApiStack) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### OpenAI-compatible front door", 1)[1]
    own = section.split("\n## ", 1)[0].split("\n### ", 1)[0]
    [example] = re.findall(r"```python\n(.*?)```", own, re.S)
    script = example.replace("http://127.0.0.1:6066", api_stack.cp2).replace(
        '"order-42"', f'"readme-{uuid.uuid4().hex[:8]}"'
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "KEY": "key-a"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (script, done.stdout, done.stderr)
    job_id, _, text = done.stdout.strip().partition(" ")
    assert job_id.startswith("job_") and text, done.stdout
