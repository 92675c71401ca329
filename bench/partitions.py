"""What a job partition costs a control-plane worker, and what growing the count costs.

Per partition: one control-plane worker of an empty deployment holding all of P partitions (for
each P of `--counts`): its RSS and open file descriptors once ready, and the time to ready. Every
partition has a RocksDB store (row cache and memtables) and two transactional producers.

Repartition: a deployment of `--from` partitions holding `--jobs` finished jobs. The worker is
stopped (SIGTERM), `streams.repartition` grows it to `--to` partitions and moves the jobs whose
partition changes, and the worker starts again on the new layout. Reported: the tool's time (in
process, and as the command), jobs moved and changelog records read, the restore the worker
logs, the time from the stop to ready again, and a check that sampled jobs read back COMPLETED
from their new partition.

    .venv/bin/python -m bench.partitions --no-record
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import yaml

from bench.listing import KEY, TENANT, fill, wait_ready
from bench.scenarios import restored_lines
from bench.throughput import RESULTS, git_commit, rss_mib
from domain.ids import job_id_for
from streams.placement import partition_for
from tests.support.broker import kafka_broker
from tests.support.stack import Stack, new_stack
from tests.support.workers import Worker, free_port

ROOT = Path(__file__).resolve().parents[1]


def fds(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def topics_file(directory: Path, partitions: int) -> Path:
    topics = yaml.safe_load((ROOT / "topics.yaml").read_text())
    topics["defaults"]["partitions"] = partitions
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"topics-{partitions}.yaml"
    path.write_text(yaml.safe_dump(topics, sort_keys=False))
    return path


def new(bootstrap: str, tmp: Path, name: str, partitions: int) -> Stack:
    root = tmp / name
    path = topics_file(root, partitions)
    stack = new_stack(bootstrap, "p" + uuid.uuid4().hex[:8], name, root, topics_file=path)
    stack.env["CP_API_KEYS"] = f"{KEY}={TENANT}"
    return stack


def pid_of(worker: Worker) -> int | None:
    return worker.process.pid if worker.process is not None else None


def per_partition(bootstrap: str, tmp: Path, partitions: int) -> str:
    stack = new(bootstrap, tmp, f"count-{partitions}", partitions)
    try:
        started = time.monotonic()
        cp = stack.start_cp("cp-1", free_port())
        wait_ready([cp.url])
        ready = time.monotonic() - started
        time.sleep(2)  # let start-up garbage settle
        rss, files = rss_mib(pid_of(cp)), fds(pid_of(cp))
    finally:
        stack.stop()
        asyncio.run(stack.delete_topics())
    print(f"  {partitions} partitions: RSS {rss} MiB, {files} fds, ready in {ready:.1f} s")
    return f"| {partitions} | {rss:.0f} | {files} | {ready:.1f} |"


def repartition(bootstrap: str, tmp: Path, args: argparse.Namespace) -> list[str]:
    stack = new(bootstrap, tmp, "grow", args.from_count)
    try:
        stack.start_providers()
        cp = stack.start_cp("cp-1", free_port())
        wait_ready([cp.url])
        print(f"  filling {args.jobs} jobs on {args.from_count} partitions", flush=True)
        asyncio.run(
            fill(
                stack.bootstrap,
                stack.topic("cp.intake"),
                stack.topic("cp.responses"),
                args.jobs,
                timeout_s=600,
            )
        )
        stopped = time.monotonic()
        cp.stop(timeout=30)
        stop_s = time.monotonic() - stopped
        stack.env["CP_TOPICS_FILE"] = str(topics_file(stack.root, args.to_count))
        began = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "streams.repartition"],
            env={**os.environ, **stack.env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=1800,
        )
        command_s = time.monotonic() - began
        if done.returncode != 0:
            raise SystemExit(f"repartition failed: {done.stderr}")
        print(done.stdout, flush=True)
        lines = done.stdout.splitlines()
        tool_s = float(lines[-1].split(" in ")[1].split()[0])
        summary = next(line for line in lines if "changelog records" in line)
        records = int(summary.split("read ")[1].split()[0])
        moved = int(summary.split(" jobs (")[0].rsplit(" ", 1)[1])
        cp.env["CP_TOPICS_FILE"] = stack.env["CP_TOPICS_FILE"]
        offset = cp.log_path.stat().st_size if cp.log_path.exists() else 0
        restarted = time.monotonic()
        cp.start()
        wait_ready([cp.url], timeout_s=600)
        ready_s = time.monotonic() - restarted
        restored = restored_lines(cp.log_path, offset)
        restore_s = max((float(line.get("seconds", 0)) for line in restored), default=0.0)
        sample = [
            job_id_for(TENANT, f"list-{n}") for n in range(0, args.jobs, args.jobs // 200 or 1)
        ]
        good = asyncio.run(read_back(cp.url, sample))
        moved_expected = sum(
            1
            for n in range(args.jobs)
            if partition_for(job_id_for(TENANT, f"list-{n}"), args.from_count)
            != partition_for(job_id_for(TENANT, f"list-{n}"), args.to_count)
        )
    finally:
        stack.stop()
        asyncio.run(stack.delete_topics())
    pause = stop_s + command_s + ready_s
    per_m = tool_s / max(1, args.jobs) * 1e6
    return [
        f"| jobs held | {args.jobs:,} |",
        f"| partitions | {args.from_count} → {args.to_count} |",
        f"| jobs moved (expected by murmur2) | {moved:,} ({moved_expected:,}) |",
        f"| changelog records read | {records:,} |",
        f"| graceful stop of the worker | {stop_s:.1f} s |",
        f"| tool, in process (grow + re-key) | {tool_s:.2f} s ({per_m:.0f} s per million held) |",
        f"| tool, as a command (with Python start-up) | {command_s:.2f} s |",
        f"| restore of the new layout (core.restored) | {restore_s:.2f} s |",
        f"| start to ready on the new layout | {ready_s:.1f} s |",
        f"| stop to ready: the pause (stop + command + start) | {pause:.1f} s |",
        f"| sampled jobs read back COMPLETED | {good}/{len(sample)} |",
    ]


async def read_back(url: str, job_ids: list[str]) -> int:
    """How many of the jobs read back COMPLETED from the worker."""
    good = 0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        for job_id in job_ids:
            async with http.get(f"{url}/jobs/{job_id}") as response:
                body = await response.json(content_type=None)
                good += response.status == 200 and body.get("state") == "COMPLETED"
    return good


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", default="8,32,64", help="partition counts to hold (8,32,64)")
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs held when growing (20000)")
    parser.add_argument("--from", dest="from_count", type=int, default=8)
    parser.add_argument("--to", dest="to_count", type=int, default=16)
    parser.add_argument("--no-record", action="store_true", help="do not append to results.md")
    args = parser.parse_args()
    began = time.monotonic()
    counts = [int(c) for c in args.counts.split(",") if c]
    with kafka_broker() as bootstrap, tempfile.TemporaryDirectory(prefix="bench-parts-") as tmp:
        print("per partition:", flush=True)
        rows = [per_partition(bootstrap, Path(tmp), p) for p in counts]
        print("repartition:", flush=True)
        grow = repartition(bootstrap, Path(tmp), args)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(
        [
            f"## Partitions, {stamp} (`python -m bench.partitions`)",
            "",
            f"Commit `{git_commit()}`; 2 cores shared with the broker. Run took "
            f"{time.monotonic() - began:.0f} s.",
            "",
            "One control-plane worker holding every partition of an empty deployment:",
            "",
            "| partitions | RSS MiB | open fds | start to ready s |",
            "|---:|---:|---:|---:|",
            *rows,
            "",
            "Growing a deployment with `streams.repartition` (the worker stopped meanwhile):",
            "",
            "| | |",
            "|---|---|",
            *grow,
            "",
        ]
    )
    print(text)
    if not args.no_record:
        with RESULTS.open("a") as results:
            results.write("\n" + text)


if __name__ == "__main__":
    main()
