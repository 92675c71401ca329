"""`python -m streams.run` (make run / make demo) as a real process against the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from domain.ids import job_id_for
from streams.admin import ensure_topics
from streams.run import DEMO_JOBS
from streams.settings import Settings
from tests.support.workers import ROOT, child_pids, free_port

pytestmark = pytest.mark.integration

PIDS = re.compile(r"control-plane pid (\d+), providers pid (\d+)")


@pytest.fixture
def run_env(
    kafka_bootstrap: str, run_id: str, tmp_path: Path, request: pytest.FixtureRequest
) -> dict[str, str]:
    """An environment of its own: app id, topic prefix (topics created), data dirs and ports."""
    name = request.node.name.replace("_", "-")[:30]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CP_")},
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "CP_APP_ID": f"{run_id}-{name}",
        "CP_TOPIC_PREFIX": f"{run_id}.{name}.",
        "CP_DATA_DIR": str(tmp_path / "data" / "cp"),
        "CP_PROVIDER_DATA_DIR": str(tmp_path / "data" / "providers"),
        "CP_WEB_PORT": str(free_port()),
        "CP_PROVIDER_WEB_PORT": str(free_port()),
        "CP_LOG_FORMAT": "console",
    }
    settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        app_id=env["CP_APP_ID"],
        topic_prefix=env["CP_TOPIC_PREFIX"],
    )
    report = asyncio.run(ensure_topics(settings))
    assert not report.errors, report.errors
    return env


class Run:
    """`python -m streams.run` with its stdout read line by line in the background."""

    def __init__(self, env: dict[str, str], log_dir: Path, *args: str) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streams.run", "--log-dir", str(log_dir), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout as stdout:
            for line in stdout:
                self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.output.append(line)
            if match := pattern.search(line):
                return match
        raise AssertionError(f"no line matching {pattern.pattern!r}; output:\n{self.text()}")

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        while (line := self.lines.get(timeout=5)) is not None:
            self.output.append(line)
        return code

    def text(self) -> str:
        return "".join(self.output)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.reader.join(timeout=10)  # it closes stdout at EOF


@pytest.fixture
def runs() -> Iterator[list[tuple[Run, list[int]]]]:
    """Runs a test starts, with the worker pids they printed; none outlives the test."""
    started: list[tuple[Run, list[int]]] = []
    yield started
    for run, pids in started:
        run.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_demo_runs_end_to_end_twice(
    run_env: dict[str, str], tmp_path: Path, runs: list[tuple[Run, list[int]]]
) -> None:
    for attempt in (1, 2):  # the second run reuses the app id, state dirs and consumer groups
        run = Run(run_env, tmp_path / "logs", "--demo")
        pids: list[int] = []
        runs.append((run, pids))
        pids.extend(int(p) for p in run.wait_for_line(PIDS, timeout=150).groups())
        code = run.finish(timeout=150)
        out = run.text()
        assert code == 0, f"run {attempt} exited {code}:\n{out}"
        assert "demo: every job ended as expected" in out, out
        for job in DEMO_JOBS:
            block = out.split(f"[{job.name}] ", 1)[1].split("\n[", 1)[0]
            assert re.search(rf"result\s+{job.expect}\s", block), (job.name, block)
        fallback = out.split("[fallback] ", 1)[1].split("\n[", 1)[0]
        assert re.search(r"result\s+COMPLETED\s+provider sim-fast\s", fallback), fallback
        if attempt == 1:
            assert re.search(r"attempts 3", fallback), fallback
            assert "fallback" in fallback and "sim-cheap -> sim-fast" in fallback, fallback
        # The second run replays the first's provider health (cp.health, same app id): sim-cheap's
        # failures there may have opened its circuit, and the job then goes to sim-fast at once.
        assert all(gone(pid) for pid in pids), out


def test_sigint_stops_both_workers_and_exits_zero(
    run_env: dict[str, str], tmp_path: Path, runs: list[tuple[Run, list[int]]]
) -> None:
    """With a read port too: its reader processes start with the control plane and stop with it."""
    read_port = free_port()
    run = Run({**run_env, "CP_READ_PORT": str(read_port)}, tmp_path / "logs")
    pids: list[int] = []
    runs.append((run, pids))
    run.wait_for_line(re.compile(rf"read port\s+http://127.0.0.1:{read_port}"), timeout=150)
    pids.extend(int(p) for p in run.wait_for_line(PIDS, timeout=10).groups())
    run.wait_for_line(re.compile(r"Ctrl-C stops both workers"), timeout=10)
    assert not any(gone(pid) for pid in pids)
    deadline = time.monotonic() + 30
    while len(child_pids(pids[0])) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    readers = child_pids(pids[0])
    assert len(readers) == 2, readers  # CP_READERS' default
    pids.extend(readers)
    run.process.send_signal(signal.SIGINT)
    code = run.finish(timeout=60)
    assert code == 0, run.text()
    assert "both workers stopped" in run.text()
    assert all(gone(pid) for pid in pids), run.text()


def readme_quick_start_blocks() -> list[str]:
    """The shell blocks of the README's quick start that talk to a running system."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [block for block in blocks if "curl" in block]


def test_the_readme_quick_start_runs_as_written(
    run_env: dict[str, str], tmp_path: Path, runs: list[tuple[Run, list[int]]]
) -> None:
    """Before: the README's kcat example used a tenant `make run`'s key does not belong to."""
    if shutil.which("kcat") is None or shutil.which("curl") is None:
        pytest.skip("kcat and curl drive this test (make system-deps installs them)")
    run = Run(run_env, tmp_path / "logs")
    pids: list[int] = []
    runs.append((run, pids))
    pids.extend(int(p) for p in run.wait_for_line(PIDS, timeout=150).groups())
    key = run.wait_for_line(re.compile(r"API key\s+(\S+)\s+\(tenant dev-tenant"), timeout=10)[1]
    bootstrap = run_env["KAFKA_BOOTSTRAP_SERVERS"]
    blocks = readme_quick_start_blocks()
    assert len(blocks) == 3, blocks
    outputs: list[str] = []
    for block in blocks:
        # Only where the test's system runs differs from a fresh `make run`.
        script = (
            block.replace("http://127.0.0.1:6066", f"http://127.0.0.1:{run_env['CP_WEB_PORT']}")
            .replace("-b 127.0.0.1:9092", f"-b {bootstrap}")
            .replace("-t cp.intake", f"-t {run_env['CP_TOPIC_PREFIX']}cp.intake")
        )
        job_id = orjson.loads(outputs[0])["job_id"] if outputs else ""
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            check=False,
            env={**run_env, "KEY": key, "JOB_ID": job_id},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, (script, done.stdout, done.stderr)
        outputs.append(done.stdout)
    over_http = orjson.loads(outputs[0])
    assert (over_http["state"], over_http["provider"]) == ("COMPLETED", "sim-fast"), over_http
    via_kafka = orjson.loads(outputs[1])
    assert via_kafka["job_id"] == job_id_for("dev-tenant", "r2"), via_kafka
    # The signed timeline link opens the page without a key.
    assert re.search(r"^open http://127\.0\.0\.1:\d+/jobs/job_\S+\?", outputs[2], re.M), outputs[2]
    assert re.search(r"^200 text/html", outputs[2], re.M), outputs[2]

    # The listing example and the command-line client's, against the same system.
    readme = (ROOT / "README.md").read_text()
    listing = readme.split("### Listing jobs", 1)[1]
    cli = readme.split("## Command-line client", 1)[1]
    env = {
        **run_env,
        "KEY": key,
        "CP_URL": f"http://127.0.0.1:{run_env['CP_WEB_PORT']}",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    replay = readme.split("### Policy replay", 1)[1]
    for name, section in (("listing", listing), ("cli", cli), ("replay", replay)):
        block = re.findall(r"```sh\n(.*?)```", section, re.S)[0]
        script = block.replace("http://127.0.0.1:6066", env["CP_URL"])
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, (name, script, done.stdout, done.stderr)
        if name == "listing":
            page = orjson.loads(done.stdout)
            assert {item["request_id"] for item in page["items"]} <= {"r1", "r2"}, page
            assert page["items"], page
        elif name == "cli":
            assert "COMPLETED" in done.stdout, done.stdout
            assert "sim-cheap" in done.stdout or "sim-fast" in done.stdout, done.stdout
        else:
            # r1, r2 and the CLI's job were routed within the hour; the cost-first policy is read.
            assert "policy cost-first" in done.stdout, done.stdout
            totals = re.search(r"^(\d+) decisions, (\d+) would change$", done.stdout, re.M)
            assert totals is not None, done.stdout
            assert int(totals[1]) >= 3 and int(totals[2]) <= int(totals[1]), totals
