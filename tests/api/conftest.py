"""An API stack of its own: two control-plane workers splitting the partitions, one provider worker.

The pipeline tests' session `stack` has one control-plane worker; the API tests need two, so that
a request to either worker is served by the owner of the job's partition (forwarded when needed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.stack import Stack, new_stack
from tests.support.workers import free_port, http_get

#: API keys of the API stack: two tenants.
API_KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
#: A small body limit so that the 413 path is cheap to reach.
MAX_REQUEST_BYTES = 20_000


@dataclass
class ApiStack:
    stack: Stack
    cp1: str
    cp2: str
    #: cp-1's and cp-2's read ports (`CP_READ_PORT`), answered by their reader processes.
    read1: str = ""
    read2: str = ""

    @property
    def urls(self) -> tuple[str, str]:
        return self.cp1, self.cp2

    def stop(self) -> None:
        self.stack.stop()


def wait_split(urls: tuple[str, ...], timeout: float = 90.0, stable_polls: int = 5) -> None:
    """Wait until every worker says ready (so each holds partitions) several polls in a row."""
    deadline = time.monotonic() + timeout
    streak = 0
    last: list[tuple[int, bytes]] = []
    while time.monotonic() < deadline:
        last = [http_get(url + "/readyz", timeout=2) for url in urls]
        streak = streak + 1 if all(status == 200 for status, _ in last) else 0
        if streak >= stable_polls:
            return
        time.sleep(0.2)
    raise AssertionError(f"workers never all ready with partitions split: {last}")


def start_api_stack(bootstrap: str, run_id: str, root: Path) -> ApiStack:
    """Start the provider worker and two control-plane workers in one group; wait for the split."""
    stack = new_stack(bootstrap, run_id, "api", root)
    stack.env["CP_API_KEYS"] = ",".join(f"{key}={tenant}" for key, tenant in API_KEYS.items())
    stack.env["CP_MAX_REQUEST_BYTES"] = str(MAX_REQUEST_BYTES)
    try:
        stack.start_providers()
        read1, read2 = free_port(), free_port()
        cp1 = stack.start_cp("cp-1", free_port(), env={"CP_READ_PORT": str(read1)})
        cp2 = stack.start_cp("cp-2", free_port(), env={"CP_READ_PORT": str(read2)})
        wait_split((cp1.url, cp2.url))
    except BaseException:
        stack.stop()
        raise
    return ApiStack(
        stack=stack,
        cp1=cp1.url,
        cp2=cp2.url,
        read1=f"http://127.0.0.1:{read1}",
        read2=f"http://127.0.0.1:{read2}",
    )


@pytest.fixture(scope="package")
def api_stack(
    kafka_bootstrap: str, run_id: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiStack]:
    """The API stack, shared by the modules of tests/api and stopped after the last of them."""
    api = start_api_stack(kafka_bootstrap, run_id, tmp_path_factory.mktemp("api-stack"))
    try:
        yield api
    finally:
        api.stop()


# -- helpers shared by the API test modules --------------------------------------------------------

USAGE = {"input_tokens": 100, "output_tokens": 50}
FALLBACK = {"sim-cheap": ["provider_internal"], "sim-fast": ["ok"]}
#: Every simulated provider hangs: each attempt times out (5 s in tests), so the job stays open
#: for about 20 s across its four attempts, unless cancelled.
HANG = {name: ["hang"] for name in ("sim-cheap", "sim-fast", "sim-smart")}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "EXPIRED"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def job_request(
    request_id: str,
    outcomes: dict[str, list[str]] | None = None,
    *,
    latency_ms: int = 5,
    content: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": request_id,
        "messages": [{"role": "user", "content": content or f"question {request_id}"}],
        "preference": "cost",
    }
    if outcomes is not None:
        body["simulate"] = {"outcomes": outcomes, "latency_ms": latency_ms, "usage": USAGE}
    return body


async def submit(
    http: aiohttp.ClientSession, api: ApiStack, body: dict[str, Any], key: str = "key-a"
) -> tuple[int, dict[str, Any]]:
    """POST /jobs at cp-1, which forwards it to the owner when cp-2 owns the job."""
    async with http.post(api.urls[0] + "/jobs", json=body, headers=bearer(key)) as response:
        return response.status, await response.json(content_type=None)


async def create(
    http: aiohttp.ClientSession, api: ApiStack, body: dict[str, Any], key: str = "key-a"
) -> str:
    status, answer = await submit(http, api, body, key)
    assert status == 202, answer
    return str(answer["job_id"])


async def get_json(
    http: aiohttp.ClientSession, url: str, key: str = "key-a"
) -> tuple[int, dict[str, Any]]:
    async with http.get(url, headers=bearer(key)) as response:
        return response.status, await response.json(content_type=None)


async def wait_state(
    http: aiohttp.ClientSession,
    api: ApiStack,
    job_id: str,
    states: set[str],
    *,
    timeout: float = 30.0,
    key: str = "key-a",
) -> dict[str, Any]:
    """Poll GET /jobs/{id} until the job is in one of `states`; return the status body."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: tuple[int, dict[str, Any]] = (0, {})
    while loop.time() < deadline:
        last = await get_json(http, f"{api.cp1}/jobs/{job_id}", key)
        if last[0] == 200 and last[1]["state"] in states:
            return last[1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {sorted(states)}; last answer {last}")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session:
        yield session
