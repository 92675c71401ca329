"""Measure `GET /jobs/{id}` under load with wrk; print and record one section.

It starts its own stack (two control-plane workers splitting the partitions, and the provider
worker), finishes `--jobs` jobs, measures the 200 B burst rate of this stack, then runs wrk
(`--connections` connections, one thread) for `--seconds` against:

- the owning worker, idle;
- the owning worker while jobs are ingested at half the measured burst rate (open loop);
- the non-owning worker, asked for the same jobs while ingesting (each read forwarded to the owner).

Each row reports wrk's requests/s and latency percentiles, the CPU-seconds the answering
control-plane worker used per 1,000 reads, and, while ingesting, the rate achieved.

    .venv/bin/python -m bench.reads --no-record
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

from bench.clients import Tail
from bench.listing import KEY, TENANT, fill, wait_ready
from bench.scale import add_env_argument
from bench.scenarios import Finals, burst, job_request
from bench.throughput import RESULTS, git_commit
from domain.ids import job_id_for
from streams.core import partition_for
from tests.support.broker import kafka_broker
from tests.support.stack import Stack, new_stack
from tests.support.workers import Worker, free_port, http_get

#: Rotates through the job ids wrk is given, one per request, with the tenant's key.
WRK_SCRIPT = """
local ids = {%s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/jobs/" .. ids[(n %% #ids) + 1], {["Authorization"] = "Bearer %s"})
end
done = function(summary, latency, requests)
  local p = {50, 90, 99, 99.9}
  for _, q in ipairs(p) do
    io.write(string.format("pct %%s %%d\\n", q, latency:percentile(q)))
  end
  io.write(string.format("codes non2xx %%d\\n", summary.errors.status))
  io.write(string.format("codes errors %%d\\n", summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout))
end
"""


@dataclass
class Reads:
    label: str
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    non2xx: int
    errors: int
    cpu_ms_per_1000: float
    ingest: str = ""

    def row(self) -> str:
        return (
            f"| {self.label} | {self.rps:,.0f} | {self.p50_ms:.2f} | {self.p90_ms:.2f} | "
            f"{self.p99_ms:.2f} | {self.p999_ms:.2f} | {self.non2xx + self.errors} | "
            f"{self.cpu_ms_per_1000:.0f} | {self.ingest} |"
        )


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def partitions_of(worker: Worker) -> set[int]:
    status, body = http_get(worker.url + "/readyz")
    if status != 200:
        raise SystemExit(f"{worker.url} is not ready: {body!r}")
    return set(orjson.loads(body)["partitions"])


async def wrk(label: str, url: str, *, pid: int, ids: list[str], args: argparse.Namespace) -> Reads:
    seconds, connections = args.seconds, args.connections
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % (", ".join(f'"{i}"' for i in ids), KEY))
    cpu_before = cpu_s(pid)
    process = await asyncio.create_subprocess_exec(
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        "-s",
        script.name,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await process.communicate())[0].decode()
    cpu = cpu_s(pid) - cpu_before
    await asyncio.to_thread(Path(script.name).unlink)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    pct = {q: int(us) / 1000 for q, us in re.findall(r"^pct ([\d.]+) (\d+)$", out, re.M)}
    codes = dict(re.findall(r"^codes (\w+) (\d+)$", out, re.M))
    if rps is None or total is None or len(pct) < 4:
        raise SystemExit(f"wrk said:\n{out}")
    return Reads(
        label=label,
        rps=float(rps[1]),
        p50_ms=pct["50"],
        p90_ms=pct["90"],
        p99_ms=pct["99"],
        p999_ms=pct["99.9"],
        non2xx=int(codes.get("non2xx", 0)),
        errors=int(codes.get("errors", 0)),
        cpu_ms_per_1000=cpu * 1000 / max(1, int(total[1])) * 1000,
    )


@dataclass
class Ingest:
    rate: float
    sent: int
    send_s: float
    finished: int
    duplicates: int
    drain_s: float

    def text(self) -> str:
        return (
            f"{self.sent / self.send_s:.0f} jobs/s sent, {self.finished}/{self.sent} finished, "
            f"{self.duplicates} duplicates, last {self.drain_s:.1f} s after the last send"
        )


async def ingest(stack: Stack, rate: float, seconds: float, ready: asyncio.Event) -> Ingest:
    """Produce 200 B jobs at `rate` for `seconds` (a lean producer: the load generator shares the
    machine); count their final responses once sending is over."""
    tenant = f"bench-reads-{time.time_ns() % 10**9}"
    finals = Finals(tenant)
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all", linger_ms=2)
    await producer.start()
    try:
        async with Tail(stack.bootstrap, [stack.topic("cp.responses")]) as tail:
            jobs = round(rate * seconds)
            started = time.monotonic()
            for i in range(jobs):
                if i == round(rate * 2):
                    ready.set()  # two seconds in: the steady state wrk measures
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await producer.send(
                    stack.topic("cp.intake"), value=job_request(tenant, f"r-{i}", 200)
                )
            await producer.flush()
            send_s = time.monotonic() - started
            ended = time.monotonic()
            deadline = ended + 120
            while len(finals.seen) < jobs and time.monotonic() < deadline:
                finals.add(await tail.poll(100), time.monotonic())
    finally:
        await producer.stop()
    last = max(finals.seen.values(), default=ended)
    return Ingest(rate, jobs, send_s, len(finals.seen), finals.duplicates, last - ended)


async def under_ingest(
    stack: Stack,
    rate: float,
    label: str,
    url: str,
    *,
    pid: int,
    ids: list[str],
    args: argparse.Namespace,
) -> Reads:
    """wrk while jobs are ingested at `rate`; the ingest starts first and outlasts wrk."""
    ready = asyncio.Event()
    loading = asyncio.create_task(ingest(stack, rate, args.seconds + 4, ready))
    await ready.wait()
    reads = await wrk(label, url, pid=pid, ids=ids, args=args)
    reads.ingest = (await loading).text()
    return reads


async def measure(
    stack: Stack, owner: Worker, other: Worker, ids: list[str], args: argparse.Namespace
) -> tuple[float, list[Reads]]:
    assert owner.process is not None and other.process is not None
    if args.rate:
        rate = args.rate
    else:
        rate = (await burst(stack, label="rate", jobs=args.burst_jobs, prompt_bytes=200)).rate / 2
        print(f"  200 B burst: half rate {rate:.0f} jobs/s", flush=True)
    mine, theirs = owner.process.pid, other.process.pid
    rows = [await wrk("owner, idle", owner.url, pid=mine, ids=ids, args=args)]
    print(f"  {rows[-1].row()}", flush=True)
    rows.append(
        await under_ingest(stack, rate, "owner, ingesting", owner.url, pid=mine, ids=ids, args=args)
    )
    print(f"  {rows[-1].row()}", flush=True)
    rows.append(
        await under_ingest(
            stack,
            rate,
            "non-owner (forwards), ingesting",
            other.url,
            pid=theirs,
            ids=ids,
            args=args,
        )
    )
    print(f"  {rows[-1].row()}", flush=True)
    return rate, rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000, help="finished jobs read (2000)")
    parser.add_argument("--burst-jobs", type=int, default=2000, help="jobs of the rate burst")
    parser.add_argument("--seconds", type=float, default=15.0, help="each wrk run (15)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="ingest jobs/s (default: half the burst rate)"
    )
    add_env_argument(parser)
    parser.add_argument("--no-record", action="store_true", help="do not append to results.md")
    args = parser.parse_args()
    extra_env = dict(args.env)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed (make system-deps installs it on Debian)")

    began = time.monotonic()
    with kafka_broker() as bootstrap, tempfile.TemporaryDirectory() as tmp:
        stack = new_stack(bootstrap, "r" + uuid.uuid4().hex[:8], "bench", Path(tmp))
        stack.env["CP_LOG_LEVEL"] = "WARNING"
        stack.env["CP_API_KEYS"] = f"{KEY}={TENANT}"
        stack.env.update(extra_env)
        try:
            stack.start_providers()
            owner = stack.start_cp("cp-1", free_port())
            other = stack.start_cp("cp-2", free_port())
            wait_ready([owner.url, other.url])
            asyncio.run(
                fill(
                    bootstrap,
                    stack.topic("cp.intake"),
                    stack.topic("cp.responses"),
                    args.jobs,
                    600.0,
                )
            )
            mine = partitions_of(owner)
            partitions = len(mine | partitions_of(other))
            ids = [
                job_id
                for n in range(args.jobs)
                if partition_for(job_id := job_id_for(TENANT, f"list-{n}"), partitions) in mine
            ]
            print(f"  {len(ids)} finished jobs on cp-1 (partitions {sorted(mine)})", flush=True)
            rate, rows = asyncio.run(measure(stack, owner, other, ids, args))
        finally:
            stack.stop()
            asyncio.run(stack.delete_topics())
    lines = [
        f"## Reads, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (`python -m bench.reads`)",
        "",
        f"Commit `{git_commit()}`; `GET /jobs/{{id}}` over {len(ids)} finished jobs of cp-1 "
        f"(two control-plane workers), wrk 1 thread {args.connections} connections "
        f"{args.seconds:g} s per row, on the same 2 cores as the broker and the workers. "
        + (
            f"Ingest = a lean producer at {rate:.0f} jobs/s (`--rate`). "
            if args.rate
            else "Ingest = a lean producer at half the 200 B burst rate measured first "
            f"({rate:.0f} jobs/s). "
        )
        + f"Worker settings: {' '.join(f'{k}={v}' for k, v in extra_env.items()) or 'defaults'}. "
        f"Run took {time.monotonic() - began:.0f} s.",
        "",
        "| read | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | answering worker CPU ms "
        "per 1,000 reads | ingest meanwhile |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *(r.row() for r in rows),
        "",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_record:
        with RESULTS.open("a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
