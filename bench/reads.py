"""Measure `GET /jobs/{id}` under load; print and record one section.

It starts its own stack (two control-plane workers splitting the partitions, each with a read
port and `--readers` reader processes, and the provider worker), finishes `--jobs` jobs,
measures the 200 B burst rate of this stack, then reads cp-1's jobs for `--seconds` per row:

- with wrk (closed loop, `--connections` connections, one thread): the most a server answers;
  its latency there is connections / throughput (32 connections at 5,000 req/s: 6.4 ms);
- with bench/OpenLoop.java at `--offered` req/s on a fixed schedule: the latency at that rate,
  each request timed from when it was due;

against the owning worker's own port, idle and while jobs are ingested at half the measured burst
rate (a lean producer, open loop); the non-owning worker (each read forwarded to the owner); and
the owner's read port (`CP_READ_PORT`, `api.reader`), and the non-owner's, which passes each
read to the owner's read port.

Each row reports requests/s and latency percentiles, the CPU-seconds the answering
control-plane worker (with its reader processes) used per 1,000 reads, and, while ingesting, the
rate achieved.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

from bench.clients import Tail
from bench.listing import KEY, TENANT, fill, wait_ready
from bench.scale import add_env_argument
from bench.scale import cpu_s as process_cpu_s
from bench.scenarios import Finals, burst, job_request
from bench.throughput import RESULTS, git_commit
from domain.ids import job_id_for
from streams.placement import partition_for
from tests.support.broker import kafka_broker
from tests.support.stack import Stack, new_stack
from tests.support.workers import Worker, child_pids, free_port, http_get

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
    #: Latency in ms by percentile: 50, 90, 99 and 99.9.
    pct: dict[float, float]
    #: Answers other than 200, and requests without an answer.
    failed: int
    cpu_ms_per_1000: float
    ingest: str = ""
    #: Open loop: the latency percentiles timed from each request's send instead of when due.
    from_send: str = ""

    def row(self) -> str:
        notes = [self.from_send, self.ingest]
        latency = " | ".join(f"{self.pct[q]:.2f}" for q in (50, 90, 99, 99.9))
        return (
            f"| {self.label} | {self.rps:,.0f} | {latency} | {self.failed} | "
            f"{self.cpu_ms_per_1000:.0f} | {'; '.join(filter(None, notes))} |"
        )


def cpu_s(pid: int) -> float:
    """utime + stime of a process and of its children (a worker's readers), in seconds."""
    return sum(map(process_cpu_s, [pid, *child_pids(pid)]))


def partitions_of(worker: Worker) -> set[int]:
    status, body = http_get(worker.url + "/readyz")
    if status != 200:
        raise SystemExit(f"{worker.url} is not ready: {body!r}")
    return set(orjson.loads(body)["partitions"])


OPEN_LOOP = Path(__file__).with_name("OpenLoop.java")


async def run_tool(argv: list[str], *, pid: int, file_text: str, suffix: str) -> tuple[str, float]:
    """Run a load generator given a temporary file (its {file} argument); return what it printed
    and the CPU-seconds `pid` (and its children) used meanwhile."""
    with tempfile.NamedTemporaryFile("w", suffix=suffix, delete=False) as file:
        file.write(file_text)
    cpu_before = cpu_s(pid)
    process = await asyncio.create_subprocess_exec(
        *(arg.replace("{file}", file.name) for arg in argv),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await process.communicate())[0].decode()
    cpu = cpu_s(pid) - cpu_before
    await asyncio.to_thread(Path(file.name).unlink)
    return out, cpu


def percentiles(out: str, name: str) -> dict[float, float]:
    """`<name> <q> <microseconds>` lines, in ms by q."""
    lines = re.findall(rf"^{name} ([\d.]+) (\d+)$", out, re.M)
    return {float(q): int(us) / 1000 for q, us in lines}


async def offered(
    label: str, url: str, *, pid: int, ids: list[str], args: argparse.Namespace
) -> Reads:
    """`--offered` req/s on a fixed schedule (bench/OpenLoop.java): latency at that rate,
    measured from when each request was due."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    argv = [
        "java",
        # C1 only and the serial collector: the generator shares the 2 cores it measures
        "-XX:TieredStopAtLevel=1",
        "-XX:+UseSerialGC",
        str(OPEN_LOOP),
        host,
        port,
        f"{args.offered:g}",
        f"{args.seconds:g}",
        str(args.connections),
        f"Authorization: Bearer {KEY}",
        "{file}",
    ]
    paths = "".join(f"/jobs/{i}\n" for i in ids)
    out, cpu = await run_tool(argv, pid=pid, file_text=paths, suffix=".txt")
    sent = re.search(r"^sent (\d+)$", out, re.M)
    rate = re.search(r"^rate ([\d.]+)$", out, re.M)
    errors = re.search(r"^errors (\d+)$", out, re.M)
    pct, from_send = percentiles(out, "pct"), percentiles(out, "sent_pct")
    if sent is None or rate is None or errors is None or len(pct) < 4 or len(from_send) < 4:
        raise SystemExit(f"OpenLoop.java said:\n{out}")
    return Reads(
        label=label,
        rps=float(rate[1]),
        pct=pct,
        failed=int(errors[1]),
        # the warm-up second is answered by the worker too
        cpu_ms_per_1000=cpu * 1000 / max(1, int(sent[1]) + round(args.offered)) * 1000,
        from_send=f"from send: p50 {from_send[50]:.2f}, p99 {from_send[99]:.2f} ms",
    )


async def wrk(label: str, url: str, *, pid: int, ids: list[str], args: argparse.Namespace) -> Reads:
    argv = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds:g}s", "--latency"]
    script = WRK_SCRIPT % (", ".join(f'"{i}"' for i in ids), KEY)
    out, cpu = await run_tool(
        [*argv, "-s", "{file}", url], pid=pid, file_text=script, suffix=".lua"
    )
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    pct = percentiles(out, "pct")
    codes = dict(re.findall(r"^codes (\w+) (\d+)$", out, re.M))
    if rps is None or total is None or len(pct) < 4:
        raise SystemExit(f"wrk said:\n{out}")
    return Reads(
        label=label,
        rps=float(rps[1]),
        pct=pct,
        failed=int(codes.get("non2xx", 0)) + int(codes.get("errors", 0)),
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
    tool: Callable[..., Awaitable[Reads]] = wrk,
) -> Reads:
    """`tool` while jobs are ingested at `rate`; the ingest starts first and outlasts it."""
    ready = asyncio.Event()
    loading = asyncio.create_task(ingest(stack, rate, args.seconds + 6, ready))
    await ready.wait()
    reads = await tool(label, url, pid=pid, ids=ids, args=args)
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
    at = f"{args.offered:,.0f}/s offered"
    reader = f"http://127.0.0.1:{args.read_port}"
    their_reader = f"http://127.0.0.1:{args.other_read_port}"
    # (label, url, pid whose CPU is counted, ingesting, tool)
    plan: list[tuple[str, str, int, bool, Callable[..., Awaitable[Reads]]]] = []
    if args.rows == "all":
        plan += [
            ("owner, idle", owner.url, mine, False, wrk),
            ("owner, ingesting", owner.url, mine, True, wrk),
            ("non-owner (forwards), ingesting", other.url, theirs, True, wrk),
        ]
        if args.offered:
            plan += [
                (f"owner, idle, {at}", owner.url, mine, False, offered),
                (f"owner, ingesting, {at}", owner.url, mine, True, offered),
            ]
    if args.readers:
        plan += [
            ("owner's reader, idle", reader, mine, False, wrk),
            ("owner's reader, ingesting", reader, mine, True, wrk),
            ("non-owner's reader (passes to the owner's), idle", their_reader, theirs, False, wrk),
            (
                "non-owner's reader (passes to the owner's), ingesting",
                their_reader,
                theirs,
                True,
                wrk,
            ),
        ]
        if args.offered:
            plan += [
                (f"owner's reader, idle, {at}", reader, mine, False, offered),
                (f"owner's reader, ingesting, {at}", reader, mine, True, offered),
            ]
    rows: list[Reads] = []
    for label, url, pid, ingesting, tool in plan:
        if ingesting:
            row = await under_ingest(
                stack, rate, label, url, pid=pid, ids=ids, args=args, tool=tool
            )
        else:
            row = await tool(label, url, pid=pid, ids=ids, args=args)
        rows.append(row)
        print(f"  {row.row()}", flush=True)
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
    parser.add_argument(
        "--offered",
        type=float,
        default=5000.0,
        help="req/s of the open-loop rows (5000; 0 leaves them out)",
    )
    parser.add_argument(
        "--rows",
        choices=("all", "readers"),
        default="all",
        help="all rows (default), or only the read port's (owner's reader) rows",
    )
    parser.add_argument(
        "--readers",
        type=int,
        default=2,
        help="reader processes of cp-1 (CP_READERS) for the read-port rows (2; 0 leaves them out)",
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
            args.read_port = free_port() if args.readers else 0
            args.other_read_port = free_port() if args.readers else 0
            readers = str(args.readers or 1)
            owner = stack.start_cp(
                "cp-1",
                free_port(),
                env={"CP_READ_PORT": str(args.read_port), "CP_READERS": readers},
            )
            other = stack.start_cp(
                "cp-2",
                free_port(),
                env={"CP_READ_PORT": str(args.other_read_port), "CP_READERS": readers},
            )
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
        f"(two control-plane workers, each with a read port and {args.readers} reader "
        f"process(es); the non-owner's CPU is cp-2's and its readers'), "
        f"{args.connections} connections and {args.seconds:g} s per row: wrk, 1 "
        "thread (closed loop), or, in the offered rows, bench/OpenLoop.java (open loop, "
        "latency timed from when each request was due), on the same 2 cores as the broker and "
        "the workers. "
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
        "per 1,000 reads | open loop timed from send; ingest meanwhile |",
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
