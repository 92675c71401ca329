"""Measure the control plane end to end on the local broker; print and record one dated section.

One run measures, in order: the raw Kafka round trip of one aiokafka producer and consumer;
a burst of 200 B jobs (profiled with py-spy) and one of 20 KB jobs, with the records and bytes each
job writes to every topic; an open loop at half the 200 B burst rate; the RSS of the workers and
the broker; a cold restart of the control-plane worker from its changelog. It starts its own
stack (control-plane worker + provider worker, isolated topic prefix) and deletes its topics.

    .venv/bin/python -m bench.throughput --no-record
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from bench import clients
from bench.profile import Profiler
from bench.report import Header, Run, render
from bench.scenarios import burst, open_loop, restart
from streams.settings import Settings
from streams.topology import catalogue_topology, load_topology
from tests.support.broker import kafka_broker
from tests.support.stack import Stack, new_stack
from tests.support.workers import ROOT

RESULTS = Path(__file__).with_name("results.md")


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def broker_pid(bootstrap: str) -> int | None:
    """The pid scripts/kafka.sh wrote for a broker on this port, if it still runs."""
    port = bootstrap.rsplit(":", 1)[-1]
    var = Path(os.environ.get("CP_VAR_DIR", ROOT / "var"))
    try:
        pid = int((var / f"kafka-{port}" / "broker.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(  # noqa: S603
            ["git", *args],  # noqa: S607
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    return f"{commit}-dirty" if dirty else commit


def counted_topics() -> list[str]:
    """Logical names of the topics whose records per job are counted, in table order."""
    topology = catalogue_topology(ROOT / "topics.yaml", ROOT / "config" / "catalogue.yaml")
    dispatch = sorted(spec.name for spec in topology.dispatch_topics().values())
    return [
        "cp.intake",
        "cp.commands",
        "cp.results",
        *dispatch,
        "cp.events",
        "cp.responses",
        "cp.dlq",
        "{app_id}-jobs-changelog",
    ]


def measure(stack: Stack, args: argparse.Namespace, run: Run, tmp: Path) -> None:
    def say(text: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {text}", flush=True)

    began = time.monotonic()
    say("Kafka round-trip ceiling")
    run.ceiling = asyncio.run(
        clients.ceiling(stack.bootstrap, stack.prefix + "bench.ceiling", records=args.ceiling)
    )
    say("starting the control-plane worker and the provider worker")
    if args.commit_interval_ms is not None:  # for the control-plane worker only
        stack.env["CP_COMMIT_INTERVAL_MS"] = str(args.commit_interval_ms)
    stack.start_cp()
    stack.env.pop("CP_COMMIT_INTERVAL_MS", None)
    stack.start_providers()
    assert stack.cp is not None and stack.cp.process is not None
    assert stack.providers is not None and stack.providers.process is not None
    say("warm-up")
    asyncio.run(burst(stack, label="warmup", jobs=50, prompt_bytes=200, timeout_s=120))

    real = {stack.topic(name): name for name in run.topics}
    profiler = None if args.no_profile else Profiler(stack.cp.process.pid, tmp)
    say(f"burst of {args.jobs} jobs with 200 B prompts")
    try:
        small = asyncio.run(
            burst(
                stack,
                label="200B",
                jobs=args.jobs,
                prompt_bytes=200,
                counted=list(real),
                on_start=profiler.start if profiler else None,
                on_end=profiler.interrupt if profiler else None,
            )
        )
    finally:
        if profiler is not None:
            profiler.interrupt()
    small.volumes = {real[topic]: volume for topic, volume in small.volumes.items()}
    run.small = small
    if profiler is not None:
        run.profile = profiler.result()
        run.profile_note = profiler.note
    else:
        run.profile_note = "skipped (--no-profile)"
    say(f"  {small.seen}/{small.jobs} in {small.seconds:.1f} s: {small.rate:.1f} jobs/s")

    say(f"burst of {args.big_jobs} jobs with 20 KB prompts")
    big = asyncio.run(
        burst(stack, label="20KB", jobs=args.big_jobs, prompt_bytes=20_000, counted=list(real))
    )
    big.volumes = {real[topic]: volume for topic, volume in big.volumes.items()}
    run.big = big
    say(f"  {big.seen}/{big.jobs} in {big.seconds:.1f} s: {big.rate:.1f} jobs/s")
    run.rss = {
        "control-plane worker, after the bursts": rss_mib(stack.cp.process.pid),
        "provider worker, after the bursts": rss_mib(stack.providers.process.pid),
        "broker, after the bursts": rss_mib(broker_pid(stack.bootstrap)),
    }

    if args.open_loop_s > 0 and (small.rate > 0 or args.open_loop_rate):
        rate = args.open_loop_rate or small.rate / 2
        say(f"open loop at {rate:.1f} jobs/s for {args.open_loop_s:.0f} s")
        run.open_loop = asyncio.run(open_loop(stack, rate=rate, seconds=args.open_loop_s))

    if args.hold > 0:
        say(f"holding {args.hold} more jobs")
        held = asyncio.run(
            burst(stack, label="hold", jobs=args.hold, prompt_bytes=200, counted=list(real))
        )
        held.volumes = {real[topic]: volume for topic, volume in held.volumes.items()}
        run.held = held
    run.hold = args.hold
    say("cold restart of the control-plane worker")
    run.restore = restart(stack, stack.cp)
    run.rss["control-plane worker, after the restore"] = rss_mib(stack.cp.process.pid)
    say("done")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=3000, help="200 B burst size (3000)")
    parser.add_argument("--big-jobs", type=int, default=1500, help="20 KB burst size (1500)")
    parser.add_argument("--open-loop-s", type=float, default=20.0, help="open loop seconds (20)")
    parser.add_argument(
        "--open-loop-rate", type=float, help="open loop jobs/s (half the 200 B burst rate)"
    )
    parser.add_argument("--hold", type=int, default=0, help="extra jobs before the restart (0)")
    parser.add_argument("--ceiling", type=int, default=50_000, help="records of the raw round trip")
    parser.add_argument("--commit-interval-ms", type=int, help="CP_COMMIT_INTERVAL_MS of the cp")
    parser.add_argument("--no-profile", action="store_true", help="do not run py-spy")
    parser.add_argument("--no-record", action="store_true", help="do not append to results.md")
    args = parser.parse_args()

    began = time.monotonic()
    interval = args.commit_interval_ms
    if interval is None:
        interval = Settings().commit_interval_ms  # CP_COMMIT_INTERVAL_MS, which workers inherit
    run = Run(
        header=Header(
            at=datetime.now(UTC),
            python=platform.python_version(),
            cpus=os.cpu_count() or 0,
            partitions=load_topology(ROOT / "topics.yaml").job_partitions(),
            commit_interval_ms=interval,
            commit=git_commit(),
        ),
        topics=counted_topics(),
    )
    with kafka_broker() as bootstrap, tempfile.TemporaryDirectory() as tmp:
        stack = new_stack(bootstrap, "b" + uuid.uuid4().hex[:8], "bench", Path(tmp))
        stack.env["CP_LOG_LEVEL"] = "WARNING"
        try:
            measure(stack, args, run, Path(tmp))
        finally:
            stack.stop()
            asyncio.run(stack.delete_topics())
    run.seconds = time.monotonic() - began
    text = render(run)
    print("\n" + text)
    if not args.no_record:
        with RESULTS.open("a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
