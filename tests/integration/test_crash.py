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
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from domain.ids import job_id_for
from streams.topology import load_topology
from tests.support.stack import Stack, TopicReader, new_stack, produce, to_json

pytestmark = pytest.mark.integration

USAGE = {"input_tokens": 100, "output_tokens": 50}
TERMINAL = {"completed", "failed", "cancelled", "expired"}

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


class Timelines:
    """Events of a tenant's jobs read from cp.events, deduplicated by (job_id, seq)."""

    def __init__(self, reader: TopicReader, tenant: str) -> None:
        self.reader = reader
        self.tenant = tenant
        self.by_job: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
        self.records = 0
        self.republished = 0
        self.diverging: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self._seen = 0

    def refresh(self) -> None:
        for record in self.reader.records[self._seen :]:
            value = orjson.loads(record.value)
            if value.get("tenant_id") != self.tenant:
                continue
            self.records += 1
            known = self.by_job[value["job_id"]].setdefault(value["seq"], value)
            if known is not value:
                self.republished += 1
                if known != value:
                    self.diverging.append((known, value))
        self._seen = len(self.reader.records)

    def jobs_with(self, kinds: set[str]) -> set[str]:
        self.refresh()
        return {
            job_id
            for job_id, events in self.by_job.items()
            if any(e["type"] in kinds for e in events.values())
        }

    def in_flight(self, since: str) -> int:
        """Jobs with a `since` event and no terminal event yet."""
        return len(self.jobs_with({since}) - self.jobs_with(TERMINAL))

    async def wait(self, condition: Callable[[], bool], *, timeout: float, what: str) -> None:
        await self.reader.until(lambda _: condition(), timeout=timeout, what=what)


async def read_to_end(reader: TopicReader, quiet_polls: int = 3) -> None:
    quiet = 0
    while quiet < quiet_polls:
        quiet = quiet + 1 if not await reader.poll(timeout_ms=300) else 0


async def rows_going_back(stack: Stack, jobs: set[str]) -> list[str]:
    """Jobs whose committed changelog has a row older than the row before it (lower last seq).

    A restore replays the changelog in log order (and compaction keeps the last row of a key):
    a row that lands after a newer one would bring back a state the job had already left.
    """
    going_back = []
    last_seq: dict[str, int] = {}
    async with TopicReader(stack.bootstrap, stack.topic("{app_id}-jobs-changelog")) as changelog:
        await read_to_end(changelog, quiet_polls=2)
        for record in changelog.records:  # each job's rows are on one partition, in log order
            if record.value is None or not record.key.startswith(b"j:"):
                continue
            job_id = record.key[2:].decode()
            if job_id not in jobs:
                continue
            events = orjson.loads(record.value)["events"]
            seq = events[-1]["seq"] if events else 0
            if seq < last_seq.get(job_id, 0):
                going_back.append(job_id)
            last_seq[job_id] = max(seq, last_seq.get(job_id, 0))
    return going_back


async def drain_and_check(
    stack: Stack,
    tenant: str,
    jobs: set[str],
    timelines: Timelines,
    *,
    timeout: float,
) -> dict[str, Any]:
    """Wait for every job to finish; check one terminal event and one final response per job."""
    async with TopicReader(stack.bootstrap, stack.topic("cp.responses")) as responses:
        await responses.until(
            lambda _: (
                jobs <= {v["job_id"] for v in responses.values() if v.get("tenant_id") == tenant}
            ),
            timeout=timeout,
            what=f"a final response for each of {len(jobs)} jobs",
        )
        drained_at = time.monotonic()
        await read_to_end(responses)
        finals: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for value in responses.values():
            if value.get("tenant_id") == tenant:
                finals[value["job_id"]].append(value)

    await timelines.wait(
        lambda: jobs <= timelines.jobs_with(TERMINAL),
        timeout=60,
        what="a terminal event for every job",
    )
    await read_to_end(timelines.reader)
    timelines.refresh()

    assert set(finals) == jobs, f"unknown or lost jobs: {set(finals) ^ jobs}"
    disagreeing = {
        job_id: records
        for job_id, records in finals.items()
        if len({(r["state"], r["provider"], r["attempts"]) for r in records}) != 1
    }
    assert not disagreeing, f"republished final responses disagree: {disagreeing}"
    states = Counter(records[0]["state"] for records in finals.values())

    terminal_counts = {
        job_id: [e["type"] for e in timelines.by_job[job_id].values() if e["type"] in TERMINAL]
        for job_id in jobs
    }
    not_one = {job_id: kinds for job_id, kinds in terminal_counts.items() if len(kinds) != 1}
    assert not not_one, f"jobs without exactly one terminal event: {not_one}"
    mismatch = {
        job_id: (terminal_counts[job_id][0], finals[job_id][0]["state"])
        for job_id in jobs
        if terminal_counts[job_id][0].upper() != finals[job_id][0]["state"]
    }
    assert not mismatch, f"terminal event and final response disagree: {mismatch}"
    conflicting = [
        (a["job_id"], a["seq"], a["type"], b["type"])
        for a, b in timelines.diverging
        if (a["type"], a["attempt_id"]) != (b["type"], b["attempt_id"])
    ]
    assert not conflicting, f"one (job_id, seq) names two different events: {conflicting[:10]}"

    going_back = await rows_going_back(stack, jobs)
    assert not going_back, f"changelog rows older than the row before them: {going_back[:10]}"

    dispatches = await dispatch_keys(stack, tenant)
    duplicate_dispatches = sum(n - 1 for n in dispatches.values())
    executions = await provider_starts(stack, jobs)
    timeouts = sum(
        1
        for job_id in jobs
        for e in timelines.by_job[job_id].values()
        if e["type"] == "attempt_failed" and e["data"]["error"]["code"] == "timeout"
    )
    # Timed-out attempts whose provider did answer (a late result): lost to the crash, not hung.
    timed_out = {
        e["attempt_id"]
        for job_id in jobs
        for e in timelines.by_job[job_id].values()
        if e["type"] == "attempt_failed" and e["data"]["error"]["code"] == "timeout"
    }
    answered_late = {
        e["attempt_id"]
        for job_id in jobs
        for e in timelines.by_job[job_id].values()
        if e["type"] == "late_result" and e["data"].get("result") in ("completed", "failed")
    }
    failures = Counter(
        (records[0]["error"] or {}).get("code")
        for records in finals.values()
        if records[0]["state"] != "COMPLETED"
    )
    return {
        "jobs": len(jobs),
        "states": dict(states),
        "failure_codes": dict(failures),
        "attempts": dict(sorted(Counter(r[0]["attempts"] for r in finals.values()).items())),
        "attempt_timeouts": timeouts,
        "timed_out_but_answered": len(timed_out & answered_late),
        "republished_responses": sum(len(r) - 1 for r in finals.values()),
        "republished_events": timelines.republished,
        "diverging_republished_events": len(timelines.diverging),
        "dispatches": sum(dispatches.values()),
        "duplicate_dispatches": duplicate_dispatches,
        "provider_reruns": sum(n - 1 for n in executions.values()),
        "drained_at": drained_at,
    }


async def dispatch_keys(stack: Stack, tenant: str) -> Counter[str]:
    """Dispatch records of a tenant per idempotency_key, over every dispatch topic."""
    keys: Counter[str] = Counter()
    for spec in load_topology(Path("topics.yaml")).dispatch_topics().values():
        async with TopicReader(stack.bootstrap, stack.topic(spec.name)) as reader:
            await read_to_end(reader, quiet_polls=2)
            for value in reader.values():
                if value.get("type") == "dispatch" and value.get("tenant_id") == tenant:
                    keys[value["idempotency_key"]] += 1
    return keys


async def provider_starts(stack: Stack, jobs: set[str]) -> Counter[str]:
    """`started` result records per attempt: more than one means the provider ran it again."""
    starts: Counter[str] = Counter()
    async with TopicReader(stack.bootstrap, stack.topic("cp.results")) as reader:
        await read_to_end(reader, quiet_polls=2)
        for value in reader.values():
            if value.get("job_id") in jobs and value.get("type") == "started":
                starts[value["attempt_id"]] += 1
    return starts


def assert_completed_or_timed_out(summary: dict[str, Any], line: str) -> None:
    """Every script here ends COMPLETED; only attempts lost to the crash may use up a job's
    attempts (each timed out attempt is retried, up to max_attempts_per_job)."""
    assert set(summary["states"]) <= {"COMPLETED", "FAILED"}, line
    assert set(summary["failure_codes"]) <= {"timeout"}, line


def report(
    record_property: Callable[[str, object], None], name: str, summary: dict[str, Any]
) -> str:
    line = f"{name}: " + ", ".join(f"{k}={v}" for k, v in summary.items())
    print(line)
    record_property(name, line)
    for key, value in summary.items():
        record_property(f"{name}.{key}", value)
    return line


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
