"""Run the whole system locally: the control-plane worker and the provider worker, supervised.

`python -m streams.run` (`make run`) starts both workers as child processes with their output in
log files, waits until both answer /readyz, prints where everything is and how to submit a job,
and stops both on Ctrl-C or SIGTERM. `--demo` (`make demo`) then submits a few scripted jobs,
prints their results and timelines, and stops. Topics must exist first (`make topics`).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError

from domain.ids import job_id_for
from streams.settings import Settings, get_settings, local_url
from streams.topology import catalogue_topology

T = TypeVar("T")

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
DEMO_TIMEOUT_S = 120.0
DEV_TENANT = "dev-tenant"
DEMO_TENANT = "demo"
TERMINAL_EVENTS = frozenset({"completed", "failed", "cancelled", "expired"})


class RunError(Exception):
    """Something the user must fix or look at; the message says what."""


class ChildExited(RunError):
    """A worker ended while it should have been running."""


@dataclass
class Child:
    """One worker process: its command, environment, log file and readiness URL."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ready_url: str
    process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group: a terminal's Ctrl-C reaches only us, and we stop it.
                process_group=0,
            )

    async def ready(self, http: aiohttp.ClientSession) -> bool:
        try:
            async with http.get(self.ready_url) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def stop(self, grace_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), grace_s)
        except TimeoutError:
            print(f"run: {self.name} did not stop in {grace_s:.0f}s; killing it", file=sys.stderr)
            process.kill()
            await process.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Supervisor:
    """Both workers plus the events that end a run: a stop signal or a child's exit."""

    children: list[Child]
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        for child in self.children:
            await child.start()
            print(f"run: started {child.name} (pid {child.pid}), log: {child.log_path}", flush=True)

    async def race(self, work: Awaitable[T]) -> T | None:
        """Run `work` until it ends; None if a stop signal came first; raise if a child exits."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self.stop.wait())
        exits = {
            asyncio.ensure_future(child.process.wait()): child
            for child in self.children
            if child.process is not None
        }
        try:
            done, _ = await asyncio.wait(
                {task, stopped, *exits}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for future in (task, stopped, *exits):
                future.cancel()
        for future, child in exits.items():
            if future in done:
                code = future.result()
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                raise ChildExited(
                    f"{child.name} (pid {child.pid}) {how}; "
                    f"last lines of {child.log_path}:\n{child.tail()}"
                )
        if task in done:
            return task.result()
        return None

    async def wait_ready(self, within_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        pending = list(self.children)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while pending:
                pending = [child for child in pending if not await child.ready(http)]
                if pending and loop.time() > deadline:
                    detail = "\n".join(
                        f"--- {c.name}: {c.ready_url} not ready; last lines of {c.log_path}:\n"
                        f"{c.tail()}"
                        for c in pending
                    )
                    raise RunError(
                        f"workers not ready within {within_s:.0f}s (are the topics created? "
                        f"`make topics`)\n{detail}"
                    )
                if pending:
                    await asyncio.sleep(0.25)
        return True

    async def shutdown(self) -> None:
        await asyncio.gather(*(child.stop() for child in self.children))


# -- set-up ---------------------------------------------------------------------------------------


def dev_api_key(environ: dict[str, str]) -> str | None:
    """Return a fresh development key when no API keys are configured, else None."""
    if environ.get("CP_API_KEYS") or environ.get("CP_API_KEYS_FILE"):
        return None
    return "dev-" + secrets.token_urlsafe(18)


def make_children(settings: Settings, log_dir: Path, api_key: str | None) -> list[Child]:
    base = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cp_env = dict(base)
    if api_key is not None:
        cp_env["CP_API_KEYS"] = f"{api_key}={DEV_TENANT}"
    cp_url = local_url(settings.web_host, settings.web_port)
    providers_url = local_url(settings.web_host, settings.provider_web_port)
    return [
        Child(
            name="control-plane",
            argv=[sys.executable, "-m", "faust", "-A", "streams.app", "worker", "-l", "info"],
            env=cp_env,
            log_path=log_dir / "control-plane.log",
            ready_url=f"{cp_url}/readyz",
        ),
        Child(
            name="providers",
            argv=[sys.executable, "-m", "providers.worker"],
            env=base,
            log_path=log_dir / "providers.log",
            ready_url=f"{providers_url}/readyz",
        ),
    ]


async def preflight(settings: Settings) -> None:
    """Fail fast, with the fix, when the broker is down or the topics are missing."""
    servers = settings.kafka_bootstrap_servers
    consumer = AIOKafkaConsumer(bootstrap_servers=servers, request_timeout_ms=10_000)
    try:
        await consumer.start()
    except KafkaConnectionError as exc:
        await consumer.stop()
        raise RunError(f"no Kafka broker answers at {servers} ({exc}); `make kafka-up`") from None
    try:
        existing = await consumer.topics()
    finally:
        await consumer.stop()
    topology = catalogue_topology(settings.topics_file, settings.catalogue_file)
    wanted = [
        settings.topic(spec.name, prefixed=spec.prefixed) for spec in topology.topics.values()
    ]
    missing = [name for name in wanted if name not in existing]
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise RunError(
            f"missing topics on {servers}: {shown}; create them with `make topics` "
            "(python -m streams.admin)"
        )


def banner(settings: Settings, children: list[Child], api_key: str | None, took_s: float) -> str:
    cp, providers = children
    api = local_url(settings.web_host, settings.web_port)
    intake = settings.topic("cp.intake")
    key_line = (
        f"{api_key}  (tenant {DEV_TENANT}; generated for this run, set CP_API_KEYS to choose)"
        if api_key
        else "from CP_API_KEYS / CP_API_KEYS_FILE"
    )
    job = '{"request_id":"hello-1","tenant_id":"%s","messages":[{"role":"user","content":"Hi"}]}'
    body = '{"request_id":"hello-2","messages":[{"role":"user","content":"Hi"}]}'
    lines = [
        "",
        f"Prompt Gateway control plane is ready ({took_s:.1f}s).",
        f"  broker           {settings.kafka_bootstrap_servers}",
        *([f"  topics prefix    {settings.topic_prefix}"] if settings.topic_prefix else []),
        f"  web API          {api}  (/healthz, /readyz, POST /jobs)",
        *(
            [
                f"  read port        {local_url(settings.web_host, settings.read_port)}  "
                f"(GET /jobs/{{id}} from {settings.readers} reader processes; the rest relayed)"
            ]
            if settings.read_port
            else []
        ),
        f"  provider status  {local_url(settings.web_host, settings.provider_web_port)}/readyz",
        f"  processes        control-plane pid {cp.pid}, providers pid {providers.pid}",
        f"  logs             {cp.log_path}",
        f"                   {providers.log_path}",
        f"  API key          {key_line}",
        f"  webhooks         "
        f"{settings.webhook_allowed_hosts or 'off (no host in CP_WEBHOOK_ALLOWED_HOSTS)'}"
        " (sent by the provider worker)",
        "",
        "Submit a job:",
        f"  echo '{job % DEV_TENANT}' | kcat -P -b {settings.kafka_bootstrap_servers} -t {intake}",
        f"  curl -sS {api}/jobs -H 'Authorization: Bearer {api_key or '<key>'}' "
        f"-H 'Content-Type: application/json' -d '{body}'",
        f"Results on {settings.topic('cp.responses')}, timelines on {settings.topic('cp.events')}.",
        "",
        "Ctrl-C stops both workers.",
    ]
    return "\n".join(lines)


# -- demo -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoJob:
    name: str
    story: str
    outcomes: dict[str, list[str]]
    expect: str


DEMO_JOBS = (
    DemoJob("ok", "a plain job, answered on the first try", {"sim-cheap": ["ok"]}, "COMPLETED"),
    DemoJob(
        "retry",
        "rate limited once, retried on the same provider after a backoff",
        {"sim-cheap": ["rate_limited", "ok"]},
        "COMPLETED",
    ),
    DemoJob(
        "fallback",
        "an internal error on sim-cheap (retried once), then a fallback to sim-fast",
        {"sim-cheap": ["provider_internal"], "sim-fast": ["ok"]},
        "COMPLETED",
    ),
    DemoJob(
        "fail",
        "fails on every provider until the job's attempt budget is spent",
        {p: ["provider_internal"] for p in ("sim-cheap", "sim-fast", "sim-smart")},
        "FAILED",
    ),
)


def demo_request(request_id: str, job: DemoJob) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "tenant_id": DEMO_TENANT,
        "messages": [{"role": "user", "content": f"Demo: {job.story}."}],
        "preference": "cost",
        "metadata": {"demo": job.name},
        "simulate": {"outcomes": job.outcomes, "latency_ms": 150},
    }


async def run_demo(settings: Settings, wait_s: float) -> bool:
    """Submit the demo jobs, print each result and timeline; True when all ended as expected."""
    run = uuid.uuid4().hex[:8]  # fresh request ids, so the demo can run again and again
    jobs = {
        job_id_for(DEMO_TENANT, f"demo-{run}-{job.name}"): (f"demo-{run}-{job.name}", job)
        for job in DEMO_JOBS
    }
    servers = settings.kafka_bootstrap_servers
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all")
    consumer = AIOKafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False)
    await producer.start()
    await consumer.start()
    try:
        watched = (settings.topic("cp.responses"), settings.topic("cp.events"))
        tps = [
            TopicPartition(topic, p)
            for topic in watched
            for p in sorted(await producer.partitions_for(topic))
        ]
        consumer.assign(tps)
        for tp, offset in (await consumer.end_offsets(tps)).items():
            consumer.seek(tp, offset)  # read only what this run causes
        intake = settings.topic("cp.intake")
        sent = [
            await producer.send(intake, key=rid.encode(), value=orjson.dumps(demo_request(rid, j)))
            for rid, j in jobs.values()
        ]
        await asyncio.gather(*sent)
        print(
            f"\ndemo: submitted {len(jobs)} jobs to {intake} (tenant {DEMO_TENANT}, run {run}); "
            "waiting for their final responses...",
            flush=True,
        )
        finals, events = await collect(consumer, watched[0], set(jobs), wait_s)
    finally:
        await consumer.stop()
        await producer.stop()
    as_expected = True
    for job_id, (request_id, job) in jobs.items():
        final = finals.get(job_id)
        print(f"\n[{job.name}] {job.story}\n  request {request_id}  job {job_id}")
        print("  result   " + (describe_final(final) if final else "no final response (timeout)"))
        if final is None or final["state"] != job.expect:
            as_expected = False
            print(f"  UNEXPECTED: wanted {job.expect}")
        print("  timeline")
        for seq in sorted(events[job_id]):
            print("    " + describe_event(events[job_id][seq]))
    verdict = "every job ended as expected" if as_expected else "some jobs did not end as expected"
    print(f"\ndemo: {verdict}", flush=True)
    return as_expected


async def collect(
    consumer: AIOKafkaConsumer, responses_topic: str, job_ids: set[str], wait_s: float
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[int, dict[str, Any]]]]:
    """Read final responses and events of `job_ids` until each job has both, or time runs out."""
    finals: dict[str, dict[str, Any]] = {}
    events: dict[str, dict[int, dict[str, Any]]] = {job_id: {} for job_id in job_ids}

    def done() -> bool:
        return len(finals) == len(job_ids) and all(
            any(e["type"] in TERMINAL_EVENTS for e in events[j].values()) for j in job_ids
        )

    try:
        async with asyncio.timeout(wait_s):
            while not done():
                batches = await consumer.getmany(timeout_ms=500)
                for record in (r for records in batches.values() for r in records):
                    value = orjson.loads(record.value)
                    job_id = value.get("job_id")
                    if job_id not in job_ids:
                        continue
                    if record.topic == responses_topic:
                        finals[job_id] = value
                    else:  # outbox re-sends may repeat an event: keep one per seq
                        events[job_id][int(value["seq"])] = value
    except TimeoutError:
        print(f"demo: timed out after {wait_s:.0f}s", file=sys.stderr)
    return finals, events


def describe_final(final: dict[str, Any]) -> str:
    total = (final.get("cost") or {}).get("total")
    cost = "-"
    if total and total.get("amount") is not None:
        cost = f"{total['amount']} {total['currency']}" + (
            " (est.)" if total.get("estimated") else ""
        )
    error = (final.get("error") or {}).get("code", "-")
    return (
        f"{final['state']}  provider {final.get('provider') or '-'}  model "
        f"{final.get('model') or '-'}  attempts {final['attempts']}  cost {cost}  error {error}"
    )


def describe_event(event: dict[str, Any]) -> str:
    data: dict[str, Any] = event.get("data") or {}
    chosen = data.get("chosen") or {}
    provider = data.get("provider") or data.get("to_provider") or chosen.get("provider") or "-"
    note = str(data.get("reason") or (data.get("error") or {}).get("code") or "")
    if event["type"] == "fallback":
        note = f"{note}: {data.get('from_provider')} -> {data.get('to_provider')}"
    elif event["type"] == "retried":
        note = f"{note}, again in {data.get('delay_ms')} ms"
    elif event["type"] in TERMINAL_EVENTS and "attempts" in data:
        note = ", ".join(filter(None, [note, f"{data['attempts']} attempt(s)"]))
    return f"{event['seq']:>3}  {event['type']:<15} {event['state']:<11} {provider:<10} {note[:60]}"


# -- main -----------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> int:
    settings = get_settings()
    api_key = dev_api_key(dict(os.environ))
    supervisor = Supervisor(make_children(settings, args.log_dir, api_key))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, supervisor.stop.set)
    await preflight(settings)
    if supervisor.stop.is_set():
        return 0
    started = loop.time()
    try:
        await supervisor.start()
        print(f"run: waiting for both workers to be ready (up to {args.ready_timeout:.0f}s)...")
        if not await supervisor.race(supervisor.wait_ready(args.ready_timeout)):
            print("run: stopping", flush=True)
            return 0
        print(banner(settings, supervisor.children, api_key, loop.time() - started), flush=True)
        if args.demo:
            as_expected = await supervisor.race(run_demo(settings, args.demo_timeout))
            if as_expected is None:
                print("run: stopping", flush=True)
                return 0
            return 0 if as_expected else 1
        await supervisor.race(supervisor.stop.wait())
        print("run: stopping", flush=True)
        return 0
    except RunError as exc:
        print(f"run: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        await supervisor.shutdown()
        print("run: both workers stopped", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m streams.run", description=__doc__)
    parser.add_argument("--demo", action="store_true", help="submit demo jobs, print, then stop")
    parser.add_argument("--log-dir", type=Path, default=Path("var/logs"), help="worker logs")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, metavar="S")
    parser.add_argument("--demo-timeout", type=float, default=DEMO_TIMEOUT_S, metavar="S")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once, even in a pipe
    try:
        return asyncio.run(main_async(args))
    except RunError as exc:
        print(f"run: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
