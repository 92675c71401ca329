"""Finished jobs retire: after CP_JOB_RETENTION_S the row and the request leave the store
(tombstones on the changelog), a small record keeps what idempotency needs, reads answer 410
`job-retired`, and a re-sent request still maps to the same job, across a cold restart too.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from domain.ids import job_id_for
from tests.support.checks import read_to_end
from tests.support.stack import Stack, TopicReader, new_stack, produce, to_json
from tests.support.workers import Worker, wait_for

pytestmark = pytest.mark.integration


def call(
    worker: Worker, method: str, path: str, key: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        worker.url + path,
        method=method,
        data=orjson.dumps(body) if body is not None else None,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), orjson.loads(exc.read() or b"{}")


def job_body(rid: str, prompt: str = "retire me") -> dict[str, Any]:
    return {
        "request_id": rid,
        "messages": [{"role": "user", "content": prompt}],
        "simulate": {"outcomes": {"sim-cheap": ["ok"]}},
    }


async def changelog_keys(stack: Stack, job_id: str) -> list[tuple[str, bool]]:
    """(kind, is_tombstone) of the job's changelog records, in order."""
    async with TopicReader(stack.bootstrap, stack.topic("{app_id}-jobs-changelog")) as reader:
        await read_to_end(reader)
        return [
            (r.key.decode().split(":", 1)[0], r.value is None)
            for r in reader.records
            if r.key is not None and r.key.decode().endswith(":" + job_id)
        ]


async def finals(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    async with TopicReader(stack.bootstrap, stack.topic("cp.responses")) as reader:
        await read_to_end(reader)
        return [v for v in reader.values() if v["job_id"] == job_id]


async def test_a_finished_job_retires_and_its_request_still_maps_to_it(
    kafka_bootstrap: str, run_id: str, tmp_path: Path
) -> None:
    tenant = f"ret-{uuid.uuid4().hex[:8]}"
    key = f"ret-key-{uuid.uuid4().hex[:8]}"
    stack = await asyncio.to_thread(new_stack, kafka_bootstrap, run_id, "retire", tmp_path)
    stack.env.update(
        CP_API_KEYS=f"{key}={tenant}", CP_JOB_RETENTION_S="2", CP_IDEMPOTENCY_WINDOW_S="3600"
    )
    try:
        worker = await asyncio.to_thread(stack.start_cp)
        await asyncio.to_thread(stack.start_providers)
        rid = "r-1"
        job_id = job_id_for(tenant, rid)
        status, accepted = await asyncio.to_thread(
            call, worker, "POST", "/jobs", key, job_body(rid)
        )
        assert status == 202 and accepted["job_id"] == job_id, accepted
        status, final = await asyncio.to_thread(
            call, worker, "GET", f"/jobs/{job_id}/result?wait=20", key
        )
        assert status == 200 and final["state"] == "COMPLETED", final

        def retired() -> bool:
            return call(worker, "GET", f"/jobs/{job_id}", key)[0] == 410

        await asyncio.to_thread(wait_for, retired, timeout=30, what="the job to retire")
        status, gone = await asyncio.to_thread(call, worker, "GET", f"/jobs/{job_id}/events", key)
        assert status == 410, gone
        assert gone["type"].endswith("/job-retired")
        assert (gone["job_id"], gone["state"]) == (job_id, "COMPLETED")

        kinds = await changelog_keys(stack, job_id)
        assert ("j", True) in kinds and ("r", True) in kinds, kinds
        assert kinds[-1] == ("i", False) or ("i", False) in kinds, kinds
        assert kinds.index(("r", False)) < kinds.index(("r", True))

        # The same request again, over HTTP and over Kafka: the same job, nothing new runs.
        status, again = await asyncio.to_thread(call, worker, "POST", "/jobs", key, job_body(rid))
        assert status == 202 and again["job_id"] == job_id and again["state"] == "COMPLETED"
        status, conflict = await asyncio.to_thread(
            call, worker, "POST", "/jobs", key, job_body(rid, "another prompt")
        )
        assert status == 409, conflict
        await produce(
            stack.bootstrap,
            stack.topic("cp.intake"),
            [to_json({**job_body(rid), "tenant_id": tenant})],
        )
        async with TopicReader(stack.bootstrap, stack.topic("cp.dlq")) as dlq:
            await produce(
                stack.bootstrap,
                stack.topic("cp.intake"),
                [to_json({**job_body(rid, "changed"), "tenant_id": tenant})],
            )
            await dlq.until(
                lambda _: any(
                    v["reason"] == "conflict" and job_id in v["detail"] for v in dlq.values()
                ),
                timeout=30,
                what="a conflict dead letter for the changed request",
            )
        assert len(await finals(stack, job_id)) == 1

        # A cold restart rebuilds the store from the changelog: still retired, still known.
        await asyncio.to_thread(worker.stop)
        worker = await asyncio.to_thread(stack.start_cp)
        status, gone = await asyncio.to_thread(call, worker, "GET", f"/jobs/{job_id}", key)
        assert status == 410 and gone["state"] == "COMPLETED", gone
        assert len(await finals(stack, job_id)) == 1
    finally:
        await asyncio.to_thread(stack.stop)
