"""Measure what `CP_FETCH_MAX_WAIT_MS` trades: idle CPU of the workers against job latency.

For each wait in `--waits` (default 10 and 100 ms, `--repeat` times, interleaved) a fresh stack
(one control-plane worker, one provider worker, instant simulated provider) is warmed up, then:

- idle: the CPU each worker uses per second over `--idle-s` seconds with no jobs (utime + stime
  from /proc);
- latency: open loops at each of `--rates` jobs/s for `--seconds` s, p50 and p99 from produce to
  final response;
- burst: `--jobs` jobs at once, jobs/s and control-plane CPU per job.

    .venv/bin/python -m bench.fetch_wait --no-record
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.listing import wait_ready
from bench.report import pct_ms
from bench.scale import cpu_s, new, pid_of
from bench.scenarios import burst, open_loop
from bench.throughput import RESULTS, git_commit
from tests.support.broker import kafka_broker
from tests.support.workers import free_port


@dataclass
class Run:
    wait_ms: int
    idle_cp_ms_per_s: float = 0.0
    idle_provider_ms_per_s: float = 0.0
    latency: dict[int, tuple[float, float, int, int]] = field(default_factory=dict)
    burst_rate: float = 0.0
    burst_cp_ms_per_job: float = 0.0

    def row(self, rates: list[int]) -> str:
        cells = [
            f"{self.latency[r][0]:.0f} / {self.latency[r][1]:.0f}"
            + ("" if self.latency[r][2] == self.latency[r][3] else " (lost!)")
            for r in rates
        ]
        return (
            f"| {self.wait_ms} ms | {self.idle_cp_ms_per_s:.0f} | "
            f"{self.idle_provider_ms_per_s:.0f} | {' | '.join(cells)} | "
            f"{self.burst_rate:.0f} | {self.burst_cp_ms_per_job:.2f} |"
        )


def measure(bootstrap: str, tmp: Path, wait_ms: int, args: argparse.Namespace) -> Run:
    stack = new(bootstrap, tmp, f"fw-{wait_ms}-{uuid.uuid4().hex[:4]}")
    stack.env["CP_FETCH_MAX_WAIT_MS"] = str(wait_ms)
    run = Run(wait_ms)
    try:
        provider = stack.start_providers()
        cp = stack.start_cp("cp-1", free_port())
        wait_ready([cp.url])
        asyncio.run(burst(stack, label="warmup", jobs=100, prompt_bytes=200, timeout_s=120))
        time.sleep(2)  # the warm-up's last commits and offsets
        pids = [pid_of(cp), pid_of(provider)]
        before = [cpu_s(p) for p in pids]
        time.sleep(args.idle_s)
        after = [cpu_s(p) for p in pids]
        run.idle_cp_ms_per_s, run.idle_provider_ms_per_s = (
            (b - a) * 1000 / args.idle_s for a, b in zip(before, after, strict=True)
        )
        for rate in args.rates:
            loop = asyncio.run(open_loop(stack, rate=rate, seconds=args.seconds))
            run.latency[rate] = (
                pct_ms(loop.latencies, 0.5),
                pct_ms(loop.latencies, 0.99),
                loop.seen,
                loop.jobs,
            )
        cp_before = cpu_s(pid_of(cp))
        result = asyncio.run(burst(stack, label="burst", jobs=args.jobs, prompt_bytes=200))
        run.burst_rate = result.rate
        run.burst_cp_ms_per_job = (cpu_s(pid_of(cp)) - cp_before) * 1000 / max(1, result.seen)
    finally:
        stack.stop()
        asyncio.run(stack.delete_topics())
    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--waits", default="10,100", help="fetch waits in ms (10,100)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per wait, interleaved (2)")
    parser.add_argument("--rates", default="25,100,200", help="open-loop jobs/s (25,100,200)")
    parser.add_argument("--seconds", type=float, default=15.0, help="each open loop (15)")
    parser.add_argument("--idle-s", type=float, default=15.0, help="idle measurement (15)")
    parser.add_argument("--jobs", type=int, default=3000, help="burst jobs (3000)")
    parser.add_argument("--no-record", action="store_true", help="do not append to results.md")
    args = parser.parse_args()
    args.rates = [int(r) for r in args.rates.split(",") if r]
    waits = [int(w) for w in args.waits.split(",") if w]
    began = time.monotonic()
    runs: list[Run] = []
    with kafka_broker() as bootstrap, tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for wait_ms in waits:
                runs.append(measure(bootstrap, Path(tmp), wait_ms, args))
                print("  " + runs[-1].row(args.rates), flush=True)
    latency_heads = " | ".join(f"{r} jobs/s p50 / p99 ms" for r in args.rates)
    lines = [
        f"## Fetch wait, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (`python -m bench.fetch_wait`)",
        "",
        f"Commit `{git_commit()}`; `CP_FETCH_MAX_WAIT_MS` per row, one control-plane and one "
        "provider worker on a fresh stack each, instant simulated provider, 200 B jobs; idle "
        f"CPU over {args.idle_s:g} s, open loops of {args.seconds:g} s, a burst of {args.jobs} "
        f"jobs. Run took {time.monotonic() - began:.0f} s.",
        "",
        f"| fetch wait | idle cp CPU ms/s | idle provider worker CPU ms/s | {latency_heads} | "
        "burst jobs/s | burst cp CPU ms/job |",
        "|---:|---:|---:|" + "---:|" * len(args.rates) + "---:|---:|",
        *(run.row(args.rates) for run in sorted(runs, key=lambda r: r.wait_ms)),
        "",
    ]
    print("\n".join(lines))
    if not args.no_record:
        with RESULTS.open("a") as out:
            out.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
