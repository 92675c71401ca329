"""The read ports (`CP_READ_PORT`): a reader answers `GET /jobs/{id}` as the worker does.

On the API stack (two control-plane workers, each with a read port): a read of one of cp-1's jobs
is served by cp-1's reader from the status view the job core handed it (no `Via` header), with
the same body as the worker's, and follows the job through its states; a read of one of cp-2's
jobs on cp-1's read port goes straight to cp-2's read port (marked `Via`), once; everything else
is relayed to cp-1 (marked `Via`). A reader killed is started again by its worker.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import uuid
from typing import Any

import aiohttp
import orjson
import pytest

from domain.ids import job_id_for
from streams.placement import partition_for
from tests.api.conftest import ApiStack, bearer, create, get_json, job_request
from tests.support.workers import child_pids, http_get

pytestmark = pytest.mark.integration

PARTITIONS = 8
LIFECYCLE = ["CREATED", "ROUTED", "DISPATCHED", "STARTED", "RETRYING", "COMPLETED"]


def cp1_partitions(api: ApiStack) -> set[int]:
    status, body = http_get(api.cp1 + "/readyz")
    assert status == 200, body
    return set(orjson.loads(body)["partitions"])


def request_id_on(partitions: set[int], tenant: str = "tenant-a", *, inside: bool = True) -> str:
    """A fresh request_id whose job lands on (or off) the given partitions."""
    while True:
        rid = f"rd-{uuid.uuid4().hex[:10]}"
        if (partition_for(job_id_for(tenant, rid), PARTITIONS) in partitions) == inside:
            return rid


async def fetch(
    http: aiohttp.ClientSession, url: str, key: str = "key-a"
) -> tuple[int, dict[str, Any], str | None]:
    async with http.get(url, headers=bearer(key)) as response:
        return response.status, await response.json(content_type=None), response.headers.get("Via")


def without_link(body: dict[str, Any]) -> dict[str, Any]:
    links = {k: v for k, v in body["links"].items() if k != "timeline_signed"}
    return {**body, "links": links}


def reads_counted(text: str, outcome: str) -> float:
    pattern = re.compile(rf'^cp_reader_reads_total{{outcome="{outcome}"}} ([\d.e+]+)$', re.M)
    found = pattern.search(text)
    return float(found[1]) if found else 0.0


async def counted(http: aiohttp.ClientSession, worker: str, outcome: str) -> float:
    async with http.get(worker + "/metrics") as response:
        return reads_counted(await response.text(), outcome)


async def expect_counted(
    http: aiohttp.ClientSession, api: ApiStack, outcome: str, *, above: float = 0, worker: str = ""
) -> None:
    """The worker's (cp-1's) /metrics counts more than `above` read-port requests of that
    outcome (readers report once a second)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while loop.time() < deadline:
        if await counted(http, worker or api.cp1, outcome) > above:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"cp_reader_reads_total{{outcome={outcome!r}}} never counted")


async def finished(http: aiohttp.ClientSession, api: ApiStack, rid: str) -> str:
    job_id = await create(http, api, job_request(rid, {"sim-cheap": ["ok"]}))
    status, _ = await get_json(http, f"{api.cp1}/jobs/{job_id}/result?wait=30")
    assert status == 200
    return job_id


async def test_a_read_of_a_job_held_here_is_served_by_the_reader_as_the_worker_answers(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    mine = cp1_partitions(api_stack)
    job_id = await finished(http, api_stack, request_id_on(mine))
    by_worker = await fetch(http, f"{api_stack.cp1}/jobs/{job_id}")
    for _ in range(3):
        by_reader = await fetch(http, f"{api_stack.read1}/jobs/{job_id}")
        assert by_reader[0] == by_worker[0] == 200
        assert by_reader[2] is None, "served by the reader, not relayed"
        assert without_link(by_reader[1]) == without_link(by_worker[1])
    await expect_counted(http, api_stack, "served")
    # its signed timeline link opens the page (relayed to the worker, which checks it)
    async with http.get(api_stack.read1 + by_reader[1]["links"]["timeline_signed"]) as page:
        assert page.status == 200 and page.content_type == "text/html"
        assert page.headers["Via"]


async def test_a_job_of_the_other_worker_goes_straight_to_its_read_port(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    job_id = await finished(http, api_stack, request_id_on(cp1_partitions(api_stack), inside=False))
    passed = await counted(http, api_stack.cp1, "passed")
    answered = sum([await counted(http, api_stack.cp2, o) for o in ("asked", "served")])
    status, body, via = await fetch(http, f"{api_stack.read1}/jobs/{job_id}")
    assert (status, body["state"]) == (200, "COMPLETED")
    assert via == "1.1 cp-reader", "passed on by cp-1's reader, served by cp-2's"
    by_owner = await fetch(http, f"{api_stack.cp2}/jobs/{job_id}")
    assert without_link(body) == without_link(by_owner[1])
    await expect_counted(http, api_stack, "passed", above=passed)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while sum([await counted(http, api_stack.cp2, o) for o in ("asked", "served")]) <= answered:
        assert loop.time() < deadline, "cp-2's readers never answered it"
        await asyncio.sleep(0.3)


async def test_a_read_a_reader_relayed_is_not_passed_on_again(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    """A read marked by a reader goes to the worker (which forwards it to the owner): readers
    whose placements disagree for a moment cannot pass a read back and forth."""
    job_id = await finished(http, api_stack, request_id_on(cp1_partitions(api_stack), inside=False))
    relayed = await counted(http, api_stack.cp1, "relayed")
    headers = {**bearer("key-a"), "Via": "1.1 cp-reader"}
    async with http.get(f"{api_stack.read1}/jobs/{job_id}", headers=headers) as response:
        assert response.status == 200 and (await response.json())["state"] == "COMPLETED"
    await expect_counted(http, api_stack, "relayed", above=relayed)


async def test_the_view_follows_the_job_through_its_states(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    rid = request_id_on(cp1_partitions(api_stack))
    job_id = await create(http, api_stack, job_request(rid, {"sim-cheap": ["ok"]}, latency_ms=1500))
    seen: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while loop.time() < deadline:
        status, body, via = await fetch(http, f"{api_stack.read1}/jobs/{job_id}")
        assert status == 200 and via is None, (status, body, via)
        if not seen or seen[-1] != body["state"]:
            seen.append(body["state"])
        if body["terminal"]:
            break
        await asyncio.sleep(0.02)
    assert seen[-1] == "COMPLETED", seen
    assert "STARTED" in seen, f"the running job's view was served meanwhile: {seen}"
    ranks = [LIFECYCLE.index(state) for state in seen]
    assert ranks == sorted(ranks), f"a view older than one already served came back: {seen}"
    final = await fetch(http, f"{api_stack.cp1}/jobs/{job_id}")
    assert without_link(final[1]) == without_link(body)


async def test_refusals_are_the_workers(http: aiohttp.ClientSession, api_stack: ApiStack) -> None:
    job_id = await finished(http, api_stack, request_id_on(cp1_partitions(api_stack)))
    for path, key in [
        (f"/jobs/{job_id}", "key-b"),  # another tenant's job: absent, as a missing one
        ("/jobs/job_nosuchjobnosuchjobnosuchjo", "key-a"),
        (f"/jobs/{job_id}", "not-a-key"),
    ]:
        by_worker = await fetch(http, api_stack.cp1 + path, key)
        by_reader = await fetch(http, api_stack.read1 + path, key)
        assert by_reader[:2] == by_worker[:2]
        assert by_worker[0] in (401, 404)


async def test_other_requests_are_relayed_writes_and_long_polls_too(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    body = job_request(f"rd-post-{uuid.uuid4().hex[:8]}", {"sim-cheap": ["ok"]})
    async with http.post(api_stack.read1 + "/jobs", json=body, headers=bearer("key-a")) as answer:
        assert answer.status == 202 and answer.headers["Via"]
        assert answer.headers["Location"].startswith("/jobs/")
        job_id = (await answer.json())["job_id"]
    status, result, via = await fetch(http, f"{api_stack.read1}/jobs/{job_id}/result?wait=30")
    assert (status, result["state"], via is not None) == (200, "COMPLETED", True)
    status, _, _ = await fetch(http, f"{api_stack.read1}/jobs/{job_id}?wait=5")
    assert status == 200


async def test_a_killed_reader_is_started_again(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    worker = api_stack.stack.cp
    assert worker is not None and worker.process is not None
    pid = worker.process.pid

    before = child_pids(pid)
    assert len(before) == 2, before  # CP_READERS' default
    os.kill(before[0], signal.SIGKILL)
    job_id = await finished(http, api_stack, request_id_on(cp1_partitions(api_stack)))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while loop.time() < deadline:
        now = child_pids(pid)
        if len(now) == 2 and before[0] not in now:
            try:
                status, _, via = await fetch(http, f"{api_stack.read1}/jobs/{job_id}")
            except aiohttp.ClientConnectionError:
                status, via = 0, None
            if status == 200 and via is None:
                return
        await asyncio.sleep(0.2)
    raise AssertionError(f"no reader started after {before[0]} was killed: {child_pids(pid)}")


def test_only_the_workers_user_may_connect_to_its_socket(api_stack: ApiStack) -> None:
    """The socket hands out views of every tenant's jobs without a key."""
    socket = api_stack.stack.root / "data" / "cp-1" / "read.sock"
    assert stat.S_ISSOCK(socket.stat().st_mode)
    assert stat.S_IMODE(socket.stat().st_mode) == 0o600
