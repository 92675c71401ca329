"""What the benchmark does to a running stack: bursts, an open loop, a cold restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from bench.clients import Tail, Volume, end_offsets, settle, volumes
from tests.support.stack import Stack, to_json
from tests.support.workers import Worker, http_get

#: Instant simulated provider: the control plane is all that is measured.
SIMULATE: dict[str, Any] = {"outcomes": {"sim-cheap": ["ok"]}, "latency_ms": 0}


def job_request(tenant: str, request_id: str, prompt_bytes: int) -> bytes:
    """One intake record whose prompt is exactly `prompt_bytes` ASCII characters."""
    head = f"benchmark prompt {request_id}: "
    content = (head + "lorem ipsum dolor sit amet " * (prompt_bytes // 27 + 1))[:prompt_bytes]
    return to_json(
        {
            "request_id": request_id,
            "tenant_id": tenant,
            "preference": "cost",
            "messages": [{"role": "user", "content": content}],
            "simulate": SIMULATE,
        }
    )


async def _producer(bootstrap: str, linger_ms: int) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=linger_ms,
        max_request_size=2 * 1024 * 1024,
    )
    await producer.start()
    return producer


class Finals:
    """Final responses of one tenant seen on cp.responses, with when each was first seen."""

    def __init__(self, tenant: str) -> None:
        self.marker = f'"tenant_id":"{tenant}"'.encode()
        self.seen: dict[str, float] = {}  # request_id -> monotonic time first seen
        self.values: dict[str, dict[str, Any]] = {}
        self.duplicates = 0

    def add(self, records: list[Any], at: float) -> None:
        for record in records:
            if record.value is None or self.marker not in record.value:
                continue
            value = orjson.loads(record.value)
            request_id = value["request_id"]
            if request_id in self.seen:
                self.duplicates += 1
                continue
            self.seen[request_id] = at
            self.values[request_id] = value

    def states(self) -> dict[str, int]:
        return dict(Counter(v["state"] for v in self.values.values()))


# -- bursts ----------------------------------------------------------------------------------------


@dataclass
class Burst:
    label: str
    jobs: int
    prompt_bytes: int
    produce_s: float
    seconds: float
    seen: int
    states: dict[str, int]
    duplicates: int
    volumes: dict[str, Volume] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.seen / self.seconds if self.seconds > 0 else 0.0


async def burst(
    stack: Stack,
    *,
    label: str,
    jobs: int,
    prompt_bytes: int,
    counted: list[str] | None = None,
    timeout_s: float = 300.0,
    on_start: Callable[[], None] | None = None,
    on_end: Callable[[], None] | None = None,
) -> Burst:
    """Produce `jobs` at once onto cp.intake, wait for every final response on cp.responses.

    With `counted` (real topic names), also count what every one of them got during the burst.
    """
    tenant = f"bench-{label}-{time.time_ns() % 10**9}"
    records = [job_request(tenant, f"{label}-{i}", prompt_bytes) for i in range(jobs)]
    intake, responses = stack.topic("cp.intake"), stack.topic("cp.responses")
    before = await end_offsets(stack.bootstrap, counted) if counted else {}
    finals = Finals(tenant)
    producer = await _producer(stack.bootstrap, linger_ms=5)
    try:
        async with Tail(stack.bootstrap, [responses]) as tail:
            if on_start is not None:
                on_start()
            started = time.monotonic()
            for value in records:
                await producer.send(intake, value=value)
            await producer.flush()
            produced = time.monotonic()
            deadline = started + timeout_s
            while len(finals.seen) < jobs and time.monotonic() < deadline:
                polled = await tail.poll(50)
                finals.add(polled, time.monotonic())
            if on_end is not None:
                on_end()
    finally:
        await producer.stop()
    last = max(finals.seen.values(), default=time.monotonic())
    result = Burst(
        label=label,
        jobs=jobs,
        prompt_bytes=prompt_bytes,
        produce_s=produced - started,
        seconds=last - started,
        seen=len(finals.seen),
        states=finals.states(),
        duplicates=finals.duplicates,
    )
    if counted:
        after = await settle(stack.bootstrap, counted)
        result.volumes = await volumes(stack.bootstrap, before, after)
    return result


# -- open loop -------------------------------------------------------------------------------------


@dataclass
class OpenLoop:
    target_rate: float
    jobs: int
    send_s: float
    seen: int
    duplicates: int
    states: dict[str, int]
    latencies: list[float]  # seconds, produce -> final response seen
    sent_at: list[float]  # seconds after the first produce, one per latency
    overheads: list[float]  # seconds, latency minus the provider's own time
    no_completed: int  # final responses without a `completed` result seen for the job

    @property
    def achieved_rate(self) -> float:
        return self.jobs / self.send_s if self.send_s > 0 else 0.0


async def open_loop(
    stack: Stack,
    *,
    rate: float,
    seconds: float,
    prompt_bytes: int = 200,
    drain_s: float = 120.0,
) -> OpenLoop:
    """Produce jobs at a steady `rate` for `seconds`; time each one to its final response."""
    jobs = max(1, round(rate * seconds))
    tenant = f"bench-open-{time.time_ns() % 10**9}"
    intake = stack.topic("cp.intake")
    finals = Finals(tenant)
    sent: dict[str, float] = {}
    provider_ms: dict[str, dict[str, tuple[str, int]]] = {}  # job -> attempt -> (provider, ms)
    producer = await _producer(stack.bootstrap, linger_ms=0)
    topics = [stack.topic("cp.responses"), stack.topic("cp.results")]
    results_topic = topics[1]
    done = asyncio.Event()

    async def read(tail: Tail) -> None:
        while not done.is_set():
            polled = await tail.poll(20)
            at = time.monotonic()
            for record in polled:
                if record.topic == results_topic and b'"completed"' in record.value:
                    value = orjson.loads(record.value)
                    if value["type"] == "completed":
                        attempts = provider_ms.setdefault(value["job_id"], {})
                        attempts[value["attempt_id"]] = (
                            value["provider"],
                            int(value.get("latency_ms") or 0),
                        )
            finals.add([r for r in polled if r.topic != results_topic], at)
            if len(finals.seen) >= jobs:
                done.set()

    try:
        async with Tail(stack.bootstrap, topics) as tail:
            reader = asyncio.ensure_future(read(tail))
            started = time.monotonic()
            for i in range(jobs):
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                request_id = f"open-{i}"
                value = job_request(tenant, request_id, prompt_bytes)
                sent[request_id] = time.monotonic()
                await producer.send(intake, value=value)
            send_s = time.monotonic() - started
            await producer.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), drain_s)
            done.set()
            await reader
    finally:
        await producer.stop()
    latencies: list[float] = []
    sent_at: list[float] = []
    overheads: list[float] = []
    no_completed = 0
    for request_id, seen_at in sorted(finals.seen.items(), key=lambda item: sent[item[0]]):
        latency = seen_at - sent[request_id]
        latencies.append(latency)
        sent_at.append(sent[request_id] - started)
        final = finals.values[request_id]
        attempts = provider_ms.get(final["job_id"], {})
        winners = [ms for provider, ms in attempts.values() if provider == final["provider"]]
        if not winners:
            no_completed += 1
            continue
        overheads.append(latency - winners[-1] / 1000)
    return OpenLoop(
        target_rate=rate,
        jobs=jobs,
        send_s=send_s,
        seen=len(finals.seen),
        duplicates=finals.duplicates,
        states=finals.states(),
        latencies=latencies,
        sent_at=sent_at,
        overheads=overheads,
        no_completed=no_completed,
    )


# -- cold restart ----------------------------------------------------------------------------------


@dataclass
class Restore:
    ready_s: float | None  # start -> /readyz 200
    first_job_s: float | None  # start -> final response of a job produced right after the start
    records: int  # what the worker logs on core.restored, summed over its lines
    jobs: int
    seconds: float
    lines: int
    log_level: str

    @property
    def s_per_million_jobs(self) -> float | None:
        return self.seconds / self.jobs * 1e6 if self.jobs else None


def restored_lines(log_path: Path, offset: int) -> list[dict[str, Any]]:
    """The worker's JSON log lines with "event":"core.restored" written after `offset`."""
    with log_path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    found = []
    for line in text.splitlines():
        if '"core.restored"' not in line:
            continue
        try:
            value = json.loads(line[line.index("{") :])
        except ValueError:
            continue
        if isinstance(value, dict) and value.get("event") == "core.restored":
            found.append(value)
    return found


def restart(stack: Stack, worker: Worker, *, timeout_s: float = 180.0) -> Restore:
    """Stop the control-plane worker, start it again, time its restore.

    If its log level hides core.restored (logged at INFO), it comes back at INFO.
    """
    worker.stop(timeout=30)
    offset = worker.log_path.stat().st_size if worker.log_path.exists() else 0
    level = worker.env.get("CP_LOG_LEVEL", "INFO").upper()
    if level not in ("DEBUG", "INFO"):
        worker.env["CP_LOG_LEVEL"] = level = "INFO"
    return asyncio.run(_restart(stack, worker, offset, level, timeout_s))


async def _restart(
    stack: Stack, worker: Worker, offset: int, level: str, timeout_s: float
) -> Restore:
    tenant = f"bench-restart-{time.time_ns() % 10**9}"
    finals = Finals(tenant)
    producer = await _producer(stack.bootstrap, linger_ms=0)
    ready_s: float | None = None
    try:
        async with Tail(stack.bootstrap, [stack.topic("cp.responses")]) as tail:

            async def ready() -> float | None:
                while time.monotonic() < deadline and worker.alive():
                    status, _ = await asyncio.to_thread(http_get, worker.url + "/readyz", 1.0)
                    if status == 200:
                        return time.monotonic() - started
                    await asyncio.sleep(0.05)
                return None

            started = time.monotonic()
            deadline = started + timeout_s
            worker.start()
            await producer.send_and_wait(
                stack.topic("cp.intake"), value=job_request(tenant, "restart-0", 200)
            )
            readiness = asyncio.ensure_future(ready())
            while not finals.seen and time.monotonic() < deadline and worker.alive():
                finals.add(await tail.poll(50), time.monotonic())
            ready_s = await readiness
    finally:
        await producer.stop()
    first_job_s = next(iter(finals.seen.values())) - started if finals.seen else None
    lines: list[dict[str, Any]] = []
    for _ in range(100):  # the line may land just after readiness
        lines = restored_lines(worker.log_path, offset)
        if lines or ready_s is None:
            break
        await asyncio.sleep(0.1)
    return Restore(
        ready_s=ready_s,
        first_job_s=first_job_s,
        records=sum(int(line.get("records", 0)) for line in lines),
        jobs=sum(int(line.get("jobs", 0)) for line in lines),
        seconds=sum(float(line.get("seconds", 0.0)) for line in lines),
        lines=len(lines),
        log_level=level,
    )
