"""Measure the control plane end to end on the local broker: throughput, latency, overhead, memory.

Starts its own stack (control-plane worker + provider worker, isolated topic prefix), produces N
jobs at once onto cp.intake (simulated providers answering in ~10 ms), and waits for every final
response. Prints a report and appends it to bench/results.md.

    .venv/bin/python -m bench.throughput --jobs 2000
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from tests.support.broker import kafka_broker
from tests.support.stack import Stack, TopicReader, new_stack, produce, to_json

RESULTS = Path(__file__).with_name("results.md")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(tenant: str, i: int, mix: bool) -> dict[str, Any]:
    outcomes = {"sim-cheap": ["ok"]}
    if mix and i % 10 == 0:
        outcomes = {"sim-cheap": ["rate_limited", "ok"]}
    elif mix and i % 10 == 1:
        outcomes = {"sim-cheap": ["provider_internal"], "sim-fast": ["ok"]}
    return {
        "request_id": f"b{i}",
        "tenant_id": tenant,
        "preference": "cost",
        "messages": [{"role": "user", "content": f"benchmark prompt number {i}"}],
        "simulate": {"outcomes": outcomes, "latency_ms": 10},
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(stack: Stack, jobs: int, mix: bool) -> dict[str, Any]:
    tenant = f"bench-{uuid.uuid4().hex[:8]}"
    records = [to_json(request(tenant, i, mix)) for i in range(jobs)]
    async with TopicReader(stack.bootstrap, stack.topic("cp.responses")) as reader:
        started = time.monotonic()
        await produce(stack.bootstrap, stack.topic("cp.intake"), records)
        produced = time.monotonic()

        mine: set[bytes] = set()
        marker = f'"tenant_id":"{tenant}"'.encode()

        def done(records: list[Any]) -> bool:
            mine.update(r.key for r in records if marker in r.value)
            return len(mine) >= jobs

        await reader.until(done, timeout=600, what=f"{jobs} final responses")
        elapsed = time.monotonic() - started
        finals = {v["job_id"]: v for v in reader.values() if v["tenant_id"] == tenant}
    latencies = [
        (
            datetime.fromisoformat(f["finished_at"]) - datetime.fromisoformat(f["created_at"])
        ).total_seconds()
        for f in finals.values()
    ]
    states: dict[str, int] = {}
    for final in finals.values():
        states[final["state"]] = states.get(final["state"], 0) + 1
    cost = sum(
        (Decimal(f["cost"]["total"]["amount"]) for f in finals.values() if f["cost"]["total"]),
        Decimal(0),
    )
    assert stack.cp is not None and stack.cp.process is not None
    assert stack.providers is not None and stack.providers.process is not None
    return {
        "jobs": jobs,
        "mix": mix,
        "produce_s": produced - started,
        "drain_s": elapsed,
        "jobs_per_s": jobs / elapsed,
        "p50_s": statistics.median(latencies),
        "p95_s": pct(latencies, 0.95),
        "p99_s": pct(latencies, 0.99),
        "states": states,
        "cost_usd": str(cost),
        "cp_rss_mib": rss_mib(stack.cp.process.pid),
        "providers_rss_mib": rss_mib(stack.providers.process.pid),
    }


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC · "
        f"{platform.python_version()} · 1 control-plane worker, 1 provider worker, 8 partitions",
        "",
        "| jobs | mix | jobs/s | drain s | p50 s | p95 s | p99 s | states "
        "| cp RSS MiB | providers RSS MiB |",
        "|---:|:--:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        states = ", ".join(f"{k} {v}" for k, v in sorted(r["states"].items()))
        lines.append(
            f"| {r['jobs']} | {'yes' if r['mix'] else 'no'} | {r['jobs_per_s']:.1f} | "
            f"{r['drain_s']:.1f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['p99_s']:.2f} | "
            f"{states} | {r['cp_rss_mib']:.0f} | {r['providers_rss_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--no-record", action="store_true", help="do not append to results.md")
    args = parser.parse_args()
    rows = []
    with kafka_broker() as bootstrap, tempfile.TemporaryDirectory() as tmp:
        stack = new_stack(bootstrap, "b" + uuid.uuid4().hex[:8], "bench", Path(tmp))
        stack.env["CP_LOG_LEVEL"] = "WARNING"
        try:
            stack.start_cp()
            stack.start_providers()
            for mix in (False, True):
                rows.append(asyncio.run(measure(stack, args.jobs, mix)))
        finally:
            stack.stop()
    text = report(rows)
    print(text)
    if not args.no_record:
        with RESULTS.open("a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
