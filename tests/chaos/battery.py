"""The faults of `make chaos`: one async function per fault, each returning a Row of what happened.

Each fault starts a stack of its own (its own topic prefix, app id, data dirs and API keys on the
broker; the broker fault starts a second broker of its own with scripts/kafka.sh, so the shared
one is never killed), sends jobs through cp.intake and POST /jobs (part of the POSTs while the
fault is on, re-sent the way a client would on 503 or a refused connection), applies the fault,
waits for every job to finish and reads back what Kafka committed (tests.support.checks). Then
every job's final response on cp.responses is compared with GET /jobs/{id}/result asked of every
live control-plane worker. Its topics are deleted afterwards.

Nothing here asserts: a row records what happened; `python -m tests.chaos` prints and records the
rows, tests/chaos/test_chaos.py asserts on a few of them.

HTTP answers are counted like this: a 503 or a refused connection while a fault is on (from the
fault until the workers all say ready again) is what a client is told to retry, and is only noted;
every other 5xx, at any time, counts in `http_5xx`; no answer at all with the stack up is an
anomaly. `anomalies` counts whatever else a fault must not cause (listed in the row's notes): jobs
without a terminal event or with one that disagrees with their final response, a (job_id, seq)
naming two events, changelog rows going back, final states the scripts cannot end in, a worker
that died, a poison record without exactly one dead letter, an attempt sent to two providers, an
HTTP bad input answered with the wrong status, a status read that went back (`ReadWatch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import time
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer

from domain.codec import encode
from domain.commands import CancelJob
from domain.ids import job_id_for
from domain.messages import FinalResponse, Output, ProviderResult
from tests.support.checks import (
    TERMINAL,
    Drain,
    Timelines,
    attempt_targets,
    drain,
    poll_until,
    read_to_end,
)
from tests.support.stack import Stack, TopicReader, new_stack, produce, to_json
from tests.support.workers import ROOT, Worker, free_port, wait_for

#: Each attempt sleeps this long (ms) on the simulated provider: many are in flight at a fault.
LATENCY_MS = (300, 800)
USAGE = {"input_tokens": 100, "output_tokens": 50}
#: Scripts that all end COMPLETED, with retries, fallbacks and duplicate answers mixed in.
SCRIPTS: list[dict[str, list[str]]] = [
    {"sim-cheap": ["ok"]},
    {"sim-cheap": ["ok"]},
    {"sim-cheap": ["rate_limited", "ok"]},
    {"sim-cheap": ["provider_internal"], "sim-fast": ["ok"]},
    {"sim-cheap": ["duplicate"]},
]
#: Final error codes a fault may leave: only attempts lost to it may use up a job's attempts.
ALLOWED_FAILURES = {"timeout"}
#: The zombie's session timeout (as in the paused-worker test) and the longest it stays paused.
SESSION_TIMEOUT_S = 6.0
PAUSE_MAX_S = 30.0
DRAIN_TIMEOUT_S = 180.0
HTTP_CONCURRENCY = 16
#: How long a client re-sends one POST /jobs (503, refused connection, 5xx) before giving up.
POST_PATIENCE_S = 120.0
#: The worker's CP_MAX_REQUEST_BYTES default: the HTTP fault sends a body just above it.
MAX_REQUEST_BYTES = 900_000


@dataclass(frozen=True)
class Sizes:
    """How much each fault is given."""

    jobs: int
    #: SIGKILL rounds of the control-plane worker, and pause rounds of the zombie.
    cp_kills: int
    zombie_rounds: int
    #: One job in `http_every` goes through POST /jobs, the others through cp.intake.
    http_every: int


QUICK = Sizes(jobs=30, cp_kills=2, zombie_rounds=1, http_every=3)
FULL = Sizes(jobs=300, cp_kills=3, zombie_rounds=2, http_every=5)


@dataclass
class Row:
    """What one fault did to its jobs; `failures()` says which figures break the promise."""

    fault: str
    #: A graceful restart must not cost an attempt its timeout.
    graceful: bool = False
    jobs: int = 0
    lost: int = 0
    double_finals: int = 0
    duplicate_dispatches: int = 0
    attempts_rerun: int = 0
    attempt_timeouts: int = 0
    #: Seconds from the (last) fault to the last job's final response; None when some never came.
    drain_s: float | None = None
    http_checked: int = 0
    http_5xx: int = 0
    http_mismatch: int = 0
    anomalies: int = 0
    seconds: float = 0.0
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def failures(self) -> list[str]:
        found = [f"error: {self.error}"] if self.error else []
        figures = {
            "lost": self.lost,
            "double_finals": self.double_finals,
            "http_5xx": self.http_5xx,
            "http_mismatch": self.http_mismatch,
            "anomalies": self.anomalies,
        }
        if self.graceful:
            figures["attempt_timeouts"] = self.attempt_timeouts
        found += [f"{name}={value}" for name, value in figures.items() if value]
        return found

    @property
    def ok(self) -> bool:
        return not self.failures()


def _quiet(line: str) -> None:
    del line


@dataclass
class Battery:
    """Where the faults run and how big they are."""

    bootstrap: str
    run_id: str
    root: Path
    sizes: Sizes
    say: Callable[[str], None] = _quiet


# -- one fault's stack -----------------------------------------------------------------------------


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _retry_after(value: str | None) -> float:
    try:
        return float(value) if value else 0.2
    except ValueError:
        return 0.2


class Run:
    """One fault's stack, tenant, jobs and counters; fills `row` as it goes."""

    def __init__(
        self,
        battery: Battery,
        row: Row,
        stack: Stack,
        events: TopicReader,
        http: aiohttp.ClientSession,
        keys: dict[str, str],
    ) -> None:
        self.battery = battery
        self.sizes = battery.sizes
        self.row = row
        self.stack = stack
        self.http = http
        #: tenant -> API key: the first tenant sends the jobs, the other one only probes.
        self.tenant, self.other_tenant = list(keys)
        self.key, self.other_key = keys[self.tenant], keys[self.other_tenant]
        self.timelines = Timelines(events, self.tenant)
        self.cps: list[Worker] = []
        self.providers: Worker | None = None
        self.gone: set[Worker] = set()
        self.paused: set[Worker] = set()
        self.jobs: set[str] = set()
        #: Jobs sent by POST /jobs, in order.
        self.via_http: list[str] = []
        self.unaccepted = 0
        self.faulty = False
        #: 503s and refused connections while the fault was on (retried, not counted).
        self.in_window: Counter[str] = Counter()
        #: Answers that count: 5xx outside that window, or none at all with the stack up.
        self.problems: Counter[str] = Counter()
        self.posts: list[asyncio.Task[None]] = []
        self._count = 0
        self._rng = random.Random(zlib.crc32(row.fault.encode()))
        self.slots = asyncio.Semaphore(HTTP_CONCURRENCY)

    # -- notes and counts

    def note(self, text: str) -> None:
        self.row.notes.append(text)

    def anomaly(self, count: int, text: str) -> None:
        if count:
            self.row.anomalies += count
            self.note(text)

    def http_answer(self, status: int, what: str) -> None:
        """Count one answer that is not a success (see the module's doc)."""
        if self.faulty and status in (0, 503):
            self.in_window[str(status or "no answer")] += 1
        elif status >= 500:
            self.row.http_5xx += 1
            self.problems[f"{what} {status}"] += 1
        elif status == 0:
            self.row.anomalies += 1
            self.problems[f"{what} no answer"] += 1

    # -- workers

    def workers(self) -> list[Worker]:
        alive = [*self.cps, *([self.providers] if self.providers else [])]
        return [w for w in alive if w not in self.gone]

    def live_urls(self) -> list[str]:
        return [w.url for w in self.cps if w.alive() and w not in self.gone | self.paused]

    async def start_cp(self, name: str, env: dict[str, str] | None = None) -> Worker:
        worker = await asyncio.to_thread(self.stack.start_cp, name, None, env)
        self.cps.append(worker)
        return worker

    async def start_providers(self) -> Worker:
        self.providers = await asyncio.to_thread(self.stack.start_providers)
        return self.providers

    async def kill(self, worker: Worker) -> None:
        await asyncio.to_thread(worker.kill)

    async def stop(self, worker: Worker) -> None:
        """SIGTERM; note how it ended (a stop that had to be SIGKILLed is not graceful)."""
        began = time.monotonic()
        code = await asyncio.to_thread(worker.stop, 30.0)
        took = time.monotonic() - began
        self.note(f"{worker.log_path.stem} SIGTERM: exit {code} in {took:.1f} s")
        self.anomaly(int(code == -signal.SIGKILL), f"{worker.log_path.stem} had to be SIGKILLed")

    async def restart(self, worker: Worker) -> None:
        """Start it again as it was: same data dir, app id and port."""
        await asyncio.to_thread(worker.start)
        await asyncio.to_thread(worker.wait_ready)

    def pause(self, worker: Worker) -> None:
        assert worker.process is not None
        os.kill(worker.process.pid, signal.SIGSTOP)
        self.paused.add(worker)

    def resume(self, worker: Worker) -> None:
        if worker in self.paused and worker.process is not None:
            os.kill(worker.process.pid, signal.SIGCONT)
        self.paused.discard(worker)

    async def supervise(self) -> None:
        """Restart any worker that died, as a supervisor would, and say so."""
        for worker in self.workers():
            if not worker.alive():
                assert worker.process is not None
                self.note(f"{worker.log_path.stem} exited ({worker.process.returncode}): restarted")
                await self.restart(worker)

    async def settle(self, timeout: float = 90.0) -> bool:
        """Wait until every live control-plane worker says ready three polls in a row."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        streak = 0
        while loop.time() < deadline:
            urls = self.live_urls()
            answers = [(await self.get(url + "/readyz"))[0] for url in urls]
            streak = streak + 1 if answers and all(s == 200 for s in answers) else 0
            if streak >= 3:
                return True
            await asyncio.sleep(0.2)
        self.note(f"workers not all ready after {timeout:.0f} s")
        return False

    def fault_on(self) -> float:
        self.faulty = True
        return time.monotonic()

    async def fault_off(self) -> None:
        await self.settle()
        self.faulty = False

    # -- jobs

    def request(self, *, http: bool) -> tuple[str, dict[str, Any]]:
        n = self._count
        self._count += 1
        rid = f"j{n}"
        body: dict[str, Any] = {
            "request_id": rid,
            "messages": [{"role": "user", "content": f"chaos question {n}"}],
            "preference": "cost",
            "simulate": {
                "outcomes": SCRIPTS[n % len(SCRIPTS)],
                "latency_ms": self._rng.randint(*LATENCY_MS),
                "usage": USAGE,
            },
        }
        if not http:
            body["tenant_id"] = self.tenant
        return job_id_for(self.tenant, rid), body

    async def send(
        self, count: int, *, hold_back: bool = True, http_every: int | None = None
    ) -> tuple[set[str], list[dict[str, Any]]]:
        """Send `count` jobs through cp.intake, one in `http_every` by POST /jobs instead.

        With `hold_back`, every other POST is returned unsent, to be posted while the fault is on.
        """
        every = http_every or self.sizes.http_every
        kafka: list[bytes] = []
        http: list[dict[str, Any]] = []
        new: set[str] = set()
        for _ in range(count):
            via_http = self._count % every == every - 1
            job_id, body = self.request(http=via_http)
            new.add(job_id)
            if via_http:
                http.append(body)
                self.via_http.append(job_id)
            else:
                kafka.append(to_json(body))
        self.jobs |= new
        await produce(self.stack.bootstrap, self.stack.topic("cp.intake"), kafka)
        now, later = (http[::2], http[1::2]) if hold_back else (http, [])
        await self.post(now)
        return new, later

    async def post(self, bodies: Sequence[dict[str, Any]]) -> None:
        await asyncio.gather(*(self._post(body) for body in bodies))

    def post_later(self, bodies: Sequence[dict[str, Any]]) -> None:
        """POST these now, in the background (while the fault goes on)."""
        if bodies:
            self.posts.append(asyncio.create_task(self.post(bodies)))

    async def _post(self, body: dict[str, Any]) -> None:
        """POST /jobs as a client would: re-send on 5xx or no answer until 202 or out of time."""
        data = orjson.dumps(body)
        headers = {**bearer(self.key), "Content-Type": "application/json"}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + POST_PATIENCE_S
        tries = 0
        async with self.slots:
            while True:
                urls = self.live_urls()
                status, wait = 0, 0.2
                if urls:
                    url = urls[tries % len(urls)]
                    try:
                        async with self.http.post(url + "/jobs", data=data, headers=headers) as r:
                            status, wait = r.status, _retry_after(r.headers.get("Retry-After"))
                            await r.read()
                    except (aiohttp.ClientError, OSError, TimeoutError):
                        status = 0
                tries += 1
                if status == 202:
                    return
                self.http_answer(status, "POST /jobs")
                if 0 < status < 500:
                    self.anomaly(1, f"POST /jobs answered {status} to a valid request")
                    return
                if loop.time() > deadline:
                    self.unaccepted += 1
                    return
                await asyncio.sleep(min(max(wait, 0.1), 2.0))  # the client's back-off

    def in_flight(self, among: set[str], since: str) -> int:
        """Jobs of `among` with a `since` event and no terminal event yet."""
        return len(among & self.timelines.jobs_with({since}) - self.timelines.jobs_with(TERMINAL))

    def at_least(
        self, among: set[str], since: str, count: int, *, finished_too: bool = False
    ) -> Callable[[], bool]:
        """A condition: `count` jobs of `among` had a `since` event (and are not finished yet,
        unless `finished_too`)."""

        def holds() -> bool:
            if finished_too:
                return len(among & self.timelines.jobs_with({since})) >= count
            return self.in_flight(among, since) >= count

        return holds

    async def wait(self, condition: Callable[[], bool], *, timeout: float, what: str) -> bool:
        """Read events until `condition` holds; note it (no error) when it never did."""
        held = await self.timelines.holds(condition, timeout=timeout)
        if not held:
            self.note(f"went on after {timeout:.0f} s without {what}")
        return held

    async def get(self, url: str, key: str | None = None) -> tuple[int, bytes]:
        try:
            async with self.http.get(url, headers=bearer(key or self.key)) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return 0, b""

    # -- the drain and what it found

    async def finish(self, since: float, *, timeout: float = DRAIN_TIMEOUT_S) -> Drain:
        """Wait for the background POSTs and every job; fill the row from Kafka and HTTP."""
        if self.posts:
            await asyncio.gather(*self.posts)
            self.posts.clear()
        drained = await drain(self.stack, self.tenant, self.jobs, self.timelines, timeout=timeout)
        self.record(drained, since)
        for worker in self.workers():
            if not worker.alive():
                assert worker.process is not None
                code = worker.process.returncode
                self.anomaly(1, f"{worker.log_path.stem} died (exit {code})")
        await self.check_http(drained)
        self.http_notes()
        return drained

    def record(self, drained: Drain, since: float) -> None:
        row = self.row
        row.jobs = len(self.jobs)
        row.lost = len(drained.lost)
        row.double_finals = len(drained.double_finals)
        row.duplicate_dispatches = drained.duplicate_dispatches
        row.attempts_rerun = drained.provider_reruns
        row.attempt_timeouts = drained.attempt_timeouts
        if drained.drained_at is not None:
            row.drain_s = round(drained.drained_at - since, 1)
        firsts = [records[0] for job, records in drained.finals.items() if job in self.jobs]
        outcomes = Counter(
            r["state"]
            if r["state"] == "COMPLETED"
            else f"{r['state']}/{(r['error'] or {}).get('code')}"
            for r in firsts
        )
        self.note(", ".join(f"{state} {n}" for state, n in sorted(outcomes.items())))
        unexpected = sum(
            1
            for r in firsts
            if r["state"] != "COMPLETED"
            and (r["state"] != "FAILED" or (r["error"] or {}).get("code") not in ALLOWED_FAILURES)
        )
        no_terminal = sum(1 for kinds in drained.not_one_terminal.values() if not kinds)
        self.anomaly(unexpected, f"{unexpected} jobs ended in a state their script cannot give")
        self.anomaly(
            len(drained.unknown), f"{len(drained.unknown)} final responses of unknown jobs"
        )
        self.anomaly(no_terminal, f"{no_terminal} finished jobs without a terminal event")
        mismatch = len(drained.terminal_mismatch)
        self.anomaly(mismatch, f"{mismatch} terminal events disagree with the final response")
        conflicting = len(drained.conflicting)
        self.anomaly(conflicting, f"{conflicting} (job_id, seq) name two different events")
        back = len(drained.going_back)
        self.anomaly(back, f"{back} jobs with a changelog row older than the one before")
        republished = sum(len(r) - 1 for r in drained.finals.values())
        if republished:
            self.note(f"{republished} final responses republished (same content)")
        answered = len(drained.timed_out & drained.answered_late)
        if answered:
            self.note(f"{answered} timed-out attempts answered late")
        if self.unaccepted:
            self.anomaly(self.unaccepted, f"{self.unaccepted} POSTs never got a 202")

    async def check_http(self, drained: Drain) -> None:
        """GET every finished job's result from every live control-plane worker."""
        await self.settle()
        finals = {
            job: [FinalResponse.model_validate(r) for r in records]
            for job, records in drained.finals.items()
            if job in self.jobs
        }
        differing: list[str] = []

        async def check(url: str, job_id: str) -> None:
            async with self.slots:
                status, body = await self.get(f"{url}/jobs/{job_id}/result")
            self.row.http_checked += 1
            self.http_answer(status, "GET /jobs/{id}/result")
            same = False
            if status == 200:
                with contextlib.suppress(ValueError):
                    same = FinalResponse.model_validate_json(body) in finals[job_id]
            if not same:
                self.row.http_mismatch += 1
                differing.append(f"{job_id} {status}")

        await asyncio.gather(*(check(url, job) for url in self.live_urls() for job in finals))
        if differing:
            self.note("GET result differs from cp.responses: " + ", ".join(differing[:3]))

    def http_notes(self) -> None:
        if self.in_window:
            seen = ", ".join(f"{what} x{n}" for what, n in sorted(self.in_window.items()))
            self.note(f"HTTP while the fault was on (retried): {seen}")
        if self.problems:
            seen = ", ".join(f"{what} x{n}" for what, n in sorted(self.problems.items()))
            self.note(f"HTTP answers that count: {seen}")


@asynccontextmanager
async def running(
    battery: Battery,
    name: str,
    *,
    cps: int = 1,
    env: dict[str, str] | None = None,
    bootstrap: str | None = None,
    graceful: bool = False,
    read_ports: bool = False,
) -> AsyncIterator[Run]:
    """A stack of the fault's own (cps control-plane workers, one provider worker), torn down
    and its topics deleted afterwards; with `read_ports`, each control-plane worker has a read
    port of its own (`CP_READ_PORT`) and its reader processes."""
    row = Row(fault=name, graceful=graceful)
    tag = uuid.uuid4().hex[:8]
    keys = {f"chaos-{name}-{tag}": f"key-{uuid.uuid4().hex}", f"other-{tag}": "other-key-" + tag}
    stack = await asyncio.to_thread(
        new_stack, bootstrap or battery.bootstrap, battery.run_id, name, battery.root / name
    )
    stack.env["CP_API_KEYS"] = ",".join(f"{key}={tenant}" for tenant, key in keys.items())
    stack.env.update(env or {})
    run: Run | None = None
    try:
        async with (
            TopicReader(stack.bootstrap, stack.topic("cp.events")) as events,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as http,
        ):
            run = Run(battery, row, stack, events, http, keys)
            await run.start_providers()
            for n in range(cps):
                read = {"CP_READ_PORT": str(free_port())} if read_ports else {}
                await run.start_cp(f"cp-{n + 1}", read)
            await run.settle()
            try:
                yield run
            finally:
                for task in run.posts:
                    task.cancel()
                for worker in list(run.paused):
                    run.resume(worker)
    finally:
        await asyncio.to_thread(stack.stop)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(stack.delete_topics(), 30)


# -- the faults ------------------------------------------------------------------------------------


async def _restarts(
    battery: Battery, name: str, *, target: str, graceful: bool, rounds: int
) -> Row:
    """Send a wave, wait until many of it are in flight, kill (or SIGTERM) the target worker
    and start it again; `rounds` times; then drain."""
    async with running(battery, name, graceful=graceful) as run:
        worker = run.cps[0] if target == "cp" else run.providers
        if worker is None:
            raise RuntimeError(f"no {target} worker to restart")
        since_event = "dispatched" if target == "cp" else "started"
        per_round = max(battery.sizes.jobs // rounds, 1)
        faulted_at = time.monotonic()
        in_flight: list[int] = []
        for _ in range(rounds):
            wave, later = await run.send(per_round)
            enough = max(per_round // 4, 1)
            await run.wait(
                run.at_least(wave, since_event, enough),
                timeout=60,
                what=f"{enough} jobs {since_event} and not finished",
            )
            in_flight.append(run.in_flight(wave, since_event))
            faulted_at = run.fault_on()
            if graceful:
                await run.stop(worker)
            else:
                await run.kill(worker)
            run.post_later(later)
            await run.restart(worker)
            await run.fault_off()
        run.note(f"in flight at each {'SIGTERM' if graceful else 'SIGKILL'}: {in_flight}")
        await run.finish(faulted_at)
    return run.row


async def cp_sigkill(battery: Battery) -> Row:
    """SIGKILL the control-plane worker with jobs in flight, restart it; several rounds."""
    return await _restarts(
        battery, "cp-sigkill", target="cp", graceful=False, rounds=battery.sizes.cp_kills
    )


async def cp_graceful(battery: Battery) -> Row:
    """SIGTERM the control-plane worker with jobs in flight, start it again."""
    return await _restarts(battery, "cp-graceful", target="cp", graceful=True, rounds=1)


async def provider_sigkill(battery: Battery) -> Row:
    """SIGKILL the provider worker with calls in flight, restart it."""
    return await _restarts(
        battery, "provider-sigkill", target="providers", graceful=False, rounds=1
    )


async def provider_graceful(battery: Battery) -> Row:
    """SIGTERM the provider worker with calls in flight, start it again."""
    return await _restarts(
        battery, "provider-graceful", target="providers", graceful=True, rounds=1
    )


def _free_port_pair() -> int:
    """A free port whose next port is free too (the broker's controller listens there)."""
    for _ in range(100):
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as sock:
            sock.bind(("127.0.0.1", port + 1))
            return port
    raise RuntimeError("no two free consecutive ports")


class SecondBroker:
    """A broker of the battery's own, run by scripts/kafka.sh on free ports with its state (data,
    log, pid file) under `var`: killing it never touches the shared broker."""

    def __init__(self, var: Path) -> None:
        self.var = var
        self.port = _free_port_pair()
        self.env = {
            **os.environ,
            "KAFKA_PORT": str(self.port),
            "KAFKA_CONTROLLER_PORT": str(self.port + 1),
            "CP_VAR_DIR": str(var),
        }

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def script(self, command: str) -> None:
        subprocess.run(
            [str(ROOT / "scripts" / "kafka.sh"), command],
            env=self.env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=180,
        )

    def pid(self) -> int | None:
        try:
            return int((self.var / f"kafka-{self.port}" / "broker.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL the broker's pid (from the script's pid file); wait until it is gone."""
        pid = self.pid()
        if pid is None:
            raise RuntimeError("the second broker has no pid file")
        os.kill(pid, signal.SIGKILL)

        # Until init reaps it, a killed pid still answers `kill -0`: kafka.sh would call it up.
        wait_for(
            lambda: not Path(f"/proc/{pid}").exists(), timeout=30, what=f"broker pid {pid} reaped"
        )


async def broker_sigkill(battery: Battery) -> Row:
    """SIGKILL the broker with jobs in flight and start it again (a second broker of our own)."""
    broker = SecondBroker(battery.root / "broker-var")
    await asyncio.to_thread(broker.script, "up")
    try:
        async with running(battery, "broker-sigkill", bootstrap=broker.bootstrap) as run:
            wave, later = await run.send(battery.sizes.jobs)
            enough = max(battery.sizes.jobs // 4, 1)
            await run.wait(
                lambda: run.in_flight(wave, "dispatched") >= enough,
                timeout=60,
                what=f"{enough} jobs dispatched and not finished",
            )
            run.note(f"in flight at the kill: {run.in_flight(wave, 'dispatched')}")
            faulted_at = run.fault_on()
            await asyncio.to_thread(broker.kill)
            run.post_later(later)
            await asyncio.to_thread(broker.script, "up")
            run.note(f"broker back after {time.monotonic() - faulted_at:.1f} s")
            await run.supervise()
            await run.fault_off()
            await run.supervise()
            await run.finish(faulted_at)
        return run.row
    finally:
        await asyncio.to_thread(broker.script, "down")


async def zombie(battery: Battery) -> Row:
    """Two control-plane workers; SIGSTOP one past its session timeout, then SIGCONT it."""
    return await _zombie(battery, "zombie", reads=False)


async def zombie_reads(battery: Battery) -> Row:
    """The zombie, with a read port on each worker, polled throughout: while a worker is paused
    its reader processes run on, and must not answer for jobs that moved on elsewhere."""
    return await _zombie(battery, "zombie-reads", reads=True)


async def _zombie(battery: Battery, name: str, *, reads: bool) -> Row:
    env = {
        "CP_BROKER_SESSION_TIMEOUT_S": str(SESSION_TIMEOUT_S),
        "CP_BROKER_HEARTBEAT_INTERVAL_S": "1.0",
    }
    async with running(battery, name, cps=2, env=env, read_ports=reads) as run:
        watch = ReadWatch(run) if reads else None
        try:
            return await _pause_rounds(run, watch)
        finally:
            if watch is not None:
                watch.close()


async def _pause_rounds(run: Run, watch: ReadWatch | None) -> Row:
    battery = run.battery
    rounds = battery.sizes.zombie_rounds
    per_round = max(battery.sizes.jobs // rounds, 1)
    faulted_at = time.monotonic()
    paused: list[str] = []
    for n in range(rounds):
        victim = run.cps[(n + 1) % 2]
        wave, later = await run.send(per_round)
        third = max(per_round // 3, 1)
        await run.wait(
            run.at_least(wave, "dispatched", third, finished_too=True),
            timeout=60,
            what="a third of the wave dispatched",
        )
        pending = wave & run.timelines.jobs_with({"dispatched"}) - run.timelines.jobs_with(TERMINAL)
        faulted_at = run.fault_on()

        def taken_over(faulted_at: float = faulted_at, pending: set[str] = pending) -> bool:
            """Past the session timeout, and every job in flight at the pause finished:
            the paused worker's share of them only finishes once another took it over."""
            elapsed = time.monotonic() - faulted_at
            return elapsed >= SESSION_TIMEOUT_S + 2 and pending <= run.timelines.jobs_with(TERMINAL)

        if watch is not None:
            watch.focus = pending
        run.pause(victim)
        try:
            run.post_later(later)
            await run.wait(taken_over, timeout=PAUSE_MAX_S, what="the others taking over")
        finally:
            run.resume(victim)
        paused.append(f"{victim.log_path.stem} {time.monotonic() - faulted_at:.0f} s")
        run.note(f"round {n + 1}: {len(pending)} in flight")
        await asyncio.to_thread(victim.wait_ready)
        await run.fault_off()
    run.note("paused: " + ", ".join(paused))
    if watch is not None:
        await watch.until_finished()
    await run.finish(faulted_at)
    if watch is not None:
        watch.report()
    targets = await attempt_targets(run.stack.bootstrap, run.stack.topic, run.tenant)
    two = sum(1 for n in targets.values() if n > 1)
    run.anomaly(two, f"{two} attempts dispatched to two targets")
    return run.row


#: Readers of the status of jobs while a fault runs, and how long one waits for an answer.
READ_WATCHERS = 16
READ_TIMEOUT_S = 1.0
#: Each reader's pause between requests: a few hundred reads a second in all, beside the fault.
READ_PAUSE_S = 0.02


def _read_rank(body: bytes) -> tuple[datetime, int, int] | None:
    """How far along a status body is: its last step's time, attempts and states reached."""
    try:
        status = orjson.loads(body)
        updated = datetime.fromisoformat(status["updated_at"])
        return updated, len(status["attempts"]), len(status["transitions"])
    except (ValueError, KeyError, TypeError):
        return None


class ReadWatch:
    """GET /jobs/{id} of the run's jobs from every control-plane worker's read port and web port,
    by READ_WATCHERS clients, until stopped. They read the jobs of `focus` when it is set (the
    jobs in flight when a worker was paused), else any job of the run.

    An answer goes back when it shows a job less far along than an answer received before its
    request was sent. It is an anomaly when that newer answer was committed (the job has an
    event of that step on cp.events): a worker answered from what it held after another moved
    the job on. When it was never committed (a step applied, read, then undone by the fault: the
    README's "not promised"), it is noted. How the other answers came (served by a reader,
    relayed with `Via`, refused, none within READ_TIMEOUT_S) is noted.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.urls: list[tuple[str, str]] = []
        for worker in run.cps:
            name = worker.log_path.stem
            self.urls.append((f"{name} web", worker.url))
            read_port = worker.env.get("CP_READ_PORT")
            if read_port:
                self.urls.append((f"{name} read", f"http://127.0.0.1:{read_port}"))
        self.seen: dict[str, tuple[datetime, int, int]] = {}
        self.focus: set[str] = set()
        self.answers: Counter[str] = Counter()
        #: (job, where, the newer answer's rank) of each answer that went back.
        self.back: list[tuple[str, str, tuple[datetime, int, int]]] = []
        self.timeout = aiohttp.ClientTimeout(total=READ_TIMEOUT_S)
        self._rng = random.Random(7)
        self._stop = asyncio.Event()
        self.tasks = [asyncio.create_task(self._watch()) for _ in range(READ_WATCHERS)]

    async def _watch(self) -> None:
        while not self._stop.is_set():
            jobs = sorted(self.focus or self.run.jobs)
            if not jobs:
                await asyncio.sleep(0.05)
                continue
            job_id = self._rng.choice(jobs)
            where, url = self._rng.choice(self.urls)
            floor = self.seen.get(job_id)
            status, via, body = 0, False, b""
            try:
                async with self.run.http.get(
                    f"{url}/jobs/{job_id}", headers=bearer(self.run.key), timeout=self.timeout
                ) as response:
                    status, via = response.status, "Via" in response.headers
                    body = await response.read()
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(READ_PAUSE_S)
            how = "no answer" if status == 0 else f"{status}{' relayed' if via else ''}"
            self.answers[f"{where} {how}"] += 1
            rank = _read_rank(body) if status == 200 else None
            if rank is None:
                continue
            if floor is not None and rank < floor:
                self.back.append((job_id, f"{where}{' relayed' if via else ''}", floor))
            current = self.seen.get(job_id)
            if current is None or rank > current:
                self.seen[job_id] = rank

    async def until_finished(self) -> None:
        """Go on until every job has a terminal event (at most the drain's timeout), then stop."""
        run = self.run
        await run.timelines.holds(
            lambda: run.jobs <= run.timelines.jobs_with(TERMINAL), timeout=DRAIN_TIMEOUT_S
        )
        self._stop.set()
        await asyncio.gather(*self.tasks)

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()

    def report(self) -> None:
        """After the drain: note the answers, count the reads that went back behind a commit."""
        answered = ", ".join(f"{what} x{n}" for what, n in sorted(self.answers.items()))
        self.run.note(f"status reads: {answered}")
        timelines = self.run.timelines
        timelines.refresh()
        behind: list[str] = []
        undone: list[str] = []
        for job_id, where, newer in self.back:
            committed = {datetime.fromisoformat(e["at"]) for e in timelines.by_job[job_id].values()}
            (behind if newer[0] in committed else undone).append(f"{job_id} from {where}")
        self.run.anomaly(
            len(behind),
            f"{len(behind)} status reads went back behind a committed step: "
            + ", ".join(behind[:3]),
        )
        if undone:
            self.run.note(
                f"{len(undone)} status reads went back from a step the fault undid (applied, "
                "read, never committed): " + ", ".join(undone[:3])
            )


async def failover_after_local_crash(battery: Battery) -> Row:
    """Crash worker A after steps, restart A, then stop A for good: B restores from the changelog.

    A runs alone; it is SIGKILLed with jobs in flight and restarted on its own local state; it
    takes more steps; B (a fresh data dir) joins and A is stopped for good, so B ends up rebuilding
    every partition from the changelog alone. Nothing may be lost or done twice.
    """
    async with running(battery, "failover") as run:
        a = run.cps[0]
        half = max(battery.sizes.jobs // 2, 1)
        first, later = await run.send(half)
        enough = max(half // 4, 1)
        await run.wait(
            lambda: run.in_flight(first, "dispatched") >= enough,
            timeout=60,
            what=f"{enough} jobs dispatched and not finished",
        )
        run.note(f"in flight at A's SIGKILL: {run.in_flight(first, 'dispatched')}")
        faulted_at = run.fault_on()
        await run.kill(a)
        run.post_later(later)
        await run.restart(a)
        await run.fault_off()
        second, later = await run.send(battery.sizes.jobs - half)
        await run.wait(
            lambda: run.in_flight(second, "dispatched") >= enough,
            timeout=60,
            what="A taking steps after its restart",
        )
        run.fault_on()  # B joining and A leaving move partitions: 503s are expected meanwhile
        await run.start_cp("cp-2")
        run.post_later(later)
        await run.settle()
        run.note(f"in flight when A stopped for good: {run.in_flight(run.jobs, 'dispatched')}")
        await run.stop(a)
        run.gone.add(a)
        await run.fault_off()
        await run.finish(faulted_at)
    return run.row


# -- poison records --------------------------------------------------------------------------------


def poison(kind: str) -> dict[str, bytes | None]:
    """name -> record value, for one kind of input topic."""
    records: dict[str, bytes | None] = {
        "garbage": b"\x00\xff\xfe{not json at all",
        "truncated": b'{"request_id": "x", "messages": [',
        "wrong-schema": b'{"hello": 1}',
        "wrong-types": b'{"request_id": 5, "messages": "hi", "type": ["job"], "kind": 7}',
        "not-an-object": b"[1, 2, 3]",
        "null": None,
    }
    if kind in ("intake", "results", "dispatch"):
        records["oversize"] = b'{"pad": "' + b"x" * (MAX_REQUEST_BYTES + 50_000) + b'"}'
    return records


async def send_records(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes | None]]
) -> list[tuple[int, int]]:
    """Produce (key, value) records in order; return each one's (partition, offset)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_request_size=2 * 1024 * 1024
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, key=key, value=value) for key, value in records]
        return [(meta.partition, meta.offset) for meta in [await f for f in futures]]
    finally:
        await producer.stop()


async def poison_records(battery: Battery) -> Row:
    """Poison on every input topic (cp.intake, cp.results, cp.commands and a provider's dispatch
    topic), between real jobs and on their partitions: each poison record must become exactly one
    dead letter on cp.dlq, and every real job must still finish."""
    async with running(battery, "poison") as run:
        began = time.monotonic()
        topics = {
            "intake": "cp.intake",
            "results": "cp.results",
            "commands": "cp.commands",
            "dispatch": "cp.dispatch.sim-cheap",
        }
        chunk = max(battery.sizes.jobs // (len(topics) + 1), 1)
        #: (topic, partition, offset) of each decode-level poison record, and unknown-job keys.
        positions: dict[tuple[str, int, int], str] = {}
        unknown: dict[str, str] = {}
        for kind, logical in topics.items():
            wave, _ = await run.send(chunk, hold_back=False)
            keys = sorted(wave)
            records = poison(kind)
            batch = [
                (keys[i % len(keys)].encode(), value) for i, value in enumerate(records.values())
            ]
            real = run.stack.topic(logical)
            if kind in ("results", "commands"):
                ghost = "job_chaosghost" + uuid.uuid4().hex[:12]
                now = datetime.now(UTC)
                value = (
                    encode(
                        ProviderResult(
                            type="completed",
                            event_id=f"{ghost}:{ghost}-a1:completed",
                            job_id=ghost,
                            attempt_id=f"{ghost}-a1",
                            provider="sim-cheap",
                            model="sim-cheap-1",
                            occurred_at=now,
                            output=Output(text="nobody asked"),
                        )
                    )
                    if kind == "results"
                    else encode(
                        CancelJob(
                            command_id=f"chaos:{ghost}",
                            job_id=ghost,
                            at=now,
                            tenant_id=run.tenant,
                            reason="chaos",
                        )
                    )
                )
                batch.append((ghost.encode(), value))
                unknown[ghost] = f"{kind}/unknown-job"
            sent = await send_records(run.stack.bootstrap, real, batch)
            for name, (partition, offset) in zip(records, sent, strict=False):
                positions[(real, partition, offset)] = f"{kind}/{name}"
        await run.send(battery.sizes.jobs - chunk * len(topics), hold_back=False)

        def letters_of(dlq: TopicReader) -> tuple[Counter[str], Counter[str]]:
            found: Counter[str] = Counter()
            reasons: Counter[str] = Counter()
            for letter in dlq.values():
                partition, offset = letter.get("partition"), letter.get("offset")
                name = None
                if isinstance(partition, int) and isinstance(offset, int):
                    name = positions.get((str(letter.get("topic")), partition, offset))
                if name is None and letter.get("reason") == "unknown_job":
                    name = unknown.get(str(letter.get("key")))
                if name is not None:
                    found[name] += 1
                    reasons[str(letter.get("reason"))] += 1
            return found, reasons

        expected = set(positions.values()) | set(unknown.values())
        async with TopicReader(run.stack.bootstrap, run.stack.topic("cp.dlq")) as dlq:
            await poll_until(dlq, lambda: set(letters_of(dlq)[0]) >= expected, timeout=90)
            await read_to_end(dlq)
            found, reasons = letters_of(dlq)
        missing = sorted(expected - set(found))
        doubled = sorted(name for name, n in found.items() if n > 1)
        run.note(
            f"dead letters {len(set(found))}/{len(expected)} ("
            + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
            + ")"
        )
        run.anomaly(len(missing), f"poison without a dead letter: {', '.join(missing)}")
        run.anomaly(len(doubled), f"poison dead-lettered twice: {', '.join(doubled)}")
        await run.finish(began)
    return run.row


# -- HTTP bad inputs -------------------------------------------------------------------------------

INVALID = frozenset({400, 422})
TOO_BIG = frozenset({400, 413, 422})


@dataclass(frozen=True)
class Case:
    """One bad HTTP request, as raw bytes, and the statuses a correct server may answer."""

    name: str
    request: bytes
    expect: frozenset[int]
    #: The job a 202 creates (a valid request with odd headers must be served).
    creates: str | None = None


def raw(
    method: str,
    path: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes | None = None,
    *,
    length: bool = True,
) -> bytes:
    lines = [
        method.encode() + b" " + path + b" HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Connection: close",
        *(name + b": " + value for name, value in headers),
    ]
    if body is not None and length:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


async def exchange(url: str, request: bytes, timeout: float = 20.0) -> int:
    """Send raw bytes to the worker at `url`; return the answer's status (0: no answer)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
    except (OSError, TimeoutError):
        return 0
    try:
        with contextlib.suppress(OSError):  # it may answer (413) and close before the body ends
            writer.write(request)
            await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readline(), timeout)
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(reader.read(), timeout)
        except (OSError, TimeoutError):
            return 0
        parts = line.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def bad_inputs(run: Run, theirs: Sequence[str]) -> list[Case]:
    """Bad requests of every kind; `theirs` are job ids of the run's tenant, probed by another."""
    auth = (b"Authorization", f"Bearer {run.key}".encode())
    json_type = (b"Content-Type", b"application/json")
    other = (b"Authorization", f"Bearer {run.other_key}".encode())

    def post(body: bytes, *headers: tuple[bytes, bytes], length: bool = True) -> bytes:
        return raw("POST", b"/jobs", headers or (auth, json_type), body, length=length)

    def job(rid: str, extra: bytes = b"") -> bytes:
        return (
            b'{"request_id":"' + rid.encode() + b'","messages":[{"role":"user","content":"q"}],'
            b'"simulate":{"outcomes":{"sim-cheap":["ok"]},"latency_ms":5}' + extra + b"}"
        )

    def valid(rid: str) -> str:
        return job_id_for(run.tenant, rid)

    cases = [
        Case("json-malformed", post(b'{"request_id": "m1", "messages": ['), INVALID),
        Case("json-trailing-garbage", post(job("m2") + b" trailing"), INVALID),
        Case("json-empty-body", post(b""), INVALID),
        Case("json-array", post(b"[1, 2, 3]"), INVALID),
        Case("json-null", post(b"null"), INVALID),
        Case("json-utf16", post(job("m3").decode().encode("utf-16")), INVALID),
        Case("deep-body-10000", post(b"[" * 10_000 + b"]" * 10_000), INVALID),
    ]
    for depth in (300, 1000, 10_000):
        arrays = b"[" * depth + b"]" * depth
        objects = b'{"a":' * depth + b"1" + b"}" * depth
        cases += [
            Case(
                f"deep-metadata-{depth}",
                post(job(f"d{depth}", b',"metadata":{"x":' + arrays + b"}")),
                TOO_BIG,
            ),
            Case(
                f"deep-metadata-objects-{depth}",
                post(job(f"o{depth}", b',"metadata":' + objects)),
                TOO_BIG,
            ),
        ]
    numbers = {
        "max-output-tokens-1e400": b',"max_output_tokens":1e400',
        "max-output-tokens-2^64": b',"max_output_tokens":18446744073709551616',
        "deadline-10^400": b',"deadline_ms":1' + b"0" * 400,
        "temperature--1e400": b',"temperature":-1e400',
        "metadata-10^400": b',"metadata":{"n":1' + b"0" * 400 + b"}",
        "metadata-2^63": b',"metadata":{"n":9223372036854775808}',
        "deadline-5e-400": b',"deadline_ms":5e-400',
    }
    cases += [
        Case(f"number-{name}", post(job(f"n{i}", fragment)), INVALID)
        for i, (name, fragment) in enumerate(numbers.items())
    ]
    cases += [
        Case("utf8-request-id", post(job("u1").replace(b'"u1"', b'"u1\xff\xfe"')), INVALID),
        Case("utf8-content", post(job("u2").replace(b'"q"', b'"q\xc3\x28"')), INVALID),
        Case("utf8-metadata-key", post(job("u3", b',"metadata":{"\xff\xfe":1}')), INVALID),
        Case(
            "utf8-lone-surrogate",
            post(job("u4").replace(b'"q"', b'"q\\ud800"')),
            INVALID | {202},
            creates=valid("u4"),
        ),
    ]
    types = {
        "request-id-int": b'{"request_id":5,"messages":[{"role":"user","content":"q"}]}',
        "messages-string": b'{"request_id":"t1","messages":"hi"}',
        "messages-empty": b'{"request_id":"t2","messages":[]}',
        "role-int": b'{"request_id":"t3","messages":[{"role":5,"content":"q"}]}',
        "content-null": b'{"request_id":"t4","messages":[{"role":"user","content":null}]}',
        "preference-list": job("t5", b',"preference":["cost"]'),
        "simulate-string": b'{"request_id":"t6","messages":[{"role":"user","content":"q"}],'
        b'"simulate":"x"}',
        "metadata-list": job("t7", b',"metadata":[]'),
        "deadline-string": job("t8", b',"deadline_ms":"soon"'),
        "max-output-tokens-float": job("t9", b',"max_output_tokens":1.5'),
        "temperature-string": job("t10", b',"temperature":"hot"'),
        "schema-version-2": job("t11", b',"schema_version":2'),
        "type-cancel": job("t12", b',"type":"cancel"'),
        "other-tenant-id": job("t13", b',"tenant_id":"' + run.other_tenant.encode() + b'"'),
    }
    cases += [Case(f"type-{name}", post(body), INVALID) for name, body in types.items()]
    over = b'{"request_id":"big","messages":[{"role":"user","content":"' + b"x" * MAX_REQUEST_BYTES
    over += b'"}]}'
    chunked = b"%x\r\n" % len(over) + over + b"\r\n0\r\n\r\n"
    te = (b"Transfer-Encoding", b"chunked")
    cases += [
        Case("oversize-body", post(over), frozenset({413})),
        Case(
            "oversize-chunked", post(chunked, auth, json_type, te, length=False), frozenset({413})
        ),
        Case(
            "oversize-length-claimed",
            post(job("c1"), auth, json_type, (b"Content-Length", b"1000000000"), length=False),
            TOO_BIG,
        ),
    ]
    unauthorized = frozenset({400, 401})
    cases += [
        Case(
            "auth-bytes",
            post(job("a1"), (b"Authorization", b"Bearer \xff\xfe"), json_type),
            unauthorized,
        ),
        Case(
            "auth-utf8",
            post(job("a2"), (b"Authorization", "Bearer ключ".encode()), json_type),
            unauthorized,
        ),
        Case(
            "auth-no-scheme",
            post(job("a3"), (b"Authorization", run.key.encode()), json_type),
            unauthorized,
        ),
        Case(
            "auth-other-scheme",
            post(job("a4"), (b"Authorization", b"Token " + run.key.encode()), json_type),
            unauthorized,
        ),
        Case("auth-missing", post(job("a5"), json_type), unauthorized),
        Case(
            "auth-huge",
            post(job("a6"), (b"Authorization", b"Bearer " + b"k" * 7000), json_type),
            unauthorized | {431},
        ),
        Case(
            "content-type-text",
            post(job("h1"), auth, (b"Content-Type", b"text/plain")),
            frozenset({415}),
        ),
        Case("content-type-missing", post(job("h2"), auth), frozenset({415})),
        Case(
            "content-type-bytes",
            post(job("h3"), auth, (b"Content-Type", b"application/json\xff")),
            frozenset({400, 415}),
        ),
        Case(
            "header-huge",
            post(job("h4"), auth, json_type, (b"X-Big", b"a" * 20_000)),
            frozenset({400, 431}),
        ),
        Case(
            "header-nul", post(job("h5"), auth, json_type, (b"X-Odd", b"a\x00b")), frozenset({400})
        ),
        Case(
            "header-no-colon",
            post(job("h6"), auth, json_type, (b"X-Marker", b"1")).replace(
                b"X-Marker: 1", b"NoColon"
            ),
            frozenset({400}),
        ),
        Case(
            "content-length-negative",
            post(job("h7"), auth, json_type, (b"Content-Length", b"-1"), length=False),
            frozenset({400}),
        ),
        Case(
            "content-length-huge",
            post(job("h8"), auth, json_type, (b"Content-Length", b"9" * 30), length=False),
            frozenset({400, 413}),
        ),
        Case(
            "content-length-twice",
            post(
                job("h9"),
                auth,
                json_type,
                (b"Content-Length", b"5"),
                (b"Content-Length", b"7"),
                length=False,
            ),
            frozenset({400}),
        ),
        Case(
            "chunked-bad",
            post(b"zz\r\nabc\r\n0\r\n\r\n", auth, json_type, te, length=False),
            frozenset({400}),
        ),
        Case(
            "content-type-charset",
            post(job("ok1"), auth, (b"Content-Type", b"application/json; charset=utf-8")),
            frozenset({202}),
            creates=valid("ok1"),
        ),
        Case(
            "traceparent-garbage",
            post(job("ok2"), auth, json_type, (b"traceparent", b"garbage-\xff")),
            frozenset({202}),
            creates=valid("ok2"),
        ),
        Case(
            "tracestate-huge",
            post(job("ok3"), auth, json_type, (b"tracestate", b"k=" + b"v" * 6000)),
            frozenset({202}),
            creates=valid("ok3"),
        ),
    ]
    mine = theirs[0] if theirs else valid("none")
    for n, job_id in enumerate(theirs[:3]):
        path = f"/jobs/{job_id}".encode()
        cases += [
            # The same job read by its own tenant: it is there, so the 404s below are a guard.
            Case(f"own-tenant-status-{n}", raw("GET", path, [auth]), frozenset({200})),
            Case(f"other-tenant-status-{n}", raw("GET", path, [other]), frozenset({404})),
            Case(
                f"other-tenant-result-{n}", raw("GET", path + b"/result", [other]), frozenset({404})
            ),
            Case(
                f"other-tenant-events-{n}", raw("GET", path + b"/events", [other]), frozenset({404})
            ),
            Case(
                f"other-tenant-timeline-{n}",
                raw("GET", path + b"/timeline", [other]),
                frozenset({404}),
            ),
            Case(
                # A key in the URL is never read: no header is no credentials.
                f"other-tenant-timeline-query-key-{n}",
                raw("GET", path + b"/timeline?key=" + run.other_key.encode(), []),
                frozenset({401}),
            ),
            Case(
                f"other-tenant-cancel-{n}",
                raw("POST", path + b"/cancel", [other]),
                frozenset({404, 409}),
            ),
        ]
    own = f"/jobs/{mine}".encode()
    cases += [
        Case("id-percent-ff", raw("GET", b"/jobs/%FF%FE/result", [auth]), frozenset({400, 404})),
        Case("id-raw-bytes", raw("GET", b"/jobs/\xff\xfe/result", [auth]), frozenset({400, 404})),
        Case(
            "id-long",
            raw("GET", b"/jobs/" + b"x" * 5000 + b"/result", [auth]),
            frozenset({400, 404, 414}),
        ),
        Case(
            "id-dotdot",
            raw("GET", b"/jobs/..%2F..%2Fmetrics/result", [auth]),
            frozenset({400, 404}),
        ),
        Case("wait-nan", raw("GET", own + b"/result?wait=nan", [auth]), INVALID),
        Case("wait-1e400", raw("GET", own + b"/result?wait=1e400", [auth]), INVALID),
        Case("wait-negative", raw("GET", own + b"/result?wait=-1", [auth]), INVALID),
        Case("after-1e400", raw("GET", own + b"/events?after=1e400", [auth]), INVALID),
        Case(
            "after-10^400",
            raw("GET", own + b"/events?after=1" + b"0" * 400, [auth]),
            INVALID | {200},
        ),
        Case("method-put", raw("PUT", b"/jobs", [auth, json_type], job("p1")), frozenset({405})),
        Case("method-delete", raw("DELETE", own, [auth]), frozenset({405})),
    ]
    return cases


async def http_bad_inputs(battery: Battery) -> Row:
    """Malformed and deep JSON, huge numbers, invalid UTF-8, odd headers, wrong types, oversize
    bodies and other tenants' job ids, to both control-plane workers, among valid jobs: no 5xx,
    each answered with a status that says what was wrong, every valid job served."""
    async with running(battery, "http-bad-inputs", cps=2) as run:
        began = time.monotonic()
        wave, _ = await run.send(battery.sizes.jobs, hold_back=False, http_every=2)
        theirs = [job for job in run.via_http if job in wave] or sorted(wave)
        cases = bad_inputs(run, theirs)
        wrong: Counter[str] = Counter()
        statuses: Counter[int] = Counter()

        async def probe(url: str, case: Case) -> None:
            async with run.slots:
                status = await exchange(url, case.request)
            run.row.http_checked += 1
            statuses[status] += 1
            run.http_answer(status, case.name)
            if status == 202 and case.creates is not None:
                run.jobs.add(case.creates)
            if 0 < status < 500 and status not in case.expect:
                wrong[f"{case.name} {status}"] += 1

        urls = run.live_urls()
        await asyncio.gather(*(probe(url, case) for case in cases for url in urls))
        answers = ", ".join(f"{status} x{n}" for status, n in sorted(statuses.items()))
        run.note(f"{len(cases)} requests x {len(urls)} workers answered {answers}")
        if wrong:
            run.anomaly(sum(wrong.values()), "wrong status: " + ", ".join(sorted(wrong)))
        await run.finish(began)
    return run.row


# -- the battery -----------------------------------------------------------------------------------

Fault = Callable[[Battery], Awaitable[Row]]

#: Every fault in table order; `--only` picks by these names.
FAULTS: dict[str, Fault] = {
    "cp-sigkill": cp_sigkill,
    "cp-graceful": cp_graceful,
    "broker-sigkill": broker_sigkill,
    "zombie": zombie,
    "zombie-reads": zombie_reads,
    "provider-sigkill": provider_sigkill,
    "provider-graceful": provider_graceful,
    "failover": failover_after_local_crash,
    "poison": poison_records,
    "http-bad-inputs": http_bad_inputs,
}
GRACEFUL = {"cp-graceful", "provider-graceful"}


async def run_fault(battery: Battery, name: str, *, timeout: float = 600.0) -> Row:
    """Run one fault; a fault that fails to run at all is a row with its error."""
    began = time.monotonic()
    battery.say(f"{name}: running")
    try:
        row = await asyncio.wait_for(FAULTS[name](battery), timeout)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        row = Row(fault=name, graceful=name in GRACEFUL, error=f"{type(exc).__name__} {detail}")
    row.seconds = round(time.monotonic() - began, 1)
    battery.say(f"{name}: {'ok' if row.ok else 'FAILED ' + '; '.join(row.failures())}")
    return row


COLUMNS = [
    "fault",
    "jobs",
    "lost",
    "double finals",
    "dup. dispatch records",
    "attempts re-run",
    "attempt timeouts",
    "drain s",
    "HTTP checked",
    "HTTP 5xx",
    "HTTP mismatch",
    "anomalies",
    "run s",
    "result",
    "notes",
]


def _cell(value: object) -> str:
    text = "-" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|:--|" + "--:|" * (len(COLUMNS) - 3) + ":--|:--|",
    ]
    for row in rows:
        failures = row.failures()
        cells = [
            row.fault + (" (graceful)" if row.graceful else ""),
            row.jobs,
            row.lost,
            row.double_finals,
            row.duplicate_dispatches,
            row.attempts_rerun,
            row.attempt_timeouts,
            row.drain_s,
            row.http_checked,
            row.http_5xx,
            row.http_mismatch,
            row.anomalies,
            row.seconds,
            "ok" if not failures else "FAIL: " + ", ".join(failures),
            "; ".join(row.notes),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)
