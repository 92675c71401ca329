"""The fence: a worker paused past its session timeout beside a live one writes nothing that counts.

Two control-plane workers share the partitions; jobs flow with retries, fallbacks and cancels mixed
in; one worker is SIGSTOPped for longer than the session timeout right after a burst, then
SIGCONTed, three rounds (worker 2, worker 1, worker 2). After the drain, what Kafka's committed
view and both workers' HTTP answers show is counted:

* every job has one final response, one terminal event, and the two agree;
* no (job_id, seq) names two different events, no attempt id was dispatched to two targets;
* nothing was published twice at all (each step's effects commit once, with its state);
* every job's result reads back the same from both workers as it is on cp.responses.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from domain.ids import job_id_for
from tests.support.checks import (
    TERMINAL,
    Timelines,
    attempt_targets,
    drain_and_check,
    read_to_end,
    report,
)
from tests.support.stack import TopicReader, new_stack, produce, to_json
from tests.support.workers import Worker, http_get

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SESSION_TIMEOUT_S = 6.0
PAUSE_S = SESSION_TIMEOUT_S + 6.0
SCRIPTS: list[dict[str, list[str]]] = [
    {"sim-cheap": ["ok"]},
    {"sim-cheap": ["rate_limited", "ok"]},
    {"sim-cheap": ["provider_internal"], "sim-fast": ["ok"]},
    {"sim-cheap": ["duplicate"]},
    {"sim-cheap": ["provider_internal", "provider_internal"], "sim-fast": ["ok"]},
]


def burst(tenant: str, round_no: int, count: int) -> dict[str, bytes]:
    bodies = {}
    for i in range(count):
        rid = f"r{round_no}-{i}"
        bodies[job_id_for(tenant, rid)] = to_json(
            {
                "request_id": rid,
                "tenant_id": tenant,
                "messages": [{"role": "user", "content": f"fence question {round_no}/{i}"}],
                "preference": "cost",
                "simulate": {
                    "outcomes": SCRIPTS[i % len(SCRIPTS)],
                    "latency_ms": 200 + (i * 37) % 900,
                    "usage": {"input_tokens": 40, "output_tokens": 20},
                },
            }
        )
    return bodies


def cancels(tenant: str, round_no: int, count: int, every: int) -> list[bytes]:
    return [
        to_json({"type": "cancel", "tenant_id": tenant, "request_id": f"r{round_no}-{i}"})
        for i in range(0, count, every)
    ]


def read_result(worker: Worker, job_id: str, key: str) -> tuple[int, dict[str, Any]]:
    import urllib.request

    request = urllib.request.Request(
        f"{worker.url}/jobs/{job_id}/result", headers={"Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), orjson.loads(exc.read() or b"{}")


async def test_paused_worker_writes_nothing_that_counts(
    kafka_bootstrap: str,
    run_id: str,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    tenant = f"fence-{uuid.uuid4().hex[:8]}"
    key = f"fence-key-{uuid.uuid4().hex[:8]}"
    stack = await asyncio.to_thread(new_stack, kafka_bootstrap, run_id, "fence", tmp_path)
    stack.env.update(
        CP_API_KEYS=f"{key}={tenant}",
        CP_BROKER_SESSION_TIMEOUT_S=str(SESSION_TIMEOUT_S),
        CP_BROKER_HEARTBEAT_INTERVAL_S="1.0",
    )
    jobs: set[str] = set()
    paused_rounds = []
    try:
        workers = [
            await asyncio.to_thread(stack.start_cp, "cp-1"),
            await asyncio.to_thread(stack.start_cp, "cp-2"),
        ]
        await asyncio.to_thread(stack.start_providers)
        async with TopicReader(stack.bootstrap, stack.topic("cp.events")) as events:
            timelines = Timelines(events, tenant)
            for round_no, victim in enumerate((1, 0, 1)):
                bodies = burst(tenant, round_no, 100)
                jobs |= set(bodies)
                await produce(stack.bootstrap, stack.topic("cp.intake"), bodies.values())
                await produce(
                    stack.bootstrap, stack.topic("cp.intake"), cancels(tenant, round_no, 100, 7)
                )

                def third_dispatched(bodies: dict[str, bytes] = bodies) -> bool:
                    return len(set(bodies) & timelines.jobs_with({"dispatched"})) >= 30

                await timelines.wait(
                    third_dispatched,
                    timeout=60,
                    what="a third of the burst dispatched",
                )
                paused = workers[victim]
                assert paused.process is not None
                in_flight = len(jobs - timelines.jobs_with(TERMINAL))
                os.kill(paused.process.pid, signal.SIGSTOP)
                stopped_at = time.monotonic()
                try:
                    # Keep reading while the other worker takes over the partitions.
                    while time.monotonic() - stopped_at < PAUSE_S:
                        await timelines.reader.poll(timeout_ms=500)
                finally:
                    os.kill(paused.process.pid, signal.SIGCONT)
                paused_rounds.append({"round": round_no, "in_flight": in_flight})
                await asyncio.to_thread(paused.wait_ready, "/readyz", 90.0)

            summary = await drain_and_check(stack, tenant, jobs, timelines, timeout=180)
        summary.pop("drained_at")
        targets = await attempt_targets(stack.bootstrap, stack.topic, tenant)
        two_targets = sorted(a for a, n in targets.items() if n > 1)

        async with TopicReader(stack.bootstrap, stack.topic("cp.responses")) as responses:
            await read_to_end(responses)
            finals = {v["job_id"]: v for v in responses.values() if v.get("tenant_id") == tenant}
        for worker in workers:
            await asyncio.to_thread(worker.wait_ready, "/readyz", 60.0)
        mismatches: list[tuple[str, str, int, Any]] = []
        for job_id in sorted(jobs):
            for worker in workers:
                status, body = await asyncio.to_thread(read_result, worker, job_id, key)
                if status != 200 or body.get("state") != finals[job_id]["state"]:
                    mismatches.append((worker.url, job_id, status, body.get("state")))
        line = report(
            record_property,
            "paused_worker",
            {
                **summary,
                "rounds": paused_rounds,
                "attempts_to_two_targets": len(two_targets),
                "http_mismatches": len(mismatches),
            },
        )
        assert all(r["in_flight"] > 0 for r in paused_rounds), line
        assert not two_targets, f"{line}\n{two_targets[:10]}"
        assert not mismatches, f"{line}\n{mismatches[:10]}"
        assert summary["republished_responses"] == 0, line
        assert summary["diverging_republished_events"] == 0, line
        assert summary["duplicate_dispatches"] == 0, line
        assert set(summary["states"]) <= {"COMPLETED", "CANCELLED", "FAILED"}, line
        assert set(summary["failure_codes"]) <= {"timeout", "cancelled"}, line
        assert http_get(workers[0].url + "/readyz")[0] == 200
    finally:
        await asyncio.to_thread(stack.stop)
