"""A graceful stop of the provider worker costs nothing: SIGTERM it mid-call, restart it.

Calls that finish within the grace period (`CP_PROVIDER_SHUTDOWN_GRACE_S`) publish their results
before the worker exits; calls still running when it ends are abandoned unmarked and uncommitted,
so the restarted worker runs them again at once. Either way no job waits for an attempt timeout.

The stack here has a 20 s attempt timeout (the shipped policy has 30 s) so that a call can outlast
the old worker's fixed 5 s shutdown wait and still be far from timing out.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from domain.ids import job_id_for
from tests.support.checks import TERMINAL, Timelines, drain_and_check, report
from tests.support.stack import Stack, TopicReader, new_stack, produce, to_json

pytestmark = pytest.mark.integration

ATTEMPT_TIMEOUT_MS = 20_000
JOBS = 20
USAGE = {"input_tokens": 100, "output_tokens": 50}


@asynccontextmanager
async def shutdown_stack(
    bootstrap: str, run_id: str, name: str, root: Path, provider_env: Mapping[str, str]
) -> AsyncIterator[Stack]:
    """A stack of this test's own, its provider worker started with `provider_env` added."""

    def build() -> Stack:
        stack = new_stack(bootstrap, run_id, name, root)
        policy_path = Path(stack.env["CP_POLICY_FILE"])
        policy = yaml.safe_load(policy_path.read_text())
        policy["attempt_timeout_ms"] = ATTEMPT_TIMEOUT_MS
        policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
        stack.env.update(provider_env)
        return stack

    stack = await asyncio.to_thread(build)
    try:
        await asyncio.to_thread(stack.start_cp)
        await asyncio.to_thread(stack.start_providers)
        yield stack
    finally:
        await asyncio.to_thread(stack.stop)


def slow_requests(tenant: str, latency_ms: int) -> dict[str, bytes]:
    """job_id -> request; every job is one call of `latency_ms` on sim-cheap that answers."""
    bodies = {}
    for i in range(JOBS):
        rid = f"s{i}"
        bodies[job_id_for(tenant, rid)] = to_json(
            {
                "request_id": rid,
                "tenant_id": tenant,
                "messages": [{"role": "user", "content": f"shutdown question {i}"}],
                "preference": "cost",
                "simulate": {
                    "outcomes": {"sim-cheap": ["ok"]},
                    "latency_ms": latency_ms,
                    "usage": USAGE,
                },
            }
        )
    return bodies


async def stop_mid_call(
    stack: Stack, tenant: str, latency_ms: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start JOBS calls, SIGTERM the provider worker once all started, restart it, drain."""
    assert stack.providers is not None
    bodies = slow_requests(tenant, latency_ms)
    jobs = set(bodies)
    async with TopicReader(stack.bootstrap, stack.topic("cp.events")) as events:
        timelines = Timelines(events, tenant)
        await produce(stack.bootstrap, stack.topic("cp.intake"), bodies.values())
        await timelines.wait(
            lambda: jobs <= timelines.jobs_with({"started"}),
            timeout=60,
            what=f"all {JOBS} jobs started on a provider",
        )
        finished_before = len(timelines.jobs_with(TERMINAL))

        stopped_at = time.monotonic()
        returncode = await asyncio.to_thread(stack.providers.stop)
        stop_s = time.monotonic() - stopped_at
        await asyncio.to_thread(stack.start_providers)
        restart_s = time.monotonic() - stopped_at

        summary = await drain_and_check(stack, tenant, jobs, timelines, timeout=120)
    drain_s = summary.pop("drained_at") - stopped_at
    facts = {
        "returncode": returncode,
        "finished_before_stop": finished_before,
        "stop_s": round(stop_s, 1),
        "restart_s": round(restart_s, 1),
        "drain_s": round(drain_s, 1),
    }
    return summary, facts


async def test_calls_finishing_within_grace_publish_before_exit(
    kafka_bootstrap: str,
    run_id: str,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """6 s calls, SIGTERM ~1 s in, default grace: every call finishes in the old worker."""
    tenant = f"stop-grace-{uuid.uuid4().hex[:8]}"
    async with shutdown_stack(kafka_bootstrap, run_id, "stop-grace", tmp_path, {}) as stack:
        summary, facts = await stop_mid_call(stack, tenant, latency_ms=6000)
    line = report(record_property, "provider_graceful_stop", {**summary, **facts})
    assert facts["returncode"] == 0, line
    assert facts["finished_before_stop"] == 0, line
    assert summary["states"] == {"COMPLETED": JOBS}, line
    assert summary["attempts"] == {1: JOBS}, line
    assert summary["attempt_timeouts"] == 0, line
    # Finished in the old worker, results published, keys marked: nothing ran twice.
    assert summary["provider_reruns"] == 0, line
    assert summary["duplicate_dispatches"] == 0, line


async def test_calls_outlasting_grace_rerun_at_once(
    kafka_bootstrap: str,
    run_id: str,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """8 s calls, 1 s grace: abandoned in the old worker, run again by the new one at once."""
    tenant = f"stop-abandon-{uuid.uuid4().hex[:8]}"
    env = {"CP_PROVIDER_SHUTDOWN_GRACE_S": "1"}
    async with shutdown_stack(kafka_bootstrap, run_id, "stop-abandon", tmp_path, env) as stack:
        summary, facts = await stop_mid_call(stack, tenant, latency_ms=8000)
    line = report(record_property, "provider_abandoning_stop", {**summary, **facts})
    assert facts["returncode"] == 0, line
    assert facts["stop_s"] < 5, line  # the grace period bounds the stop
    assert summary["states"] == {"COMPLETED": JOBS}, line
    assert summary["attempts"] == {1: JOBS}, line
    assert summary["attempt_timeouts"] == 0, line
    # Each abandoned call ran once more, in the restarted worker (its `started` published again).
    assert summary["provider_reruns"] == JOBS, line
    assert summary["duplicate_dispatches"] == 0, line
    # Re-run at once: a restart plus one call, far from the attempt timeout.
    assert facts["drain_s"] < facts["restart_s"] + 8 + 5, line
