"""Run the fault battery against the real broker, print one table row per fault, record the table.

    python -m tests.chaos                 # the whole battery (make chaos)
    python -m tests.chaos --quick         # every fault with a few dozen jobs
    python -m tests.chaos --only zombie poison --no-record

The table is appended to tests/chaos/results.md under a heading with the time (UTC), the commit
and the machine. The exit status is 1 when any row failed (see tests.chaos.battery.Row.failures).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from tests.chaos.battery import FAULTS, FULL, QUICK, Battery, Row, Sizes, run_fault, table
from tests.support.broker import kafka_broker
from tests.support.workers import ROOT

RESULTS = Path(__file__).with_name("results.md")

HEADER = """# Chaos battery results

Produced by `make chaos` (`python -m tests.chaos`; `--quick` for a few dozen jobs per fault),
appended run by run. Each fault runs on a stack of its own (control-plane and provider workers as
real processes on the real broker, own topic prefix); the broker fault runs on a second broker of
its own started by scripts/kafka.sh. Jobs go in through cp.intake and POST /jobs (part of the POSTs
while the fault is on), with retries, fallbacks and duplicate provider answers mixed in.

Columns:

* **jobs**: jobs sent; **lost**: jobs without a final response on cp.responses after the drain;
* **double finals**: jobs with two terminal events, or republished final responses that disagree;
* **dup. dispatch records**: dispatch records beyond the first per idempotency key (harmless:
  the provider worker skips them, but each is a record written twice);
* **attempts re-run**: attempts a provider started more than once;
* **attempt timeouts**: attempts that failed with `timeout` (after a SIGKILL, lost calls time out;
  after a graceful restart none may);
* **drain s**: seconds from the (last) fault to the last job's final response;
* **HTTP checked**: HTTP answers checked: GET /jobs/{id}/result of every job from every live
  control-plane worker, compared with its final response on cp.responses (**HTTP mismatch**),
  and for the HTTP fault every bad request; **HTTP 5xx**: every 5xx, except 503 while the fault is
  on (a client is told to retry it; noted);
* **anomalies**: anything else a fault must not cause, named in the notes (no terminal event,
  terminal event and final response disagree, a (job_id, seq) naming two events, a changelog row
  older than the one before, a final state the job's script cannot end in, a worker that died, a
  poison record without exactly one dead letter, an attempt sent to two providers, a bad request
  answered with the wrong status).

A row fails on lost, double finals, HTTP 5xx, HTTP mismatch or anomalies above 0, on attempt
timeouts above 0 for a graceful restart, or when the fault could not run.
"""


def git_commit() -> str:
    """The short commit, with -dirty when the tree has changes (read-only git commands)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    return f"{commit}-dirty" if dirty else commit


def machine() -> str:
    memory = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f", {int(line.split()[1]) / 1024 / 1024:.0f} GiB RAM"
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs{memory}, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}"
    )


def section(rows: list[Row], *, quick: bool, seconds: float) -> str:
    heading = (
        f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {'quick' if quick else 'full'} · "
        f"commit {git_commit()} · {machine()}"
    )
    passed = sum(1 for row in rows if row.ok)
    summary = f"{passed}/{len(rows)} faults ok; the battery took {seconds / 60:.1f} min."
    return f"{heading}\n\n{table(rows)}\n\n{summary}\n"


def record(text: str) -> None:
    if not RESULTS.exists():
        RESULTS.write_text(HEADER)
    with RESULTS.open("a") as out:
        out.write("\n" + text)


def say(line: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {line}", file=sys.stderr, flush=True)


async def run_all(battery: Battery, names: list[str]) -> list[Row]:
    return [await run_fault(battery, name) for name in names]  # one at a time: 2 cores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a few dozen jobs per fault")
    parser.add_argument("--only", nargs="+", choices=list(FAULTS), metavar="NAME", help="faults")
    parser.add_argument("--list", action="store_true", help="name the faults and exit")
    parser.add_argument("--no-record", action="store_true", help="do not append to results.md")
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' logs")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(FAULTS))
        return 0
    # The battery's own readers reconnect through the broker fault: their warnings are noise here.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    names = args.only or list(FAULTS)
    sizes: Sizes = QUICK if args.quick else FULL
    began = time.monotonic()
    with kafka_broker() as bootstrap, tempfile.TemporaryDirectory(prefix="cp-chaos-") as tmp:
        root = Path(tempfile.mkdtemp(prefix="cp-chaos-")) if args.keep_logs else Path(tmp)
        if args.keep_logs:
            say(f"workers' logs under {root}")
        battery = Battery(bootstrap, "k" + uuid.uuid4().hex[:8], root, sizes, say)
        rows = asyncio.run(run_all(battery, names))
    text = section(rows, quick=args.quick, seconds=time.monotonic() - began)
    print("\n" + text)
    if not args.no_record:
        record(text)
        say(f"appended to {RESULTS.relative_to(ROOT)}")
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
