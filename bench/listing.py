"""Measure what a page of `GET /jobs` costs with many jobs held; print and record one section.

It starts its own stack (two control-plane workers splitting the partitions, as in production,
and the provider worker), fills it with `--jobs` jobs of one tenant through cp.intake (instant
simulated provider), then times pages of `--limit` over HTTP on one worker, which pages its own
partitions and asks the other worker for its share:

- the first page, asked `--samples` times;
- every page of a full walk through the listing by cursor (the deep pages);
- a state filter that matches nothing (`state=EXPIRED`): it reads only that state's lists.

    .venv/bin/python -m bench.listing --jobs 100000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from aiokafka import AIOKafkaProducer

from bench.clients import Tail
from bench.scenarios import Finals, job_request
from bench.throughput import RESULTS, git_commit, rss_mib
from tests.support.broker import kafka_broker
from tests.support.stack import new_stack
from tests.support.workers import free_port, http_get

TENANT = "bench-list"
KEY = "bench-list-key"


@dataclass
class Timings:
    label: str
    ms: list[float] = field(default_factory=list)

    def row(self) -> str:
        ms = sorted(self.ms)
        p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
        return (
            f"| {self.label} | {len(ms)} | {statistics.median(ms):.1f} | {p99:.1f} | {ms[-1]:.1f} |"
        )


async def fill(bootstrap: str, intake: str, responses: str, jobs: int, timeout_s: float) -> float:
    """Produce `jobs` requests of the tenant and wait for all their final responses."""
    finals = Finals(TENANT)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        async with Tail(bootstrap, [responses]) as tail:
            started = time.monotonic()
            for n in range(jobs):
                await producer.send(intake, value=job_request(TENANT, f"list-{n}", 200))
                if n % 2000 == 1999:  # keep up with the finals meanwhile
                    finals.add(await tail.poll(0), time.monotonic())
            await producer.flush()
            deadline = started + timeout_s
            shown, step = 0, max(1, jobs // 10)
            while len(finals.seen) < jobs and time.monotonic() < deadline:
                finals.add(await tail.poll(100), time.monotonic())
                if len(finals.seen) >= shown + step:
                    shown = len(finals.seen) // step * step
                    print(
                        f"  {shown} finished after {time.monotonic() - started:.0f} s", flush=True
                    )
    finally:
        await producer.stop()
    if len(finals.seen) < jobs:
        raise SystemExit(f"only {len(finals.seen)} of {jobs} jobs finished in {timeout_s:.0f} s")
    return time.monotonic() - started


async def timed(
    http: aiohttp.ClientSession, url: str, params: dict[str, str]
) -> tuple[float, dict[str, object]]:
    started = time.perf_counter()
    async with http.get(url, params=params, headers={"Authorization": f"Bearer {KEY}"}) as r:
        body = await r.json()
        assert r.status == 200, body
    return (time.perf_counter() - started) * 1000, body


async def measure(url: str, jobs: int, limit: int, samples: int) -> list[Timings]:
    first, deep, empty = (
        Timings(f"first page (limit {limit})"),
        Timings(f"every page of a full walk by cursor (limit {limit})"),
        Timings("state=EXPIRED, which no job is in (a state filter reads only its lists)"),
    )
    async with aiohttp.ClientSession() as http:
        for _ in range(5):  # warm-up
            await timed(http, url + "/jobs", {"limit": str(limit)})
        for _ in range(samples):
            ms, _ = await timed(http, url + "/jobs", {"limit": str(limit)})
            first.ms.append(ms)
        cursor: str | None = None
        seen = 0
        while True:
            params = {"limit": str(limit)} | ({"cursor": cursor} if cursor else {})
            ms, body = await timed(http, url + "/jobs", params)
            deep.ms.append(ms)
            items = body["items"]
            assert isinstance(items, list)
            seen += len(items)
            cursor = body["next_cursor"]  # type: ignore[assignment]
            if cursor is None:
                break
        assert seen == jobs, f"the walk listed {seen} of {jobs} jobs"
        for _ in range(max(3, samples // 10)):
            ms, body = await timed(http, url + "/jobs", {"limit": str(limit), "state": "EXPIRED"})
            assert body["items"] == []
            empty.ms.append(ms)
    return [first, deep, empty]


def wait_ready(urls: list[str], timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    streak = 0
    while time.monotonic() < deadline:
        streak = streak + 1 if all(http_get(u + "/readyz")[0] == 200 for u in urls) else 0
        if streak >= 5:
            return
        time.sleep(0.2)
    raise SystemExit("the workers never became ready")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs held (100000)")
    parser.add_argument("--limit", type=int, default=50, help="page size (50)")
    parser.add_argument("--samples", type=int, default=200, help="first-page requests (200)")
    parser.add_argument("--fill-timeout-s", type=float, default=1800.0)
    parser.add_argument("--no-record", action="store_true", help="do not append to results.md")
    args = parser.parse_args()

    began = time.monotonic()
    with kafka_broker() as bootstrap, tempfile.TemporaryDirectory() as tmp:
        stack = new_stack(bootstrap, "l" + uuid.uuid4().hex[:8], "bench", Path(tmp))
        stack.env["CP_LOG_LEVEL"] = "WARNING"
        stack.env["CP_API_KEYS"] = f"{KEY}={TENANT}"
        try:
            stack.start_providers()
            workers = [stack.start_cp("cp-1", free_port()), stack.start_cp("cp-2", free_port())]
            wait_ready([w.url for w in workers])
            print(f"filling with {args.jobs} jobs", flush=True)
            fill_s = asyncio.run(
                fill(
                    bootstrap,
                    stack.topic("cp.intake"),
                    stack.topic("cp.responses"),
                    args.jobs,
                    args.fill_timeout_s,
                )
            )
            print(f"  {args.jobs} jobs finished in {fill_s:.0f} s; measuring pages", flush=True)
            timings = asyncio.run(measure(workers[0].url, args.jobs, args.limit, args.samples))
            rss = [rss_mib(w.process.pid if w.process else None) for w in workers]
        finally:
            stack.stop()
            asyncio.run(stack.delete_topics())
    lines = [
        f"## Listing cost, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (`python -m bench.listing`)",
        "",
        f"Commit `{git_commit()}`; {args.jobs} finished jobs of one tenant held by two "
        f"control-plane workers (filled in {fill_s:.0f} s); pages asked of cp-1 over HTTP, which "
        "pages its partitions and asks cp-2 for its share. "
        f"RSS after: cp-1 {rss[0] or 0:.0f} MiB, cp-2 {rss[1] or 0:.0f} MiB. "
        f"Run took {time.monotonic() - began:.0f} s.",
        "",
        "| request | pages | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
        *(t.row() for t in timings),
        "",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_record:
        with RESULTS.open("a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
