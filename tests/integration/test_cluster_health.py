"""One provider health for the cluster, on the real broker with two control-plane workers.

Failures of a provider observed by the jobs of worker A (the owner of their partitions) open the
provider's circuit on worker B too: B's `/providers` shows it open, and a job B owns is routed
around the provider with `circuit_open`, its decision recording the health snapshot it used and
the snapshot's age. The outcomes on cp.health all came from A's steps, so B knew of them only
through the topic.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from domain.ids import job_id_for
from domain.messages import HealthRecord
from streams.placement import partition_for
from tests.api.conftest import wait_split
from tests.support.stack import Stack, TopicReader, new_stack
from tests.support.workers import Worker, free_port, http_get

pytestmark = pytest.mark.integration

KEY = "key-health"
TENANT = "tenant-health"
PARTITIONS = 8
#: The shipped circuit (5 consecutive failures open it), with a cooldown longer than the test so
#: the circuit stays open while it is looked at.
CIRCUIT = {
    "failure_threshold": 5,
    "error_rate_threshold": 0.5,
    "min_samples": 10,
    "cooldown_ms": 600_000,
    "ewma_alpha": 0.2,
}
#: sim-cheap fails (retryable) on both of its attempts; the job then falls back to sim-fast.
FAILING = {"sim-cheap": ["provider_internal", "provider_internal"], "sim-fast": ["ok"]}


@dataclass
class Cluster:
    stack: Stack
    a: Worker
    b: Worker


@pytest.fixture(scope="module")
def cluster(
    kafka_bootstrap: str, run_id: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    root: Path = tmp_path_factory.mktemp("health-stack")
    stack = new_stack(kafka_bootstrap, run_id, "health", root)
    policy_file = Path(stack.env["CP_POLICY_FILE"])
    policy = yaml.safe_load(policy_file.read_text())
    policy["circuit"] = CIRCUIT
    policy_file.write_text(yaml.safe_dump(policy, sort_keys=False))
    stack.env["CP_API_KEYS"] = f"{KEY}={TENANT}"
    try:
        stack.start_providers()
        a = stack.start_cp("cp-a", free_port())
        b = stack.start_cp("cp-b", free_port())
        wait_split((a.url, b.url))
        yield Cluster(stack, a, b)
    finally:
        stack.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        yield session


def partitions_of(worker: Worker) -> set[int]:
    status, body = http_get(worker.url + "/readyz")
    assert status == 200, body
    return set(yaml.safe_load(body)["partitions"])


def request_ids_on(partitions: set[int], count: int) -> list[str]:
    """Request ids of this tenant whose jobs hash to one of `partitions`."""
    found: list[str] = []
    while len(found) < count:
        request_id = f"h-{uuid.uuid4().hex[:10]}"
        if partition_for(job_id_for(TENANT, request_id), PARTITIONS) in partitions:
            found.append(request_id)
    return found


def body(request_id: str, outcomes: dict[str, list[str]] | None = None) -> dict[str, Any]:
    job: dict[str, Any] = {
        "request_id": request_id,
        "messages": [{"role": "user", "content": f"question {request_id}"}],
        "preference": "cost",
    }
    if outcomes is not None:
        job["simulate"] = {"outcomes": outcomes, "latency_ms": 5}
    return job


async def run_job(http: aiohttp.ClientSession, url: str, job: dict[str, Any]) -> dict[str, Any]:
    """POST the job to `url` and wait for its final response there."""
    async with http.post(url + "/jobs", json=job) as response:
        answer = await response.json(content_type=None)
        assert response.status == 202, answer
    job_id = answer["job_id"]
    async with http.get(f"{url}/jobs/{job_id}/result?wait=30") as response:
        final = await response.json(content_type=None)
        assert response.status == 200, final
    return dict(final)


async def circuit(
    http: aiohttp.ClientSession, url: str, provider: str
) -> tuple[str, dict[str, Any]]:
    async with http.get(url + "/providers") as response:
        assert response.status == 200
        answer = await response.json(content_type=None)
    assert answer["health_scope"] == "cluster"
    [entry] = [p for p in answer["providers"] if p["name"] == provider]
    return str(entry["health"]["circuit"]), answer


async def until_open(
    http: aiohttp.ClientSession, url: str, provider: str, timeout_s: float = 20
) -> tuple[str, dict[str, Any]]:
    """The provider's circuit at `url` once it is open, or as it is after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        state, answer = await circuit(http, url, provider)
        if state == "open" or time.monotonic() > deadline:
            return state, answer
        await asyncio.sleep(0.1)


async def test_failures_seen_by_one_worker_open_the_circuit_for_the_other(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    a_parts, b_parts = partitions_of(cluster.a), partitions_of(cluster.b)
    assert a_parts and b_parts and not a_parts & b_parts, (a_parts, b_parts)
    state, before = await circuit(http, cluster.b.url, "sim-cheap")
    assert state == "closed", before

    # Jobs of A's partitions, sent to A: sim-cheap fails twice in each, then sim-fast answers.
    for request_id in request_ids_on(a_parts, 3):
        final = await run_job(http, cluster.a.url, body(request_id, FAILING))
        assert final["state"] == "COMPLETED" and final["provider"] == "sim-fast", final

    # B never applied any of those steps, yet its circuit opens (A's too). Each worker folds
    # cp.health with a consumer of its own, so A may see its own outcomes after B does.
    state_b, answer_b = await until_open(http, cluster.b.url, "sim-cheap")
    assert state_b == "open", answer_b
    assert answer_b["health_as_of"] is not None and answer_b["health_outcomes_folded"] >= 5
    state_a, answer_a = await until_open(http, cluster.a.url, "sim-cheap")
    assert state_a == "open", answer_a

    # Every failure on cp.health came from a step of A.
    async with TopicReader(cluster.stack.bootstrap, cluster.stack.topic("cp.health")) as reader:
        await reader.until(
            lambda records: sum(1 for r in records if b'"ok":false' in r.value) >= 5,
            timeout=20,
            what="5 failed outcomes",
        )
        outcomes = [HealthRecord.model_validate(v) for v in reader.values()]
    failures = [o for o in outcomes if not o.ok]
    assert {o.provider for o in failures} == {"sim-cheap"}
    assert {o.worker for o in failures} == {cluster.a.url}, failures

    # A job of B's partitions, sent to B, is routed around sim-cheap because of A's failures.
    [request_id] = request_ids_on(b_parts, 1)
    final = await run_job(http, cluster.b.url, body(request_id))
    assert final["state"] == "COMPLETED" and final["provider"] != "sim-cheap", final
    async with http.get(f"{cluster.b.url}/jobs/{final['job_id']}/events") as response:
        assert response.status == 200
        events = (await response.json(content_type=None))["events"]
    [routed] = [e for e in events if e["type"] == "routed"]
    decision = routed["data"]["decision"]
    excluded = {(e["provider"], e["reason_code"]) for e in decision["excluded"]}
    assert ("sim-cheap", "circuit_open") in excluded, decision["excluded"]
    assert decision["health"]["sim-cheap"]["circuit"] == "open"
    assert decision["health_as_of"] is not None
    assert 0 <= decision["health_age_ms"] < 600_000

    # A worker that starts now replays cp.health before it routes: the circuit is open on it at
    # its first answer, with no new outcome folded since.
    cluster.b.stop(timeout=15)
    c = cluster.stack.start_cp("cp-c", free_port())
    state_c, answer_c = await circuit(http, c.url, "sim-cheap")
    assert state_c == "open", answer_c
    assert answer_c["health_outcomes_folded"] >= len(outcomes)
