"""Find or start the Kafka broker the test session uses."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


@contextmanager
def kafka_broker() -> Iterator[str]:
    """Yield bootstrap servers: the configured ones, else testcontainers, else the local broker."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:4.0.1").with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    port = int(os.environ.get("KAFKA_PORT", "9092"))
    if not _port_open("127.0.0.1", port):
        subprocess.run([str(ROOT / "scripts" / "kafka.sh"), "up"], check=True, cwd=ROOT)
    yield f"127.0.0.1:{port}"


async def delete_topics_starting(bootstrap: str, *prefixes: str) -> list[str]:
    """Delete every topic whose name starts with one of `prefixes`; return the names deleted."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        doomed = sorted(name for name in await admin.list_topics() if name.startswith(prefixes))
        for start in range(0, len(doomed), 100):
            await admin.delete_topics(doomed[start : start + 100])
        return doomed
    finally:
        await admin.close()


def forget_run(bootstrap: str, run_id: str, timeout_s: float = 60.0) -> None:
    """Delete the topics a test session created (all named from its run id), so a long-lived
    local broker does not pile up partitions run after run. Never fails the session."""
    try:
        asyncio.run(asyncio.wait_for(delete_topics_starting(bootstrap, run_id), timeout_s))
    except Exception as exc:
        log.warning("could not delete the topics of run %s: %r", run_id, exc)
