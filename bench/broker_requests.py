"""Count the broker's requests by type over a bench row, from its JMX.

Enabled when `KAFKA_JMX_PORT` is set and the broker was started with it
(`KAFKA_JMX_PORT=9999 make kafka-up`, or a bench that starts its own broker with it set);
`bench/BrokerRequests.java` reads `kafka.network` RequestMetrics. Requests per job say where a
job's broker work goes (produce, fetch, the transaction round trips), which CPU seconds do not.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

JAVA_SOURCE = Path(__file__).with_name("BrokerRequests.java")
#: Not counted: what the broker and its controller ask of each other, and FetchConsumer and
#: FetchFollower, which RequestMetrics also counts under Fetch.
INTERNAL = frozenset(
    {
        "BrokerHeartbeat",
        "BrokerRegistration",
        "ControllerRegistration",
        "Fetch.Controller",
        "FetchConsumer",
        "FetchFollower",
    }
)


def jmx_port() -> int | None:
    raw = os.environ.get("KAFKA_JMX_PORT", "")
    return int(raw) if raw else None


def parse(output: str) -> Counter[str]:
    """`<request> <count>` lines, as BrokerRequests.java prints them."""
    counts: Counter[str] = Counter()
    for line in output.splitlines():
        name, _, count = line.strip().rpartition(" ")
        if name and count.isdigit() and name not in INTERNAL:
            counts[name] += int(count)
    return counts


def snapshot(port: int) -> Counter[str]:
    done = subprocess.run(  # noqa: S603 (our own source file, a port number)
        ["java", str(JAVA_SOURCE), str(port)],  # noqa: S607 (java from PATH, as scripts/kafka.sh)
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(
            f"cannot read the broker's JMX on 127.0.0.1:{port} (was it started with "
            f"KAFKA_JMX_PORT={port}?): {done.stderr.strip()[-300:]}"
        )
    return parse(done.stdout)


def per_job(before: Counter[str], after: Counter[str], jobs: int) -> dict[str, float]:
    """Requests of each type per job between two snapshots, most first (none that did not move)."""
    moved = {name: (after[name] - before[name]) / max(1, jobs) for name in after}
    return dict(sorted(((n, v) for n, v in moved.items() if v > 0), key=lambda nv: -nv[1]))


def summary(counts: dict[str, float], top: int = 8) -> str:
    shown = ", ".join(f"{name} {value:.2f}" for name, value in list(counts.items())[:top])
    return f"{sum(counts.values()):.2f} in all ({shown})"
