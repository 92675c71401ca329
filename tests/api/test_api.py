"""The HTTP API on two control-plane workers: every status code, tenant isolation, forwarding.

Each test talks to real worker processes over HTTP (see tests/api/conftest.py). Job ids come
from (tenant, request_id), so request ids carry a random part to keep tests independent.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from domain.ids import job_id_for
from tests.api.conftest import (
    FALLBACK,
    HANG,
    MAX_REQUEST_BYTES,
    TERMINAL,
    USAGE,
    ApiStack,
    bearer,
    create,
    get_json,
    job_request,
    submit,
    wait_state,
)
from tests.support.workers import ROOT

pytestmark = pytest.mark.integration

PROBLEM_TYPE = "application/problem+json"
PROBLEM_KEYS = {"type", "title", "status", "detail"}
OPEN = {"CREATED", "ROUTED", "DISPATCHED", "STARTED", "RETRYING"}


def rid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}"


async def problem(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    """Check the response is a problem document with this status; return its body."""
    body = await response.json(content_type=None)
    assert response.status == status, body
    assert response.content_type == PROBLEM_TYPE, (response.content_type, body)
    assert set(body) >= PROBLEM_KEYS, body
    assert body["status"] == status
    assert body["type"].startswith("https://")
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return dict(body)


def sim_fast_price() -> Decimal:
    """Cost of USAGE on sim-fast's model, straight from the shipped catalogue."""
    catalogue = yaml.safe_load((ROOT / "config" / "catalogue.yaml").read_text())
    spec = next(p for p in catalogue["providers"] if p["name"] == "sim-fast")
    prices = spec["models"][0]["prices"]
    return (
        Decimal(prices["input_per_mtok"]) * USAGE["input_tokens"]
        + Decimal(prices["output_per_mtok"]) * USAGE["output_tokens"]
    ) / Decimal(1_000_000)


def command_partitions() -> int:
    topics = yaml.safe_load((ROOT / "topics.yaml").read_text())
    spec = topics["topics"]["cp.commands"] or {}
    return int(spec.get("partitions", topics["defaults"]["partitions"]))


def partition_of(job_id: str, partitions: int) -> int:
    """The partition the producer's default partitioner puts a job-keyed record on."""
    every = list(range(partitions))
    return int(DefaultPartitioner()(job_id.encode(), every, every))


# -- POST /jobs -----------------------------------------------------------------------------------


async def test_post_jobs_202_and_same_request_is_the_same_job(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    body = job_request(rid("idem"), {"sim-cheap": ["ok"]})
    status, first = await submit(http, api_stack, body)
    assert status == 202, first
    job_id = first["job_id"]
    assert job_id == job_id_for("tenant-a", body["request_id"])
    assert first["created"] is True
    # The owner answers once the job agent applied the job (read-your-writes), so the state
    # is already a lifecycle state; ACCEPTED only if the agent was slower than the wait.
    assert first["state"] in {"ACCEPTED", "CREATED", "ROUTED", "DISPATCHED", "STARTED", "COMPLETED"}
    assert first["links"]["self"] == f"/jobs/{job_id}"
    await wait_state(http, api_stack, job_id, TERMINAL)

    status, again = await submit(http, api_stack, body)
    assert status == 202, again
    assert again["job_id"] == job_id
    assert again["created"] is False
    assert again["state"] == "COMPLETED"


async def test_post_jobs_sets_location(http: aiohttp.ClientSession, api_stack: ApiStack) -> None:
    body = job_request(rid("loc"))
    for url in api_stack.urls:
        async with http.post(url + "/jobs", json=body, headers=bearer("key-a")) as response:
            answer = await response.json(content_type=None)
            assert response.status == 202, answer
            assert response.headers["Location"] == f"/jobs/{answer['job_id']}"


async def test_post_jobs_409_for_another_payload_under_the_same_request_id(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    request_id = rid("conflict")
    job_id = await create(http, api_stack, job_request(request_id, content="first"))
    await wait_state(http, api_stack, job_id, TERMINAL)
    for url in api_stack.urls:
        other = job_request(request_id, content="second")
        async with http.post(url + "/jobs", json=other, headers=bearer("key-a")) as response:
            assert (await problem(response, 409))["job_id"] == job_id


async def test_post_jobs_409_right_after_the_first_post(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    """A conflicting payload sent before the job agent applied the first one is still a 409.

    Ten tries: the window between the first 202 and the job landing in the table is short.
    """
    answers = []
    for _ in range(10):
        request_id = rid("race")
        await create(http, api_stack, job_request(request_id, content="first"))
        answers.append(await submit(http, api_stack, job_request(request_id, content="second")))
    accepted = [answer for status, answer in answers if status != 409]
    assert not accepted, f"{len(accepted)}/10 conflicting posts were accepted: {accepted[0]}"


async def test_job_readable_right_after_202(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    """Following the Location of a 202 at once finds the job (ten tries: the window is short)."""
    answers = []
    for _ in range(10):
        body = job_request(rid("read-after-write"), {"sim-cheap": ["ok"]})
        status, accepted = await submit(http, api_stack, body)
        assert status == 202, accepted
        for url in api_stack.urls:
            answers.append(await get_json(http, url + f"/jobs/{accepted['job_id']}"))
    missing = [answer for status, answer in answers if status != 200]
    assert not missing, f"{len(missing)}/{len(answers)} reads right after 202 failed: {missing[0]}"


async def test_post_jobs_through_either_worker(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    """Every worker accepts every job: the non-owner forwards the request, body included."""
    partitions = command_partitions()
    failures = []
    for url in api_stack.urls:
        wanted: dict[int, str] = {}  # a new job on every partition, for each worker
        while len(wanted) < partitions:
            request_id = rid("either")
            partition = partition_of(job_id_for("tenant-a", request_id), partitions)
            wanted.setdefault(partition, request_id)
        for partition, request_id in sorted(wanted.items()):
            body = job_request(request_id)
            async with http.post(url + "/jobs", json=body, headers=bearer("key-a")) as response:
                answer = await response.json(content_type=None)
                if response.status != 202:
                    failures.append((url, partition, response.status, answer.get("detail")))
    assert not failures, failures


async def test_post_jobs_422_with_field_errors(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    invalid = {
        "request_id": "spaces are not allowed",
        "messages": [],
        "temperature": 5,
        "simulate": {"outcomes": {"sim-cheap": ["explode"]}},
    }
    async with http.post(api_stack.cp1 + "/jobs", json=invalid, headers=bearer("key-a")) as r:
        body = await problem(r, 422)
    locs = {tuple(error["loc"]) for error in body["errors"]}
    assert {("request_id",), ("messages",), ("temperature",)} <= locs, body["errors"]
    assert any(loc[0] == "simulate" for loc in locs), body["errors"]
    assert all({"loc", "msg", "type"} <= set(error) for error in body["errors"])


async def test_post_jobs_422_for_a_tenant_id_other_than_the_key(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    body = {**job_request(rid("tenant")), "tenant_id": "tenant-b"}
    async with http.post(api_stack.cp2 + "/jobs", json=body, headers=bearer("key-a")) as r:
        answer = await problem(r, 422)
    assert [error["loc"] for error in answer["errors"]] == [["tenant_id"]]


@pytest.mark.parametrize(
    ("raw", "detail"),
    [(b"{not json", "not JSON"), (b"", "not JSON"), (b"[1, 2]", "JSON object")],
)
async def test_post_jobs_422_for_non_json(
    http: aiohttp.ClientSession, api_stack: ApiStack, raw: bytes, detail: str
) -> None:
    headers = {**bearer("key-a"), "Content-Type": "application/json"}
    async with http.post(api_stack.cp1 + "/jobs", data=raw, headers=headers) as response:
        assert detail in (await problem(response, 422))["detail"]


async def test_post_jobs_413_over_the_body_limit(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    big = job_request(rid("big"), content="x" * (MAX_REQUEST_BYTES + 1000))
    for url in api_stack.urls:
        async with http.post(url + "/jobs", json=big, headers=bearer("key-a")) as response:
            assert str(MAX_REQUEST_BYTES) in (await problem(response, 413))["detail"]


async def test_post_jobs_413_for_a_chunked_body_without_length(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    async def chunks() -> Any:
        yield b'{"request_id": "chunked", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_REQUEST_BYTES // 1000 + 2):
            yield b"y" * 1000
        yield b'"}]}'

    headers = {**bearer("key-a"), "Content-Type": "application/json"}
    async with http.post(api_stack.cp1 + "/jobs", data=chunks(), headers=headers) as response:
        await problem(response, 413)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
async def test_post_jobs_415_for_another_content_type(
    http: aiohttp.ClientSession, api_stack: ApiStack, content_type: str
) -> None:
    headers = {**bearer("key-a"), "Content-Type": content_type}
    data = b'{"request_id": "x", "messages": [{"role": "user", "content": "hi"}]}'
    async with http.post(api_stack.cp1 + "/jobs", data=data, headers=headers) as response:
        await problem(response, 415)


async def test_concurrent_posts_of_one_request_id_with_other_payloads_accept_one(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    """Before: each POST checked, then awaited its send, then claimed: two could both get 202."""
    for _ in range(5):
        request_id = rid("concurrent")
        bodies = [job_request(request_id, content=f"payload {n}") for n in range(6)]
        answers = await asyncio.gather(*(submit(http, api_stack, body) for body in bodies))
        statuses = sorted(status for status, _ in answers)
        assert statuses == [202] + [409] * 5, answers


def nested(levels: int) -> bytes:
    """`levels` JSON objects inside each other, as raw bytes (no encoder would write them)."""
    return b'{"a": ' * (levels - 1) + b'{"leaf": 1}' + b"}" * (levels - 1)


def with_metadata(request_id: str, metadata: bytes) -> bytes:
    head = orjson.dumps(job_request(request_id))[:-1]
    return head + b', "metadata": ' + metadata + b"}"


@pytest.mark.parametrize("levels", [17, 240, 252, 300, 2000])
async def test_post_jobs_422_for_metadata_nested_past_the_limit(
    http: aiohttp.ClientSession, api_stack: ApiStack, levels: int
) -> None:
    """Before: 240-252 levels were accepted with a 500 and the job then read back as 500."""
    request_id = rid("deep")
    headers = {**bearer("key-a"), "Content-Type": "application/json"}
    body = with_metadata(request_id, nested(levels))
    async with http.post(api_stack.cp1 + "/jobs", data=body, headers=headers) as response:
        answer = await problem(response, 422)
    assert "deeper than 16 levels" in str(answer.get("errors")) or "depth" in answer["detail"]
    status, _ = await get_json(http, f"{api_stack.cp1}/jobs/{job_id_for('tenant-a', request_id)}")
    assert status == 404


async def test_metadata_at_the_limit_is_stored_read_back_and_echoed(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    request_id = rid("deep-ok")
    headers = {**bearer("key-a"), "Content-Type": "application/json"}
    body = with_metadata(request_id, nested(16))
    async with http.post(api_stack.cp1 + "/jobs", data=body, headers=headers) as response:
        answer = await response.json(content_type=None)
        assert response.status == 202, answer
    job_id = answer["job_id"]
    await wait_state(http, api_stack, job_id, TERMINAL)
    for url in api_stack.urls:
        for path in ("", "/result", "/events", "/timeline"):
            async with http.get(f"{url}/jobs/{job_id}{path}", headers=bearer("key-a")) as r:
                assert r.status == 200, (path, await r.text())
    _, result = await get_json(http, f"{api_stack.cp2}/jobs/{job_id}/result")
    assert result["metadata"] == orjson.loads(nested(16))


@pytest.mark.parametrize(
    ("metadata", "where"),
    [
        (b'{"n": 1e400}', "not JSON"),
        (b'{"n": ' + b"9" * 400 + b"}", "not JSON"),
        (b'{"k": "' + b"x" * 17_000 + b'"}', "16384"),
        (b'{"l": [' + b",".join([b"0"] * 2_100) + b"]}", "more than 2000 values"),
        (b'{"s": "\\ud800"}', ""),
        (b'{"s": "\\xff"}', "not JSON"),
    ],
    ids=[
        "float-overflow",
        "huge-int",
        "long-string",
        "many-values",
        "lone-surrogate",
        "bad-escape",
    ],
)
async def test_post_jobs_never_answers_5xx_for_odd_metadata(
    http: aiohttp.ClientSession, api_stack: ApiStack, metadata: bytes, where: str
) -> None:
    headers = {**bearer("key-a"), "Content-Type": "application/json"}
    body = with_metadata(rid("odd"), metadata)
    async with http.post(api_stack.cp1 + "/jobs", data=body, headers=headers) as response:
        text = await response.text()
        assert response.status < 500, text
        if response.status == 202:
            job_id = orjson.loads(text)["job_id"]
            await wait_state(http, api_stack, job_id, TERMINAL)
        else:
            assert response.status in (413, 422), text
            assert where in text, text


async def test_post_jobs_422_for_invalid_utf8(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    headers = {**bearer("key-a"), "Content-Type": "application/json"}
    for bad in (b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80"):
        body = orjson.dumps(job_request(rid("utf8"), content="@@")).replace(b"@@", bad)
        async with http.post(api_stack.cp1 + "/jobs", data=body, headers=headers) as response:
            assert "not JSON" in (await problem(response, 422))["detail"]


async def raw_request(url: str, head: bytes) -> tuple[int, bytes]:
    """Send request bytes as they are (an HTTP client would refuse to send some headers)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line = answer.split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), answer


@pytest.mark.parametrize(
    "authorization",
    [b"Bearer \xff\xfe", "Bearer clé-ünïcode".encode(), b"Bearer key-a\x00", b"\xe2\x82\xac"],
    ids=["latin1-bytes", "utf8-text", "nul", "no-scheme-utf8"],
)
async def test_odd_authorization_headers_are_401_never_500(
    api_stack: ApiStack, authorization: bytes
) -> None:
    """Before: an Authorization header that was not latin-1 answered 500."""
    job_id = job_id_for("tenant-a", "whatever")
    for url in api_stack.urls:
        for method, path in (("GET", f"/jobs/{job_id}"), ("GET", "/providers")):
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
                + b"Authorization: "
                + authorization
                + b"\r\n\r\n"
            )
            status, answer = await raw_request(url, head)
            assert status in (400, 401), answer[:300]


async def test_odd_trace_headers_never_fail_a_post(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    cases = [
        {"traceparent": " " * 300 + traceparent},
        {"traceparent": traceparent, "tracestate": "k=" + "v" * 5000},
        {"traceparent": traceparent, "tracestate": "\u00e9t\u00e9=1"},
        {"traceparent": "garbage"},
    ]
    for extra in cases:
        headers = {**bearer("key-a"), **extra}
        async with http.post(
            api_stack.cp1 + "/jobs", json=job_request(rid("trace")), headers=headers
        ) as response:
            assert response.status == 202, await response.text()


# -- 401 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic a2V5LWE6"},
        {"Authorization": "key-a"},
    ],
    ids=["none", "unknown", "empty", "basic", "no-scheme"],
)
async def test_401_without_a_valid_key(
    http: aiohttp.ClientSession, api_stack: ApiStack, headers: dict[str, str]
) -> None:
    job_id = job_id_for("tenant-a", "whatever")
    requests = [
        ("POST", "/jobs"),
        ("GET", f"/jobs/{job_id}"),
        ("GET", f"/jobs/{job_id}/result"),
        ("GET", f"/jobs/{job_id}/events"),
        ("GET", f"/jobs/{job_id}/timeline"),
        ("GET", f"/jobs/{job_id}/timeline?key=wrong-key"),
        ("POST", f"/jobs/{job_id}/cancel"),
        ("GET", "/providers"),
    ]
    for url in api_stack.urls:
        for method, path in requests:
            async with http.request(
                method,
                url + path,
                json=job_request("r") if method == "POST" else None,
                headers=headers,
            ) as response:
                await problem(response, 401)
                assert response.headers["WWW-Authenticate"].startswith("Bearer")


# -- GET /jobs/{id}, /result, /events -------------------------------------------------------------


async def test_status_has_attempts_transitions_and_routing(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    request_id = rid("status")
    job_id = await create(http, api_stack, job_request(request_id, FALLBACK))
    body = await wait_state(http, api_stack, job_id, TERMINAL)
    assert body["state"] == "COMPLETED", body
    assert body["job_id"] == job_id
    assert body["request_id"] == request_id
    assert body["tenant_id"] == "tenant-a"
    assert body["terminal"] is True
    assert body["error"] is None
    attempts = [(a["attempt_no"], a["provider"], a["state"]) for a in body["attempts"]]
    assert attempts == [
        (1, "sim-cheap", "FAILED"),
        (2, "sim-cheap", "FAILED"),
        (3, "sim-fast", "COMPLETED"),
    ]
    assert body["attempts"][0]["error"]["code"] == "provider_internal"
    assert body["attempts"][2]["cost"]["currency"] == "USD"
    transitions = body["transitions"]
    for state in ("CREATED", "ROUTED", "DISPATCHED", "STARTED", "RETRYING", "COMPLETED"):
        assert state in transitions, transitions
    assert transitions["CREATED"] <= transitions["COMPLETED"]
    routing = body["routing"]
    assert routing["chosen"]["provider"] == "sim-cheap"
    assert routing["preference"] == "cost"
    assert routing["policy_version"].endswith("-test")
    assert routing["catalogue_version"]
    assert "sim-fast" in {target["provider"] for target in routing["fallback_plan"]}
    assert {c["provider"] for c in routing["candidates"]} >= {"sim-cheap", "sim-fast"}
    assert body["links"]["result"] == f"/jobs/{job_id}/result"


async def test_result_202_while_open(http: aiohttp.ClientSession, api_stack: ApiStack) -> None:
    job_id = await create(http, api_stack, job_request(rid("open"), HANG, latency_ms=600_000))
    await wait_state(http, api_stack, job_id, OPEN)
    for url in api_stack.urls:
        async with http.get(f"{url}/jobs/{job_id}/result", headers=bearer("key-a")) as response:
            body = await response.json(content_type=None)
            assert response.status == 202, body
            assert response.content_type == "application/json"
            assert response.headers["Retry-After"] == "1"
        assert body["final"] is False
        assert body["job_id"] == job_id
        assert body["state"] not in TERMINAL
    started = time.monotonic()
    status, body = await get_json(http, f"{api_stack.cp2}/jobs/{job_id}/result?wait=1")
    assert status == 202, body
    assert 0.9 <= time.monotonic() - started < 10
    async with http.post(f"{api_stack.cp1}/jobs/{job_id}/cancel", headers=bearer("key-a")) as r:
        assert r.status == 202


async def test_result_long_poll_returns_200_once_final(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    request_id = rid("final")
    # Each of the three attempts takes a second, so the poll starts well before the end.
    job_id = await create(http, api_stack, job_request(request_id, FALLBACK, latency_ms=1000))
    await wait_state(http, api_stack, job_id, OPEN)
    started = time.monotonic()
    status, body = await get_json(http, f"{api_stack.cp2}/jobs/{job_id}/result?wait=25")
    waited = time.monotonic() - started
    assert status == 200, body
    assert 0.5 < waited < 20, f"the long poll returned after {waited:.1f}s, not when the job ended"
    assert body["job_id"] == job_id
    assert body["request_id"] == request_id
    assert body["tenant_id"] == "tenant-a"
    assert body["state"] == "COMPLETED"
    assert body["provider"] == "sim-fast"
    assert body["model"] == "swift-mini-sim"
    assert body["error"] is None
    assert body["attempts"] == 3
    assert body["output"]["text"]
    assert body["usage"]["input_tokens"] == USAGE["input_tokens"]
    assert body["usage"]["output_tokens"] == USAGE["output_tokens"]
    total = body["cost"]["total"]
    assert Decimal(total["amount"]) == sim_fast_price()
    assert total["currency"] == "USD"
    assert total["estimated"] is False
    # Every attempt is listed: the two failures billed nothing.
    assert [(a["provider"], a["status"]) for a in body["cost"]["attempts"]] == [
        ("sim-cheap", "FAILED"),
        ("sim-cheap", "FAILED"),
        ("sim-fast", "COMPLETED"),
    ]
    assert [Decimal(a["cost"]["amount"]) for a in body["cost"]["attempts"][:2]] == [0, 0]
    assert body["outcome"]["reason"] == "completed"
    for url in api_stack.urls:  # and without waiting, from either worker
        assert await get_json(http, f"{url}/jobs/{job_id}/result") == (200, body)


@pytest.mark.parametrize("wait", ["31", "-1", "1e9", "soon", "nan"])
async def test_result_422_for_wait_out_of_range(
    http: aiohttp.ClientSession, api_stack: ApiStack, wait: str
) -> None:
    job_id = job_id_for("tenant-a", "any")
    url = f"{api_stack.cp1}/jobs/{job_id}/result"
    async with http.get(url, params={"wait": wait}, headers=bearer("key-a")) as response:
        await problem(response, 422)


async def test_events_ordered_and_incremental(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    job_id = await create(http, api_stack, job_request(rid("events"), FALLBACK))
    await wait_state(http, api_stack, job_id, TERMINAL)
    status, body = await get_json(http, f"{api_stack.cp2}/jobs/{job_id}/events")
    assert status == 200, body
    events = body["events"]
    seqs = [event["seq"] for event in events]
    assert seqs == list(range(1, len(events) + 1))
    assert body["last_seq"] == seqs[-1]
    assert body["state"] == "COMPLETED"
    types = [event["type"] for event in events]
    assert types[0] == "created"
    assert types[-1] == "completed"
    assert "fallback" in types
    assert all(event["job_id"] == job_id and event["tenant_id"] == "tenant-a" for event in events)
    assert [event["at"] for event in events] == sorted(event["at"] for event in events)

    for after in (0, 1, len(events) // 2, len(events) - 1, len(events)):
        for url in api_stack.urls:
            status, part = await get_json(http, f"{url}/jobs/{job_id}/events?after={after}")
            assert status == 200, part
            assert part["events"] == events[after:]
            assert part["last_seq"] == body["last_seq"]
    status, tail = await get_json(http, f"{api_stack.cp1}/jobs/{job_id}/events?after=1000")
    assert (status, tail["events"]) == (200, [])


@pytest.mark.parametrize("after", ["-1", "one", "1.5"])
async def test_events_422_for_a_bad_after(
    http: aiohttp.ClientSession, api_stack: ApiStack, after: str
) -> None:
    url = f"{api_stack.cp1}/jobs/{job_id_for('tenant-a', 'any')}/events"
    async with http.get(url, params={"after": after}, headers=bearer("key-a")) as response:
        await problem(response, 422)


# -- cancel ---------------------------------------------------------------------------------------


async def test_cancel_running_job_then_409_once_final(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    job_id = await create(http, api_stack, job_request(rid("cancel"), HANG, latency_ms=600_000))
    await wait_state(http, api_stack, job_id, {"DISPATCHED", "STARTED"})
    async with http.post(f"{api_stack.cp2}/jobs/{job_id}/cancel", headers=bearer("key-a")) as r:
        body = await r.json(content_type=None)
        assert r.status == 202, body
    assert body["cancel_requested"] is True
    assert body["job_id"] == job_id
    status_body = await wait_state(http, api_stack, job_id, TERMINAL, timeout=10)
    assert status_body["state"] == "CANCELLED", status_body
    status, result = await get_json(http, f"{api_stack.cp1}/jobs/{job_id}/result")
    assert (status, result["state"]) == (200, "CANCELLED")
    for url in api_stack.urls:
        async with http.post(f"{url}/jobs/{job_id}/cancel", headers=bearer("key-a")) as r:
            assert (await problem(r, 409))["state"] == "CANCELLED"


async def test_cancel_409_on_a_completed_job(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    job_id = await create(http, api_stack, job_request(rid("done"), {"sim-cheap": ["ok"]}))
    await wait_state(http, api_stack, job_id, TERMINAL)
    for url in api_stack.urls:
        async with http.post(f"{url}/jobs/{job_id}/cancel", headers=bearer("key-a")) as r:
            body = await problem(r, 409)
        assert body["state"] == "COMPLETED"
        assert "COMPLETED" in body["detail"]


# -- providers, probes, document ------------------------------------------------------------------


async def test_providers_with_health(http: aiohttp.ClientSession, api_stack: ApiStack) -> None:
    for url in api_stack.urls:
        status, body = await get_json(http, url + "/providers")
        assert status == 200, body
        assert body["catalogue_version"]
        assert body["policy_version"].endswith("-test")
        providers = {p["name"]: p for p in body["providers"]}
        assert {"sim-cheap", "sim-fast", "sim-smart"} <= set(providers)
        for provider in body["providers"]:
            health = provider["health"]
            assert set(health) == {
                "latency_ewma_ms",
                "error_rate",
                "samples",
                "consecutive_failures",
                "updated_at",
                "circuit",
            }
            assert 0.0 <= health["error_rate"] <= 1.0
            assert health["samples"] >= 0
            assert health["circuit"] in {"closed", "open", "half_open"}
            assert isinstance(provider["models"], list) and "enabled" in provider
        assert providers["sim-fast"]["models"][0]["prices"]["currency"] == "USD"


async def test_healthz_and_readyz(http: aiohttp.ClientSession, api_stack: ApiStack) -> None:
    served: list[int] = []
    for url in api_stack.urls:
        async with http.get(url + "/healthz") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok"}
        async with http.get(url + "/readyz") as response:
            assert response.status == 200
            body = await response.json()
            assert (body["ready"], body["reason"]) == (True, "ready")
            served += body["partitions"]
    # The workers split the job partitions between them: each is served once.
    assert sorted(served) == list(range(len(served))), served


async def test_openapi_document(http: aiohttp.ClientSession, api_stack: ApiStack) -> None:
    async with http.get(api_stack.cp1 + "/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        document = await response.json()
    assert document["openapi"].startswith("3.1.")
    assert {"title", "version"} <= set(document["info"])
    paths = document["paths"]
    for path, method in [
        ("/jobs", "post"),
        ("/jobs", "get"),
        ("/jobs/by-request/{request_id}", "get"),
        ("/jobs/{job_id}", "get"),
        ("/jobs/{job_id}/result", "get"),
        ("/jobs/{job_id}/events", "get"),
        ("/jobs/{job_id}/cancel", "post"),
        ("/providers", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    ]:
        assert method in paths[path], path
    schemas = document["components"]["schemas"]
    assert {"JobRequest", "FinalResponse", "JobEvent", "Problem"} <= set(schemas)
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document == await (await http.get(api_stack.cp2 + "/openapi.json")).json()


# -- tenant isolation -----------------------------------------------------------------------------


async def _answer(
    http: aiohttp.ClientSession, method: str, url: str, key: str | None
) -> tuple[int, str, str | None, bytes]:
    headers = bearer(key) if key else {}
    async with http.request(method, url, headers=headers) as response:
        raw = await response.read()
        return (
            response.status,
            response.headers.get("Content-Type", ""),
            response.headers.get("Content-Length"),
            raw,
        )


async def test_tenant_b_gets_404_for_tenant_a_jobs(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    """Tenant B sees A's jobs as it sees jobs that do not exist: the same 404, byte for byte.

    The missing id has the same length as the real ones, so bodies compare with the id swapped.
    """
    done = await create(http, api_stack, job_request(rid("mine"), {"sim-cheap": ["ok"]}))
    running = await create(http, api_stack, job_request(rid("mine"), HANG, latency_ms=600_000))
    await wait_state(http, api_stack, done, TERMINAL)
    await wait_state(http, api_stack, running, {"DISPATCHED", "STARTED"})
    missing = job_id_for("tenant-a", rid("never-submitted"))
    assert len(missing) == len(done) == len(running)

    def probes(job_id: str) -> list[tuple[str, str, str | None]]:
        return [
            ("GET", f"/jobs/{job_id}", "key-b"),
            ("GET", f"/jobs/{job_id}/result", "key-b"),
            ("GET", f"/jobs/{job_id}/result?wait=0.2", "key-b"),
            ("GET", f"/jobs/{job_id}/events", "key-b"),
            ("GET", f"/jobs/{job_id}/events?after=1", "key-b"),
            ("GET", f"/jobs/{job_id}/timeline", "key-b"),
            ("POST", f"/jobs/{job_id}/cancel", "key-b"),
        ]

    for url in api_stack.urls:
        for job_id in (done, running):
            for (method, path, key), (_, missing_path, _) in zip(
                probes(job_id), probes(missing), strict=True
            ):
                theirs = await _answer(http, method, url + path, key)
                absent = await _answer(http, method, url + missing_path, key)
                absent_for_a = await _answer(http, method, url + missing_path, "key-a")
                assert theirs[0] == 404, (method, path, theirs)
                assert theirs[1] == PROBLEM_TYPE, theirs[1]
                swapped = (
                    absent[0],
                    absent[1],
                    absent[2],
                    absent[3].replace(missing.encode(), job_id.encode()),
                )
                assert theirs == swapped, (method, path)
                assert absent_for_a[0:3] == absent[0:3]
                assert absent_for_a[3] == absent[3]

    # Tenant A still owns both; B's cancel did nothing.
    status, events = await get_json(http, f"{api_stack.cp1}/jobs/{running}/events")
    assert status == 200
    assert events["state"] != "CANCELLED"
    assert not [e for e in events["events"] if "cancel" in e["type"]], events["events"]
    async with http.post(f"{api_stack.cp1}/jobs/{running}/cancel", headers=bearer("key-a")) as r:
        assert r.status == 202


# -- forwarding -----------------------------------------------------------------------------------


async def test_both_workers_answer_identically_for_jobs_on_every_partition(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    """Jobs on every partition, read through both workers: the same bytes from each.

    Each worker owns only some partitions (both are ready, so both hold some), so for every job
    one of the two answers was forwarded to the other.
    """
    partitions = command_partitions()
    per_partition: dict[int, list[str]] = {p: [] for p in range(partitions)}
    while any(len(ids) < 2 for ids in per_partition.values()):
        request_id = rid("spread")
        slot = per_partition[partition_of(job_id_for("tenant-a", request_id), partitions)]
        if len(slot) < 2:
            slot.append(request_id)
    request_ids = [r for ids in per_partition.values() for r in ids]
    assert len(request_ids) >= 10
    outcomes: list[dict[str, list[str]]] = [{"sim-cheap": ["ok"]}, FALLBACK]
    job_ids = [
        await create(http, api_stack, job_request(r, outcomes[i % 2]))
        for i, r in enumerate(request_ids)
    ]
    await asyncio.gather(*(wait_state(http, api_stack, j, TERMINAL) for j in job_ids))

    for job_id in job_ids:
        for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/result", f"/jobs/{job_id}/events"):
            first = await _answer(http, "GET", api_stack.cp1 + path, "key-a")
            other = await _answer(http, "GET", api_stack.cp2 + path, "key-a")
            again = await _answer(http, "GET", api_stack.cp1 + path, "key-a")
            assert first[0] == other[0] == 200, (path, first, other)
            assert other in (first, again), (path, first, other)


async def test_timeline_page_identical_through_both_workers(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    """The HTML page too, headers included: a forwarded page keeps its charset."""
    partitions = command_partitions()
    request_ids: dict[int, str] = {}
    while len(request_ids) < partitions:
        request_id = rid("page")
        request_ids.setdefault(
            partition_of(job_id_for("tenant-a", request_id), partitions), request_id
        )
    job_ids = [
        await create(http, api_stack, job_request(r, {"sim-cheap": ["ok"]}))
        for r in request_ids.values()
    ]
    await asyncio.gather(*(wait_state(http, api_stack, j, TERMINAL) for j in job_ids))
    for job_id in job_ids:
        path = f"/jobs/{job_id}/timeline"
        answers = [await _answer(http, "GET", url + path, "key-a") for url in api_stack.urls]
        assert answers[0][0] == 200
        assert answers[0][1] == "text/html; charset=utf-8"
        assert answers[1] == answers[0], (path, answers[0][:3], answers[1][:3])


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/no/such/route", 404),
        ("POST", "/nothing-here", 404),
        ("DELETE", "/jobs", 405),
        ("PUT", "/providers", 405),
        ("PATCH", "/jobs", 405),
    ],
)
async def test_unknown_routes_and_methods_answer_problem_json(
    http: aiohttp.ClientSession, api_stack: ApiStack, method: str, path: str, status: int
) -> None:
    """Before: aiohttp's own text/plain `404: Not Found` and `405: Method Not Allowed`."""
    for url in api_stack.urls:
        async with http.request(method, url + path, headers=bearer("key-a")) as response:
            body = await problem(response, status)
            if status == 405:
                assert response.headers.get("Allow"), response.headers
                assert method in body["detail"]


async def test_every_timestamp_is_rfc3339_utc_with_z(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    """Before: `+00:00` in GET /jobs/{id} but `Z` in /result and /events."""
    job_id = await create(http, api_stack, job_request(rid("times"), {"sim-cheap": ["ok"]}))
    await wait_state(http, api_stack, job_id, TERMINAL)
    stamps: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, dict):
            for key_, item in value.items():
                if key_.endswith("_at") and isinstance(item, str):
                    stamps.append(item)
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    for path in ("", "/result", "/events"):
        status, body = await get_json(http, f"{api_stack.cp1}/jobs/{job_id}{path}")
        assert status == 200, body
        collect(body)
        if path == "":
            stamps.extend(body["transitions"].values())
    assert len(stamps) > 10
    assert all(stamp.endswith("Z") and "+00:00" not in stamp for stamp in stamps), stamps


async def test_the_control_plane_joins_no_consumer_group_but_the_job_cores(
    api_stack: ApiStack,
) -> None:
    """faust's own consumer is not started (streams.app): it subscribed to nothing, yet joined a
    group named after the app and heartbeat in a thread of its own."""
    admin = AIOKafkaAdminClient(bootstrap_servers=api_stack.stack.bootstrap)
    await admin.start()
    try:
        groups = {group for group, _ in await admin.list_consumer_groups()}
    finally:
        await admin.close()
    app_id = api_stack.stack.env["CP_APP_ID"]
    assert app_id not in groups, "faust's consumer joined its group"
    assert any(group.endswith(f"{app_id}-core") for group in groups), groups
