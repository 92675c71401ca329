"""What a run on the real broker left behind, read back from Kafka's committed view and counted.

Shared by the crash and fencing tests (which assert on the counts) and by the chaos battery
(which records them in a table row). `drain` only counts; `drain_and_check` asserts as the crash
tests always did and returns their summary.

* every job reaches a terminal state and has exactly one final response (after dedup by job_id);
* each job has exactly one terminal event in cp.events (after dedup by (job_id, seq): the outbox
  may republish an event, but a seq must never name two different events);
* no committed changelog row of a job is older than the row before it;
* republished responses and duplicate dispatches (same idempotency_key) are counted and reported.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from streams.topology import catalogue_topology
from tests.support.stack import Stack, TopicReader
from tests.support.workers import ROOT

TERMINAL = {"completed", "failed", "cancelled", "expired"}


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

    async def holds(self, condition: Callable[[], bool], *, timeout: float) -> bool:
        """Read on until `condition` holds; False (no error) when `timeout` passes first."""
        return await poll_until(self.reader, condition, timeout=timeout)


async def poll_until(reader: TopicReader, condition: Callable[[], bool], *, timeout: float) -> bool:
    """Poll `reader` until `condition` holds; False when `timeout` seconds pass first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            return False
        await reader.poll()
    return True


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


def objects(reader: TopicReader) -> list[dict[str, Any]]:
    """The records read that are JSON objects (poison records a test sent are passed over)."""
    values = []
    for record in reader.records:
        try:
            value = orjson.loads(record.value) if record.value is not None else None
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, dict):
            values.append(value)
    return values


def _dispatch_topics() -> list[str]:
    topology = catalogue_topology(ROOT / "topics.yaml", ROOT / "config" / "catalogue.yaml")
    return [spec.name for spec in topology.dispatch_topics().values()]


async def dispatch_keys(stack: Stack, tenant: str) -> Counter[str]:
    """Dispatch records of a tenant per idempotency_key, over every dispatch topic."""
    keys: Counter[str] = Counter()
    for name in _dispatch_topics():
        async with TopicReader(stack.bootstrap, stack.topic(name)) as reader:
            await read_to_end(reader, quiet_polls=2)
            for value in objects(reader):
                if value.get("type") == "dispatch" and value.get("tenant_id") == tenant:
                    keys[value["idempotency_key"]] += 1
    return keys


async def attempt_targets(bootstrap: str, topic: Callable[[str], str], tenant: str) -> Counter[str]:
    """Number of distinct providers each attempt id was dispatched to."""
    targets: dict[str, set[str]] = defaultdict(set)
    for name in _dispatch_topics():
        async with TopicReader(bootstrap, topic(name)) as reader:
            await read_to_end(reader, quiet_polls=2)
            for value in objects(reader):
                if value.get("type") == "dispatch" and value.get("tenant_id") == tenant:
                    targets[value["attempt_id"]].add(f"{value['provider']}/{value['model']}")
    return Counter({attempt: len(t) for attempt, t in targets.items()})


async def provider_starts(stack: Stack, jobs: set[str]) -> Counter[str]:
    """`started` result records per attempt: more than one means the provider ran it again."""
    starts: Counter[str] = Counter()
    async with TopicReader(stack.bootstrap, stack.topic("cp.results")) as reader:
        await read_to_end(reader, quiet_polls=2)
        for value in objects(reader):
            if value.get("job_id") in jobs and value.get("type") == "started":
                starts[value["attempt_id"]] += 1
    return starts


@dataclass
class Drain:
    """What Kafka holds for a tenant's jobs once they finished (or the wait for them ended)."""

    jobs: set[str]
    #: job_id -> every final response of the tenant on cp.responses (republished ones included).
    finals: dict[str, list[dict[str, Any]]]
    #: time.monotonic() when the last job's final response was read; None if some never came.
    drained_at: float | None
    timelines: Timelines
    going_back: list[str] = field(default_factory=list)
    dispatches: Counter[str] = field(default_factory=Counter)
    executions: Counter[str] = field(default_factory=Counter)

    @property
    def lost(self) -> set[str]:
        """Jobs without a final response."""
        return self.jobs - set(self.finals)

    @property
    def unknown(self) -> set[str]:
        """Final responses of the tenant for jobs nobody sent."""
        return set(self.finals) - self.jobs

    def terminal_events(self, job_id: str) -> list[str]:
        return [e["type"] for e in self.timelines.by_job[job_id].values() if e["type"] in TERMINAL]

    @property
    def disagreeing(self) -> dict[str, list[dict[str, Any]]]:
        """Jobs whose republished final responses do not say the same."""
        return {
            job_id: records
            for job_id, records in self.finals.items()
            if len({(r["state"], r["provider"], r["attempts"]) for r in records}) != 1
        }

    @property
    def not_one_terminal(self) -> dict[str, list[str]]:
        """Finished jobs without exactly one terminal event."""
        counts = {job_id: self.terminal_events(job_id) for job_id in self.jobs & set(self.finals)}
        return {job_id: kinds for job_id, kinds in counts.items() if len(kinds) != 1}

    @property
    def double_finals(self) -> set[str]:
        """Jobs that finished twice: two terminal events, or final responses that disagree."""
        twice = {job_id for job_id, kinds in self.not_one_terminal.items() if len(kinds) > 1}
        return twice | set(self.disagreeing)

    @property
    def terminal_mismatch(self) -> dict[str, tuple[str, str]]:
        """Jobs whose one terminal event and final response name different states."""
        mismatch = {}
        for job_id in self.jobs & set(self.finals):
            kinds = self.terminal_events(job_id)
            state = self.finals[job_id][0]["state"]
            if len(kinds) == 1 and kinds[0].upper() != state:
                mismatch[job_id] = (kinds[0], state)
        return mismatch

    @property
    def conflicting(self) -> list[tuple[str, int, str, str]]:
        """(job_id, seq) pairs that name two different events."""
        return [
            (a["job_id"], a["seq"], a["type"], b["type"])
            for a, b in self.timelines.diverging
            if (a["type"], a["attempt_id"]) != (b["type"], b["attempt_id"])
        ]

    def _events(self, kind: str) -> list[dict[str, Any]]:
        return [
            e
            for job_id in self.jobs
            for e in self.timelines.by_job[job_id].values()
            if e["type"] == kind
        ]

    @property
    def timed_out(self) -> set[str]:
        """Attempts that failed with a timeout."""
        return {
            e["attempt_id"]
            for e in self._events("attempt_failed")
            if e["data"]["error"]["code"] == "timeout"
        }

    @property
    def attempt_timeouts(self) -> int:
        return sum(
            1 for e in self._events("attempt_failed") if e["data"]["error"]["code"] == "timeout"
        )

    @property
    def answered_late(self) -> set[str]:
        """Attempts whose provider answered after the job had stopped waiting for them."""
        return {
            e["attempt_id"]
            for e in self._events("late_result")
            if e["data"].get("result") in ("completed", "failed")
        }

    @property
    def duplicate_dispatches(self) -> int:
        return sum(n - 1 for n in self.dispatches.values())

    @property
    def provider_reruns(self) -> int:
        return sum(n - 1 for n in self.executions.values())

    def summary(self) -> dict[str, Any]:
        """The figures the crash tests report, keyed as they always were."""
        firsts = [records[0] for job_id, records in self.finals.items() if job_id in self.jobs]
        failures = Counter(
            (r["error"] or {}).get("code") for r in firsts if r["state"] != "COMPLETED"
        )
        return {
            "jobs": len(self.jobs),
            "states": dict(Counter(r["state"] for r in firsts)),
            "failure_codes": dict(failures),
            "attempts": dict(sorted(Counter(r["attempts"] for r in firsts).items())),
            "attempt_timeouts": self.attempt_timeouts,
            "timed_out_but_answered": len(self.timed_out & self.answered_late),
            "republished_responses": sum(len(r) - 1 for r in self.finals.values()),
            "republished_events": self.timelines.republished,
            "diverging_republished_events": len(self.timelines.diverging),
            "dispatches": sum(self.dispatches.values()),
            "duplicate_dispatches": self.duplicate_dispatches,
            "provider_reruns": self.provider_reruns,
            "drained_at": self.drained_at,
        }


async def drain(
    stack: Stack,
    tenant: str,
    jobs: set[str],
    timelines: Timelines,
    *,
    timeout: float,
    terminal_timeout: float = 60.0,
) -> Drain:
    """Wait (up to `timeout`) for a final response of every job, then read what Kafka holds.

    Never raises for what it finds: jobs that never finish are `lost` in the answer.
    """

    def tenant_jobs(responses: TopicReader) -> set[str]:
        return {v["job_id"] for v in responses.values() if v.get("tenant_id") == tenant}

    async with TopicReader(stack.bootstrap, stack.topic("cp.responses")) as responses:
        finished = await poll_until(
            responses, lambda: jobs <= tenant_jobs(responses), timeout=timeout
        )
        drained_at = time.monotonic() if finished else None
        await read_to_end(responses)
        finals: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for value in responses.values():
            if value.get("tenant_id") == tenant:
                finals[value["job_id"]].append(value)

    done = jobs & set(finals)
    await timelines.holds(lambda: done <= timelines.jobs_with(TERMINAL), timeout=terminal_timeout)
    await read_to_end(timelines.reader)
    timelines.refresh()
    return Drain(
        jobs=jobs,
        finals=dict(finals),
        drained_at=drained_at,
        timelines=timelines,
        going_back=await rows_going_back(stack, jobs),
        dispatches=await dispatch_keys(stack, tenant),
        executions=await provider_starts(stack, jobs),
    )


async def drain_and_check(
    stack: Stack,
    tenant: str,
    jobs: set[str],
    timelines: Timelines,
    *,
    timeout: float,
) -> dict[str, Any]:
    """Wait for every job to finish; check one terminal event and one final response per job."""
    drained = await drain(stack, tenant, jobs, timelines, timeout=timeout)
    assert drained.drained_at is not None, (
        f"timed out after {timeout:.0f}s waiting for a final response for each of "
        f"{len(jobs)} jobs: {len(drained.lost)} never finished"
    )
    assert set(drained.finals) == jobs, f"unknown or lost jobs: {set(drained.finals) ^ jobs}"
    assert not drained.disagreeing, f"republished final responses disagree: {drained.disagreeing}"
    not_one = drained.not_one_terminal
    assert not not_one, f"jobs without exactly one terminal event: {not_one}"
    mismatch = drained.terminal_mismatch
    assert not mismatch, f"terminal event and final response disagree: {mismatch}"
    conflicting = drained.conflicting
    assert not conflicting, f"one (job_id, seq) names two different events: {conflicting[:10]}"
    going_back = drained.going_back
    assert not going_back, f"changelog rows older than the row before them: {going_back[:10]}"
    return drained.summary()


def report(
    record_property: Callable[[str, object], None], name: str, summary: dict[str, Any]
) -> str:
    line = f"{name}: " + ", ".join(f"{k}={v}" for k, v in summary.items())
    print(line)
    record_property(name, line)
    for key, value in summary.items():
        record_property(f"{name}.{key}", value)
    return line
