"""`GET /jobs` and `GET /jobs/by-request/{request_id}` on the two-worker API stack."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from domain.ids import job_id_for
from tests.api.conftest import (
    HANG,
    TERMINAL,
    ApiStack,
    bearer,
    create,
    get_json,
    job_request,
    wait_state,
)

pytestmark = pytest.mark.integration

ITEM_KEYS = {
    "job_id",
    "request_id",
    "state",
    "terminal",
    "created_at",
    "updated_at",
    "provider",
    "model",
    "links",
}


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def pages(
    http: aiohttp.ClientSession, api: ApiStack, query: dict[str, str], key: str = "key-a"
) -> list[list[dict[str, Any]]]:
    """Every page of a listing, asking each worker in turn."""
    found: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    for n in range(100):
        params = dict(query, **({"cursor": cursor} if cursor else {}))
        url = api.urls[n % 2] + "/jobs"
        async with http.get(url, params=params, headers=bearer(key)) as response:
            body = await response.json(content_type=None)
            assert response.status == 200, body
        assert set(body) == {"items", "next_cursor"}
        found.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return found
    raise AssertionError("the listing never ended")


async def test_listing_pages_through_every_job_of_the_tenant_newest_first_once(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    tag = uuid.uuid4().hex[:8]
    since = rfc3339(datetime.now(UTC) - timedelta(milliseconds=5))
    done = [
        await create(http, api_stack, job_request(f"list-{tag}-{n}", {"sim-cheap": ["ok"]}))
        for n in range(9)
    ]
    hung = [
        await create(http, api_stack, job_request(f"list-{tag}-h{n}", HANG, latency_ms=600_000))
        for n in range(3)
    ]
    other = await create(
        http, api_stack, job_request(f"list-{tag}-b", {"sim-cheap": ["ok"]}), "key-b"
    )
    for job_id in hung:
        await wait_state(http, api_stack, job_id, {"DISPATCHED", "STARTED"})
        async with http.post(f"{api_stack.cp2}/jobs/{job_id}/cancel", headers=bearer("key-a")) as r:
            assert r.status == 202
    for job_id in done + hung:
        await wait_state(http, api_stack, job_id, TERMINAL)
    mine = set(done) | set(hung)

    listed = await pages(http, api_stack, {"since": since, "limit": "5"})
    items = [item for page in listed for item in page]
    assert [len(page) for page in listed[:-1]] == [5] * (len(listed) - 1)
    ids = [item["job_id"] for item in items]
    assert len(ids) == len(set(ids)) and set(ids) == mine  # every job once, no other tenant's
    order = [(item["created_at"], item["job_id"]) for item in items]
    assert order == sorted(order, key=lambda o: (datetime.fromisoformat(o[0]), o[1]), reverse=True)
    for item in items:
        assert set(item) == ITEM_KEYS, item
        assert item["links"]["self"] == f"/jobs/{item['job_id']}"
    completed = {item["job_id"]: item for item in items if item["state"] == "COMPLETED"}
    assert set(completed) == set(done)
    assert all(item["provider"] == "sim-cheap" and item["model"] for item in completed.values())

    # Filters: states, groups of states, the creation window.
    cancelled = await pages(http, api_stack, {"since": since, "state": "CANCELLED"})
    assert {i["job_id"] for page in cancelled for i in page} == set(hung)
    terminal = await pages(http, api_stack, {"since": since, "state": "terminal", "limit": "50"})
    assert {i["job_id"] for page in terminal for i in page} == mine
    assert await pages(http, api_stack, {"since": since, "state": "open"}) == [[]]
    assert await pages(http, api_stack, {"since": since, "until": since}) == [[]]
    newest = items[0]
    window = await pages(http, api_stack, {"since": newest["created_at"]})
    assert [i["job_id"] for page in window for i in page] == [newest["job_id"]]

    # The other tenant sees its own job only.
    theirs = await pages(http, api_stack, {"since": since}, key="key-b")
    assert [i["job_id"] for page in theirs for i in page] == [other]


async def test_by_request_answers_the_jobs_status_through_either_worker(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    request_id = f"byreq/{uuid.uuid4().hex[:8]}"
    job_id = await create(http, api_stack, job_request(request_id, {"sim-cheap": ["ok"]}))
    assert job_id == job_id_for("tenant-a", request_id)
    await wait_state(http, api_stack, job_id, TERMINAL)
    for url in api_stack.urls:
        status, body = await get_json(http, f"{url}/jobs/by-request/{request_id}")
        assert status == 200, body
        assert (body["job_id"], body["request_id"], body["state"]) == (
            job_id,
            request_id,
            "COMPLETED",
        )
        # Another tenant's request ids name other jobs: theirs is not found.
        status, body = await get_json(http, f"{url}/jobs/by-request/{request_id}", "key-b")
        assert status == 404, body
        status, _ = await get_json(http, f"{url}/jobs/by-request/result")
        assert status == 404  # a request id, not the /jobs/{id}/result route


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=201",
        "limit=ten",
        "state=DONE",
        "since=yesterday",
        "since=2026-01-01T00:00:00",
        "until=2026-13-01T00:00:00Z",
        "cursor=!!!",
        "cursor=bm90LWEtY3Vyc29y",
    ],
)
async def test_invalid_listing_parameters_answer_422(
    http: aiohttp.ClientSession, api_stack: ApiStack, query: str
) -> None:
    for url in api_stack.urls:
        async with http.get(f"{url}/jobs?{query}", headers=bearer("key-a")) as response:
            body = await response.json(content_type=None)
            assert response.status == 422, body
            assert response.content_type == "application/problem+json"
            assert body["errors"][0]["loc"][0] == "query"


async def test_listing_and_by_request_need_a_key(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    for path in ("/jobs", "/jobs/by-request/anything"):
        async with http.get(api_stack.cp1 + path) as response:
            assert response.status == 401
