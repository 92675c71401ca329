"""Growing a running deployment from 4 to 8 job partitions with jobs in flight.

The tool is `streams.repartition`.

A stack of its own on 4 partitions: finished jobs, and jobs whose provider calls are still running
(slow simulated calls, some failing first and retried or falling back) when the control-plane
worker is stopped. While it is down, more jobs arrive on cp.intake and the provider worker goes
on answering. The tool grows every topic to 8 partitions and moves each job's state; two workers
with the new topics.yaml then finish everything. Every job ends exactly once (one final response,
one final event), every job is readable, the moved state included, and the figures of the pause
are printed. The tool refuses while a worker runs; a worker whose topics.yaml disagrees with the
broker refuses to start; a second run moves nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from domain.ids import job_id_for
from streams.placement import partition_for
from tests.api.conftest import wait_split
from tests.support.stack import Stack, TopicReader, new_stack, produce
from tests.support.workers import Worker, free_port, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KEY = "key-repart"
TENANT = "tenant-repart"
BEFORE, AFTER = 4, 8
FINISHED, IN_FLIGHT, RETRIED, DURING_PAUSE = 30, 30, 10, 15
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "EXPIRED"}


@dataclass
class Repart:
    stack: Stack
    topics_file: Path


def write_topics(path: Path, partitions: int) -> None:
    topics = yaml.safe_load((ROOT / "topics.yaml").read_text())
    topics["defaults"]["partitions"] = partitions
    path.write_text(yaml.safe_dump(topics, sort_keys=False))


@pytest.fixture(scope="module")
def repart(
    kafka_bootstrap: str, run_id: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Repart]:
    root: Path = tmp_path_factory.mktemp("repart-stack")
    topics_file = root / "topics.yaml"
    write_topics(topics_file, BEFORE)
    stack = new_stack(kafka_bootstrap, run_id, "repart", root, topics_file=topics_file)
    stack.env["CP_API_KEYS"] = f"{KEY}={TENANT}"
    try:
        stack.start_providers()
        yield Repart(stack, topics_file)
    finally:
        stack.stop()


def tool(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streams.repartition", *args],
        env={**os.environ, **stack.env},
        cwd=ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )


def job(
    request_id: str, *, latency_ms: int = 5, outcomes: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": request_id,
        "messages": [{"role": "user", "content": f"question {request_id}"}],
        "preference": "cost",
        "simulate": {"latency_ms": latency_ms},
        # Calls longer than the tests' 5 s attempt timeout.
        "attempt_timeout_ms": 60_000,
    }
    if outcomes is not None:
        body["simulate"]["outcomes"] = outcomes
    return body


async def post_all(http: aiohttp.ClientSession, url: str, bodies: list[dict[str, Any]]) -> None:
    for body in bodies:
        async with http.post(url + "/jobs", json=body) as response:
            assert response.status == 202, await response.text()


async def states(http: aiohttp.ClientSession, url: str, job_ids: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for job_id in job_ids:
        async with http.get(f"{url}/jobs/{job_id}") as response:
            answer = await response.json(content_type=None)
            found[job_id] = answer.get("state", f"http {response.status}")
    return found


async def test_grow_from_4_to_8_partitions_with_jobs_in_flight(repart: Repart) -> None:
    stack = repart.stack
    headers = {"Authorization": f"Bearer {KEY}"}
    cp1 = stack.start_cp("cp-1", free_port())
    ids = {
        "finished": [f"fin-{n}" for n in range(FINISHED)],
        # Calls of 6 to 12 s: running at the provider while the control plane is stopped.
        "in_flight": [f"slow-{n}" for n in range(IN_FLIGHT)],
        # sim-cheap fails first: retried or fallen back to across the move.
        "retried": [f"retry-{n}" for n in range(RETRIED)],
        "paused": [f"paused-{n}" for n in range(DURING_PAUSE)],
    }
    job_ids = {name: [job_id_for(TENANT, r) for r in rids] for name, rids in ids.items()}
    every = [j for group in job_ids.values() for j in group]
    moving = [j for j in every if partition_for(j, AFTER) != partition_for(j, BEFORE)]
    assert len(moving) > len(every) // 4  # about half the jobs change partition

    async with aiohttp.ClientSession(headers=headers) as http:
        await post_all(http, cp1.url, [job(r) for r in ids["finished"]])
        deadline = time.monotonic() + 60
        while set((await states(http, cp1.url, job_ids["finished"])).values()) != {"COMPLETED"}:
            assert time.monotonic() < deadline, "finished jobs did not finish"
            await asyncio.sleep(0.2)
        await post_all(
            http,
            cp1.url,
            [job(r, latency_ms=6000 + 200 * n) for n, r in enumerate(ids["in_flight"])],
        )
        failing = {"sim-cheap": ["provider_internal", "ok"], "sim-fast": ["ok"]}
        await post_all(
            http, cp1.url, [job(r, latency_ms=3000, outcomes=failing) for r in ids["retried"]]
        )
        # Wait until every in-flight job is at its provider (dispatched or started).
        deadline = time.monotonic() + 30
        while True:
            now = await states(http, cp1.url, job_ids["in_flight"] + job_ids["retried"])
            if set(now.values()) <= {"DISPATCHED", "STARTED", "RETRYING"}:
                break
            assert time.monotonic() < deadline, Counter(now.values())
            await asyncio.sleep(0.1)

    # The tool refuses while a control-plane worker is in the group.
    write_topics(repart.topics_file, AFTER)
    refused = tool(stack)
    assert refused.returncode == 2, refused
    assert "stop every control-plane worker" in refused.stderr

    stopped_at = time.monotonic()
    cp1.stop(timeout=30)
    # Jobs keep arriving on Kafka while no control-plane worker runs.
    await produce(
        stack.bootstrap,
        stack.topic("cp.intake"),
        [orjson.dumps({**job(r), "tenant_id": TENANT}) for r in ids["paused"]],
    )
    dry = tool(stack, "--dry-run")
    assert dry.returncode == 0, dry
    assert "would move" in dry.stdout and "would grow" in dry.stdout
    tool_started = time.monotonic()
    done = tool(stack)
    tool_seconds = time.monotonic() - tool_started
    assert done.returncode == 0, done
    print("\n" + done.stdout)
    assert f"job partitions {BEFORE} -> {AFTER}" in done.stdout
    moved = int(done.stdout.split(" jobs (")[0].rsplit(" ", 1)[1])
    # Every job created before the stop whose partition changed was moved (paused ones are not
    # jobs yet: they are still intake records).
    created = [j for j in moving if j not in job_ids["paused"]]
    assert moved == len(created), (moved, len(created))

    # A worker still counting 4 partitions refuses to start.
    old_topics = repart.topics_file.with_name("topics-old.yaml")
    write_topics(old_topics, BEFORE)
    stale = Worker.faust(
        "streams.app",
        env={**stack.env, "CP_TOPICS_FILE": str(old_topics)},
        data_dir=stack.root / "data" / "stale",
        web_port=free_port(),
        log_path=stack.root / "logs" / "stale.log",
    ).start()
    try:
        wait_for(lambda: not stale.alive(), timeout=60, what="the stale worker to refuse")
    finally:
        stale.stop(timeout=5)
    assert "streams.repartition" in (stack.root / "logs" / "stale.log").read_text()

    cp1 = stack.start_cp("cp-1", cp1.web_port)
    cp2 = stack.start_cp("cp-2", free_port())
    wait_split((cp1.url, cp2.url))
    ready_at = time.monotonic()

    async with aiohttp.ClientSession(headers=headers) as http:
        deadline = time.monotonic() + 120
        while True:
            final = await states(http, cp1.url, every)
            if set(final.values()) <= TERMINAL:
                break
            assert time.monotonic() < deadline, Counter(final.values())
            await asyncio.sleep(0.5)
        all_done_at = time.monotonic()
        failed = [j for j, state in final.items() if state != "COMPLETED"]
        if failed:
            async with http.get(f"{cp1.url}/jobs/{failed[0]}/events") as response:
                print(await response.text())
        assert Counter(final.values()) == {"COMPLETED": len(every)}, Counter(final.values())
        # Each worker answers for every job (its own or forwarded), moved state included.
        assert set((await states(http, cp2.url, every)).values()) == {"COMPLETED"}

    async with TopicReader(stack.bootstrap, stack.topic("cp.responses")) as responses:
        await responses.until(
            lambda records: {r.key.decode() for r in records} >= set(every),
            timeout=30,
            what="a final response per job",
        )
        await responses.poll(500)
        per_job = Counter(r.key.decode() for r in responses.records)
    assert set(per_job) == set(every)
    assert max(per_job.values()) == 1, [j for j, n in per_job.items() if n > 1]
    async with TopicReader(stack.bootstrap, stack.topic("cp.events")) as events:
        await events.until(
            lambda records: sum(b'"type":"completed"' in r.value for r in records) >= len(every),
            timeout=30,
            what="a completed event per job",
        )
        await events.poll(500)
        finals = Counter(r.key.decode() for r in events.records if b'"type":"completed"' in r.value)
    assert set(finals) == set(every) and max(finals.values()) == 1

    again = tool(stack, "--dry-run")
    assert again.returncode == 2  # workers are running again: refused, nothing touched
    print(
        json.dumps(
            {
                "jobs": len(every),
                "moved": moved,
                "tool_s": round(tool_seconds, 2),
                "stop_to_ready_s": round(ready_at - stopped_at, 2),
                "stop_to_all_final_s": round(all_done_at - stopped_at, 2),
            }
        )
    )
