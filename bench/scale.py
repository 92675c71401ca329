"""Measure what each control-plane worker adds, and what a join or a leave costs under load.

Scale: for 1, 2 and 4 control-plane workers in one group (8 job partitions) with one provider
worker, and 2 of each (`--rows`), a fresh stack runs a burst of `--jobs` 200 B jobs (instant
simulated provider) and reports jobs/s and the CPU-seconds per job of every process (utime +
stime from /proc): the control-plane workers summed and each, the provider workers, the
broker. On a machine with fewer cores than processes the jobs/s cannot grow; the CPU-s per job
shows whether a worker adds work of its own, and the projection `cores / (CPU-s per job of
everything)` says what k cores would do. The job core's transactions per job (its /metrics) say
how finely the work was committed (a partition commits when a poll brings it nothing new).

Per worker (`--per-worker`): 1, 2 and 4 control-plane workers, each row an open loop at
`--per-worker` jobs/s for every control-plane worker (37.5: the rows take 37.5, 75 and 150
jobs/s) for `--per-worker-s` seconds (30). This is what adding a worker with its share of
traffic costs, which is how a deployment grows: the CPU-s per job must stay flat along these
rows. At one fixed rate (`--steady`) it cannot: every worker pays a fixed share of fetches and
event-loop wake-ups each second, which fewer jobs carry the more workers share the rate.

Rebalance: two control-plane workers take an open loop at `--rate` jobs/s; a third joins after
`--join-at` s and the first leaves (SIGTERM, graceful) after `--leave-at` s. Reported per event:
the longest gap between two final responses in the 15 s after it (against the steady gap before
the join), and how many jobs sent in that window took longer than 1 s, with the slowest.

With `KAFKA_JMX_PORT` set (and the broker started with it), each row also counts the broker's
requests per job by type (`bench.broker_requests`).

    .venv/bin/python -m bench.scale --no-record
    KAFKA_JMX_PORT=9999 make kafka-up && KAFKA_JMX_PORT=9999 .venv/bin/python -m bench.scale
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import broker_requests
from bench.listing import wait_ready
from bench.report import pct_ms
from bench.scenarios import OpenLoop, burst, open_loop
from bench.throughput import RESULTS, broker_pid, git_commit
from tests.support.broker import kafka_broker
from tests.support.stack import Stack, new_stack
from tests.support.workers import Worker, free_port, http_get

#: A job is "delayed" by a rebalance when its final response takes longer than this.
DELAYED_S = 1.0
WINDOW_S = 15.0


def cpu_s(pid: int | None) -> float:
    """utime + stime of a process in seconds (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / 100.0


@dataclass
class Scale:
    workers: int
    provider_workers: int
    jobs: int
    rate: float
    cp_cpu_per_job_ms: float
    per_worker_ms: list[float]
    per_provider_ms: list[float]
    broker_ms: float
    transactions_per_job: float
    duplicates: int
    seen: int
    #: Produce to final response, for `--steady` rows (a burst's latency is its queue).
    latency_ms: tuple[float, float] | None = None
    #: The broker's requests per job by type (with KAFKA_JMX_PORT).
    broker_requests: dict[str, float] | None = None

    @property
    def providers_ms(self) -> float:
        return sum(self.per_provider_ms)

    @property
    def total_ms(self) -> float:
        return self.cp_cpu_per_job_ms + self.providers_ms + self.broker_ms

    def row(self) -> str:
        each = " / ".join(f"{ms:.2f}" for ms in self.per_worker_ms)
        each_provider = " / ".join(f"{ms:.2f}" for ms in self.per_provider_ms)
        projected = 1000.0 / self.total_ms if self.total_ms else 0.0
        return (
            f"| {self.workers} | {self.provider_workers} | {self.seen}/{self.jobs} | "
            f"{self.rate:.0f} | {self.cp_cpu_per_job_ms:.2f} ({each}) | "
            f"{self.providers_ms:.2f} ({each_provider}) | "
            f"{self.broker_ms:.2f} | {self.total_ms:.2f} | {projected:.0f} | "
            f"{self.transactions_per_job:.2f} | {self.duplicates} | "
            + (
                f"{self.latency_ms[0]:.0f} / {self.latency_ms[1]:.0f} |"
                if self.latency_ms
                else "- |"
            )
        )


def transactions(worker: Worker) -> float:
    """The job core transactions a worker committed so far (its /metrics)."""
    status, body = http_get(worker.url + "/metrics")
    found = re.search(rb'^cp_transactions_total\{outcome="committed"\} ([0-9.e+]+)$', body, re.M)
    if status != 200 or found is None:
        raise SystemExit(f"{worker.url}/metrics has no cp_transactions_total ({status})")
    return float(found[1])


def pid_of(worker: Worker | None) -> int | None:
    return worker.process.pid if worker is not None and worker.process is not None else None


#: Extra settings for every worker of the run (`--env NAME=VALUE`), for A/B runs.
EXTRA_ENV: dict[str, str] = {}


def _setting(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {item!r}")
    return name, value


def add_env_argument(parser: argparse.ArgumentParser) -> None:
    """`--env NAME=VALUE`, repeatable: a setting for every worker; `args.env` is the pairs."""
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        type=_setting,
        metavar="NAME=VALUE",
        help="a worker setting",
    )


def new(bootstrap: str, tmp: Path, name: str) -> Stack:
    stack = new_stack(bootstrap, "s" + uuid.uuid4().hex[:8], name, tmp / name)
    stack.env["CP_LOG_LEVEL"] = "WARNING"
    stack.env.update(EXTRA_ENV)
    return stack


def scale(
    bootstrap: str, tmp: Path, workers: int, provider_workers: int, jobs: int, *, steady: float
) -> Scale:
    """One row: a burst of `jobs`, or with `steady` an open loop of `jobs` at that rate."""
    stack = new(bootstrap, tmp, f"scale-{workers}x{provider_workers}")
    try:
        providers = [stack.start_providers(f"providers-{n + 1}") for n in range(provider_workers)]
        cps = [stack.start_cp(f"cp-{n + 1}", free_port()) for n in range(workers)]
        wait_ready([w.url for w in cps])
        asyncio.run(burst(stack, label="warmup", jobs=100, prompt_bytes=200, timeout_s=120))
        pids = [pid_of(w) for w in cps]
        others = [*(pid_of(w) for w in providers), broker_pid(bootstrap)]
        port = broker_requests.jmx_port()
        requests_before = broker_requests.snapshot(port) if port else None
        before = [cpu_s(p) for p in pids + others]
        txns_before = sum(transactions(w) for w in cps)
        if steady:
            loop = asyncio.run(open_loop(stack, rate=steady, seconds=jobs / steady))
            rate, seen, duplicates = loop.achieved_rate, loop.seen, loop.duplicates
            latency: tuple[float, float] | None = (
                pct_ms(loop.latencies, 0.5),
                pct_ms(loop.latencies, 0.99),
            )
        else:
            result = asyncio.run(burst(stack, label="scale", jobs=jobs, prompt_bytes=200))
            rate, seen, duplicates = result.rate, result.seen, result.duplicates
            latency = None
        after = [cpu_s(p) for p in pids + others]
        txns = sum(transactions(w) for w in cps) - txns_before
        requests = (
            broker_requests.per_job(requests_before, broker_requests.snapshot(port), seen)
            if port and requests_before is not None
            else None
        )
    finally:
        stack.stop()
        asyncio.run(stack.delete_topics())
    used = [(b - a) * 1000 / max(1, seen) for a, b in zip(before, after, strict=True)]
    return Scale(
        workers=workers,
        provider_workers=provider_workers,
        jobs=jobs,
        rate=rate,
        cp_cpu_per_job_ms=sum(used[:workers]),
        per_worker_ms=used[:workers],
        per_provider_ms=used[workers : workers + provider_workers],
        broker_ms=used[-1],
        transactions_per_job=txns / max(1, seen),
        duplicates=duplicates,
        seen=seen,
        latency_ms=latency,
        broker_requests=requests,
    )


@dataclass
class Event:
    name: str
    at: float  # seconds after the open loop's first send

    def row(self, loop: OpenLoop, steady_gap: float, until: float) -> str:
        """The event's window: from 1 s before it to 15 s after, or to the next event."""
        end = min(self.at + WINDOW_S, until)
        finals = sorted(s + lat for s, lat in zip(loop.sent_at, loop.latencies, strict=True))
        inside = [t for t in finals if self.at - 1 <= t <= end]
        gaps = [b - a for a, b in itertools.pairwise(inside)]
        sent = [
            lat
            for s, lat in zip(loop.sent_at, loop.latencies, strict=True)
            if self.at - 1 <= s <= end
        ]
        delayed = [lat for lat in sent if lat > DELAYED_S]
        return (
            f"| {self.name} at {self.at:.1f} s | {max(gaps, default=0) * 1000:.0f} "
            f"(steady {steady_gap * 1000:.0f}) | {len(delayed)} of {len(sent)} | "
            f"{max(sent, default=0):.2f} |"
        )


async def _churn(stack: Stack, args: argparse.Namespace) -> tuple[OpenLoop, list[Event]]:
    events: list[Event] = []
    seconds = args.leave_at + WINDOW_S + 5

    async def join_then_leave(started: float) -> None:
        await asyncio.sleep(args.join_at)
        events.append(Event("cp-3 joins (process start)", time.monotonic() - started))
        await asyncio.to_thread(stack.start_cp, "cp-3", free_port())
        await asyncio.sleep(max(0.0, args.leave_at - (time.monotonic() - started)))
        events.append(Event("cp-1 leaves (SIGTERM)", time.monotonic() - started))
        assert stack.cp is not None
        await asyncio.to_thread(stack.cp.stop)

    started = time.monotonic()
    churn = asyncio.create_task(join_then_leave(started))
    loop = await open_loop(stack, rate=args.rate, seconds=seconds, drain_s=60)
    await churn
    return loop, events


def rebalance(bootstrap: str, tmp: Path, args: argparse.Namespace) -> list[str]:
    stack = new(bootstrap, tmp, "churn")
    try:
        stack.start_providers()
        cps = [stack.start_cp("cp-1", free_port()), stack.start_cp("cp-2", free_port())]
        wait_ready([w.url for w in cps])
        asyncio.run(burst(stack, label="warmup", jobs=100, prompt_bytes=200, timeout_s=120))
        loop, events = asyncio.run(_churn(stack, args))
    finally:
        stack.stop()
        asyncio.run(stack.delete_topics())
    finals = sorted(s + lat for s, lat in zip(loop.sent_at, loop.latencies, strict=True))
    steady = [t for t in finals if 1.0 <= t <= events[0].at]
    steady_gap = max((b - a for a, b in itertools.pairwise(steady)), default=0.0)
    lat = sorted(loop.latencies)
    return [
        f"Open loop {args.rate:g} jobs/s ({loop.seen}/{loop.jobs} finished, "
        f"{loop.duplicates} duplicate final responses, states {loop.states}); "
        f"job latency p50 {lat[len(lat) // 2] * 1000:.0f} ms over the whole run.",
        "",
        "| event | longest gap between final responses in the 15 s after (or up to the next "
        f"event), ms | jobs sent then taking > {DELAYED_S:g} s | slowest, s |",
        "|---|---:|---:|---:|",
        *(
            event.row(loop, steady_gap, until=after.at if after else float("inf"))
            for event, after in zip(events, [*events[1:], None], strict=True)
        ),
    ]


#: Control-plane workers of the per-worker rows.
PER_WORKER_ROWS = (1, 2, 4)
TABLE_HEADER = (
    "| cp workers | provider workers | finished | jobs/s | cp CPU ms/job (each) | "
    "provider workers ms/job (each) | broker ms/job | all ms/job | projected jobs/s per "
    "core | transactions per job | duplicate finals | latency p50 / p99 ms |"
)
TABLE_RULE = "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"


def table(rows: list[Scale]) -> list[str]:
    """The rows as a markdown table, then the broker's requests per job of each row that
    counted them, each part followed by a blank line."""
    requests = [
        f"- broker requests per job, {row.workers}x{row.provider_workers}: "
        + broker_requests.summary(row.broker_requests)
        for row in rows
        if row.broker_requests is not None
    ]
    return [
        TABLE_HEADER,
        TABLE_RULE,
        *(row.row() for row in rows),
        "",
        *([*requests, ""] if requests else []),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=3000, help="burst jobs per row (3000)")
    parser.add_argument(
        "--rows",
        default="1x1,2x1,4x1,2x2",
        help="rows as <control-plane workers>x<provider workers> (1x1,2x1,4x1,2x2); empty: none",
    )
    parser.add_argument(
        "--steady",
        type=float,
        default=0.0,
        help="scale rows as an open loop of --jobs at this many jobs/s instead of a burst: the "
        "CPU per job at a moderate rate, with latency",
    )
    parser.add_argument(
        "--per-worker",
        type=float,
        default=37.5,
        help="per-worker rows: an open loop at this many jobs/s per control-plane worker, for "
        "1, 2 and 4 workers (37.5); 0: none",
    )
    parser.add_argument(
        "--per-worker-s", type=float, default=30.0, help="seconds of each per-worker row (30)"
    )
    parser.add_argument("--rate", type=float, default=100.0, help="open-loop jobs/s (100)")
    parser.add_argument("--join-at", type=float, default=10.0)
    parser.add_argument("--leave-at", type=float, default=30.0)
    add_env_argument(parser)
    parser.add_argument("--no-churn", action="store_true", help="skip the join/leave run")
    parser.add_argument("--no-record", action="store_true", help="do not append to results.md")
    args = parser.parse_args()
    EXTRA_ENV.update(args.env)

    began = time.monotonic()
    rows: list[Scale] = []
    with kafka_broker() as bootstrap, tempfile.TemporaryDirectory() as tmp:
        for spec in (r for r in args.rows.split(",") if r):
            workers, _, provider_workers = spec.partition("x")
            print(f"scale: {workers} control-plane x {provider_workers or 1} provider", flush=True)
            rows.append(
                scale(
                    bootstrap,
                    Path(tmp),
                    int(workers),
                    int(provider_workers or 1),
                    args.jobs,
                    steady=args.steady,
                )
            )
            print("  " + rows[-1].row(), flush=True)
        per_worker: list[Scale] = []
        for workers in PER_WORKER_ROWS if args.per_worker > 0 else ():
            rate = args.per_worker * workers
            print(f"per worker: {workers} control-plane at {rate:g} jobs/s", flush=True)
            per_worker.append(
                scale(
                    bootstrap,
                    Path(tmp),
                    workers,
                    1,
                    max(1, round(rate * args.per_worker_s)),
                    steady=rate,
                )
            )
            print("  " + per_worker[-1].row(), flush=True)
        churn: list[str] = []
        if not args.no_churn:
            print("rebalance: join and leave under load", flush=True)
            churn = rebalance(bootstrap, Path(tmp), args)
    lines = [
        f"## Scale and rebalance, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (`python -m bench.scale`)",
        "",
        f"Commit `{git_commit()}`; 8 job partitions, instant simulated providers, "
        + (
            f"an open loop of {args.jobs} jobs of 200 B at {args.steady:g} jobs/s per row "
            "(`--steady`), "
            if args.steady
            else f"bursts of {args.jobs} jobs of 200 B, "
        )
        + "each row on a fresh stack; every process "
        "shares the same 2 cores, so jobs/s measures contention, CPU-s per job measures the work. "
        f"Worker settings: {EXTRA_ENV or 'defaults'}. "
        f"Run took {time.monotonic() - began:.0f} s.",
        "",
        *table(rows),
        *(
            [
                f"Per worker: an open loop at {args.per_worker:g} jobs/s per control-plane worker "
                f"for {args.per_worker_s:g} s, one provider worker (`--per-worker`).",
                "",
                *table(per_worker),
            ]
            if per_worker
            else []
        ),
        *churn,
        "",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_record:
        with RESULTS.open("a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
