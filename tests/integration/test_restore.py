"""Many held jobs: restoring them neither blocks the worker nor the group.

The changelog is filled with many finished jobs (rows and requests written straight to it, as a
long-running deployment would have left them), then a worker starts and a second one joins while
the first holds them all. While partitions are fenced and rebuilt, both workers keep answering
HTTP, nobody is thrown out of the group for a missed heartbeat, and afterwards every job sampled
reads back from both workers.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from domain.commands import CreateJob, RecordResult
from domain.decide import decide
from domain.ids import job_id_for
from domain.job import Job
from domain.messages import JobRequest, ProviderResult
from streams.placement import partition_for
from streams.runtime import Runtime
from tables.jobs import REQUEST, ROW, encode_request, encode_row, key, row_headers
from tests.support.stack import Stack, new_stack
from tests.support.workers import Worker, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HELD = 20_000
PARTITIONS = 8


def finished_job(stack: Stack, tenant: str) -> Job:
    """One job taken through create, started and completed by the real decide."""
    runtime = Runtime.load(stack.settings())
    request = JobRequest.model_validate(
        {
            "request_id": "template",
            "tenant_id": tenant,
            "messages": [{"role": "user", "content": "a held job"}],
            "simulate": {"outcomes": {"sim-cheap": ["ok"]}},
        }
    )
    now = datetime.now(UTC)
    job_id = job_id_for(tenant, "template")
    job = decide(
        None,
        CreateJob(
            command_id="c",
            job_id=job_id,
            at=now,
            tenant_id=tenant,
            fingerprint=request.fingerprint(),
            request=request,
        ),
        runtime.context(),
    ).job
    assert job is not None and job.current is not None
    for n, kind in enumerate(("started", "completed")):
        result = ProviderResult.model_validate(
            {
                "type": kind,
                "event_id": f"e{n}",
                "job_id": job_id,
                "attempt_id": job.current.attempt_id,
                "provider": job.current.provider,
                "model": job.current.model,
                "occurred_at": now.isoformat(),
                "output": {"text": "ok"} if kind == "completed" else None,
            }
        )
        job = decide(
            job,
            RecordResult(command_id=f"r{n}", job_id=job_id, at=now, result=result),
            runtime.context(),
        ).job
        assert job is not None
    assert job.terminal
    return job


async def fill_changelog(stack: Stack, template: Job, tenant: str) -> list[str]:
    row = encode_row(template)
    request = encode_request(template.request)
    headers = row_headers(None, datetime.now(UTC) + timedelta(days=30))
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=20, acks="all")
    await producer.start()
    job_ids = []
    try:
        topic = stack.topic("{app_id}-jobs-changelog")
        for i in range(HELD):
            job_id = job_id_for(tenant, f"held-{i}")
            job_ids.append(job_id)
            partition = partition_for(job_id, PARTITIONS)
            await producer.send(topic, request, key=key(REQUEST, job_id), partition=partition)
            await producer.send(
                topic,
                row.replace(template.job_id.encode(), job_id.encode()),
                key=key(ROW, job_id),
                partition=partition,
                headers=headers,
            )
        await producer.flush()
    finally:
        await producer.stop()
    return job_ids


class Prober(threading.Thread):
    """Ask /healthz of each URL every 100 ms; once a worker has answered, it must keep answering."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.up: set[str] = set()
        self.stop_flag = threading.Event()
        self.slowest = 0.0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop_flag.is_set():
            for url in self.urls:
                started = time.monotonic()
                try:
                    with urllib.request.urlopen(url + "/healthz", timeout=5) as answer:
                        assert answer.status == 200
                except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                    if url in self.up:
                        self.failures.append(f"{url}: {exc!r}")
                    continue
                self.up.add(url)
                self.slowest = max(self.slowest, time.monotonic() - started)
            time.sleep(0.1)


def list_page(worker: Worker, key_: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{worker.url}/jobs?limit=200&state=COMPLETED", headers={"Authorization": f"Bearer {key_}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body: dict[str, Any] = orjson.loads(response.read())
        return body


def read_status(worker: Worker, job_id: str, key_: str) -> tuple[int, str | None]:
    request = urllib.request.Request(
        f"{worker.url}/jobs/{job_id}", headers={"Authorization": f"Bearer {key_}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), orjson.loads(response.read()).get("state")
    except urllib.error.HTTPError as exc:
        return int(exc.code), None


async def test_restoring_many_held_jobs_keeps_workers_answering(
    kafka_bootstrap: str, run_id: str, tmp_path: Path
) -> None:
    tenant = f"held-{uuid.uuid4().hex[:8]}"
    api_key = f"held-key-{uuid.uuid4().hex[:8]}"
    stack = await asyncio.to_thread(new_stack, kafka_bootstrap, run_id, "held", tmp_path)
    stack.env.update(CP_API_KEYS=f"{api_key}={tenant}", CP_LOG_FORMAT="json")
    job_ids = await fill_changelog(stack, finished_job(stack, tenant), tenant)
    ports = [free_port(), free_port()]
    prober = Prober([f"http://127.0.0.1:{port}" for port in ports])
    try:
        prober.start()
        workers = [
            await asyncio.to_thread(stack.start_cp, "cp-1", ports[0]),
            await asyncio.to_thread(stack.start_cp, "cp-2", ports[1]),
        ]
        # Both hold half after the second joins: wait until each answers for its own.
        sample = random.Random(7).sample(job_ids, 200)
        deadline = time.monotonic() + 120
        pending = [(w, j) for w in workers for j in sample]
        while pending and time.monotonic() < deadline:
            pending = [
                (w, j)
                for w, j in pending
                if await asyncio.to_thread(read_status, w, j, api_key) != (200, "COMPLETED")
            ]
            if pending:
                await asyncio.sleep(0.5)
        prober.stop_flag.set()
        prober.join(timeout=10)
        assert not pending, f"{len(pending)} reads never answered COMPLETED, e.g. {pending[:3]}"
        # The listing index was rebuilt by the restore (from rows without listing headers, as
        # written before they had them): a page holds the tenant's jobs from both workers.
        for worker in workers:
            page = await asyncio.to_thread(list_page, worker, api_key)
            listed = [item["job_id"] for item in page["items"]]
            assert len(listed) == 200 and set(listed) <= set(job_ids), page
            assert page["next_cursor"]
            assert {partition_for(j, PARTITIONS) for j in listed} == set(range(PARTITIONS))
        assert not prober.failures, prober.failures[:5]
        assert prober.slowest < 2.0, f"a /healthz answer took {prober.slowest:.2f} s"
        logs = "".join(w.log_path.read_text(errors="replace") for w in workers)
        assert "member_id not recognized" not in logs.lower()
        assert "unknown_member_id" not in logs.lower()
        restored = [
            orjson.loads(line) for line in logs.splitlines() if '"event":"core.restored"' in line
        ]
        assert sum(r["jobs"] for r in restored) >= HELD, restored
    finally:
        prober.stop_flag.set()
        await asyncio.to_thread(stack.stop)
