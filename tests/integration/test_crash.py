"""Crash recovery on the real broker: SIGKILL a worker with jobs in flight, restart it, drain.

Each test has its own stack (its own topic prefix, app id and data dirs), so killing workers does
not disturb the shared session stack. What is checked after the drain:

* every job reaches a terminal state and has exactly one final response (after dedup by job_id);
* each job has exactly one terminal event in cp.events (after dedup by (job_id, seq): the outbox
  may republish an event, but a seq must never name two different events);
* republished responses and duplicate dispatches (same idempotency_key) are counted and reported.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from domain.ids import job_id_for
from tests.support.checks import TERMINAL, Timelines, drain_and_check, report
from tests.support.stack import Stack, TopicReader, new_stack, produce, to_json

pytestmark = pytest.mark.integration

USAGE = {"input_tokens": 100, "output_tokens": 50}

#: Scripts that all end COMPLETED, with retries, fallbacks and duplicate answers mixed in.
SCENARIOS: list[dict[str, list[str]]] = [
    {"sim-cheap": ["ok"]},
    {"sim-cheap": ["ok"]},
    {"sim-cheap": ["rate_limited", "ok"]},
    {"sim-cheap": ["provider_internal"], "sim-fast": ["ok"]},
    {"sim-cheap": ["duplicate"]},
]


@asynccontextmanager
async def own_stack(bootstrap: str, run_id: str, name: str, root: Path) -> AsyncIterator[Stack]:
    """A stack of this test's own; blocking calls run in a thread, off the test's event loop."""
    stack = await asyncio.to_thread(new_stack, bootstrap, run_id, name, root)
    try:
        await asyncio.to_thread(stack.start_cp)
        await asyncio.to_thread(stack.start_providers)
        yield stack
    finally:
        await asyncio.to_thread(stack.stop)


def requests(tenant: str, count: int, seed: int) -> dict[str, bytes]:
    """job_id -> request; each job sleeps 300-800 ms per attempt so that many are in flight."""
    rng = random.Random(seed)
    bodies = {}
    for i in range(count):
        rid = f"c{i}"
        bodies[job_id_for(tenant, rid)] = to_json(
            {
                "request_id": rid,
                "tenant_id": tenant,
                "messages": [{"role": "user", "content": f"crash question {i}"}],
                "preference": "cost",
                "simulate": {
                    "outcomes": SCENARIOS[i % len(SCENARIOS)],
                    "latency_ms": rng.randint(300, 800),
                    "usage": USAGE,
                },
            }
        )
    return bodies


def assert_completed_or_timed_out(summary: dict[str, Any], line: str) -> None:
    """Every script here ends COMPLETED; only attempts lost to the crash may use up a job's
    attempts (each timed out attempt is retried, up to max_attempts_per_job)."""
    assert set(summary["states"]) <= {"COMPLETED", "FAILED"}, line
    assert set(summary["failure_codes"]) <= {"timeout"}, line


# -- the control plane crashes --------------------------------------------------------------------


async def test_control_plane_sigkill_loses_no_job(
    kafka_bootstrap: str,
    run_id: str,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    tenant = f"crash-cp-{uuid.uuid4().hex[:8]}"
    bodies = requests(tenant, 200, seed=1)
    jobs = set(bodies)
    async with own_stack(kafka_bootstrap, run_id, "crash", tmp_path) as stack:
        assert stack.cp is not None
        async with TopicReader(stack.bootstrap, stack.topic("cp.events")) as events:
            timelines = Timelines(events, tenant)
            await produce(stack.bootstrap, stack.topic("cp.intake"), bodies.values())
            # Kill with 100+ jobs in flight and a few already finished (their final responses
            # and events may still be in the outbox, not yet marked published).
            await timelines.wait(
                lambda: (
                    timelines.in_flight("dispatched") >= 100
                    and len(timelines.jobs_with(TERMINAL)) >= 10
                ),
                timeout=60,
                what="100 jobs dispatched and not finished, 10 finished",
            )
            in_flight = timelines.in_flight("dispatched")
            finished_before = len(timelines.jobs_with(TERMINAL))

            killed_at = time.monotonic()
            await asyncio.to_thread(stack.cp.kill)
            # The same worker name reuses the same data dir (its RocksDB) and app id.
            await asyncio.to_thread(stack.start_cp)
            restarted_s = time.monotonic() - killed_at

            summary = await drain_and_check(stack, tenant, jobs, timelines, timeout=150)
        drain_s = summary.pop("drained_at") - killed_at
        line = report(
            record_property,
            "cp_crash",
            {
                **summary,
                "in_flight_at_kill": in_flight,
                "finished_before_kill": finished_before,
                "restart_s": round(restarted_s, 1),
                "drain_s": round(drain_s, 1),
            },
        )
        assert in_flight >= 100, line
        assert_completed_or_timed_out(summary, line)


# -- the provider worker crashes ------------------------------------------------------------------


async def test_provider_worker_sigkill_every_job_still_finishes(
    kafka_bootstrap: str,
    run_id: str,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    tenant = f"crash-prov-{uuid.uuid4().hex[:8]}"
    bodies = requests(tenant, 120, seed=2)
    jobs = set(bodies)
    async with own_stack(kafka_bootstrap, run_id, "crash-prov", tmp_path) as stack:
        assert stack.providers is not None
        async with TopicReader(stack.bootstrap, stack.topic("cp.events")) as events:
            timelines = Timelines(events, tenant)
            await produce(stack.bootstrap, stack.topic("cp.intake"), bodies.values())
            await timelines.wait(
                lambda: timelines.in_flight("started") >= 50,
                timeout=60,
                what="50 jobs started on a provider and not finished",
            )
            in_flight = timelines.in_flight("started")

            killed_at = time.monotonic()
            await asyncio.to_thread(stack.providers.kill)
            await asyncio.to_thread(stack.start_providers)
            restarted_s = time.monotonic() - killed_at

            summary = await drain_and_check(stack, tenant, jobs, timelines, timeout=150)
        drain_s = summary.pop("drained_at") - killed_at
        line = report(
            record_property,
            "provider_crash",
            {
                **summary,
                "in_flight_at_kill": in_flight,
                "restart_s": round(restarted_s, 1),
                "drain_s": round(drain_s, 1),
            },
        )
        assert in_flight >= 50, line
        assert_completed_or_timed_out(summary, line)
