"""A py-spy CPU profile of one worker process, summarised by function."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.workers import ROOT

RATE_HZ = 200
#: py-spy stops on its own after this; the benchmark interrupts it when the burst is over.
MAX_DURATION_S = 600


def py_spy() -> Path | None:
    """The py-spy of the virtualenv running the benchmark, if installed."""
    candidate = Path(sys.executable).parent / "py-spy"
    return candidate if candidate.exists() else None


def short_file(path: str) -> str:
    """A file name without this machine's directories: package-relative or repo-relative."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.rsplit(marker, 1)[1]
    root = str(ROOT) + "/"
    if path.startswith(root):
        return path[len(root) :]
    match = re.search(r"/lib/python3\.\d+/(.+)$", path)
    if match:
        return match.group(1)
    return path.rsplit("/", 1)[-1]


#: The frame under which every callback and task step of an asyncio loop runs.
LOOP_CALLBACK = "Handle._run (asyncio/events.py)"

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::\d+)?\)$")


def function_of(frame: str) -> str:
    """`func (file:line)` -> `func (short file)`: samples grouped by function, not by line."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    return f"{match.group('func')} ({short_file(match.group('file'))})"


@dataclass
class Profile:
    samples: int
    seconds: float
    own: list[tuple[str, float]] = field(default_factory=list)  # (function, % of samples)
    inclusive: list[tuple[str, float]] = field(default_factory=list)
    profiler_cpu_s: float | None = None


def summarise(
    raw: str, *, top_own: int = 20, top_inclusive: int = 15
) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """Parse py-spy's raw (collapsed stacks) output: own and inclusive percentages."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        functions = [function_of(frame) for frame in stack.split(";") if frame]
        if not functions:
            continue
        total += count
        own[functions[-1]] += count
        # Inclusive shares start below the event loop's callback runner: everything above it
        # (faust's CLI, run_forever, _run_once) would top the list at ~100% and say nothing.
        cut = max((i for i, f in enumerate(functions) if f.startswith(LOOP_CALLBACK)), default=-1)
        for function in set(functions[cut + 1 :]):
            inclusive[function] += count
    if total == 0:
        return 0, [], []

    def top(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, 100.0 * count / total) for name, count in counter.most_common(n)]

    return total, top(own, top_own), top(inclusive, top_inclusive)


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


class Profiler:
    """py-spy recording one pid from start() until stop() (or MAX_DURATION_S)."""

    def __init__(self, pid: int, directory: Path) -> None:
        self.pid = pid
        self.out = directory / "profile.txt"
        self.log = directory / "py-spy.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.stopped: float | None = None
        self.cpu_s: float | None = None
        self.note = ""

    def start(self) -> None:
        binary = py_spy()
        if binary is None:
            self.note = "py-spy not installed in the virtualenv: no profile"
            return
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 (our own binary, fixed arguments)
                [
                    str(binary),
                    "record",
                    "--pid",
                    str(self.pid),
                    "--format",
                    "raw",
                    "--rate",
                    str(RATE_HZ),
                    "--duration",
                    str(MAX_DURATION_S),
                    "-o",
                    str(self.out),
                    "--nonblocking",
                    "--full-filenames",  # shortened here: streams/core.py, not core.py
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started = time.monotonic()

    def interrupt(self) -> None:
        """Stop sampling now (SIGINT makes py-spy write what it has); idempotent."""
        if self.process is None or self.stopped is not None:
            return
        self.stopped = time.monotonic()
        self.cpu_s = _cpu_seconds(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def result(self) -> Profile | None:
        """Wait for py-spy to finish writing and summarise its samples."""
        if self.process is None:
            return None
        self.interrupt()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        if not self.out.exists():
            lines = self.log.read_text(errors="replace").strip().splitlines()
            self.note = f"py-spy wrote no profile ({lines[-1][:160] if lines else 'no output'})"
            return None
        total, own, inclusive = summarise(self.out.read_text(errors="replace"))
        assert self.stopped is not None
        return Profile(
            samples=total,
            seconds=self.stopped - self.started,
            own=own,
            inclusive=inclusive,
            profiler_cpu_s=self.cpu_s,
        )
