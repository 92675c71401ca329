"""Fixtures for tests against the real broker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support.stack import Stack, new_stack
from tests.support.workers import Worker


def create_topics(bootstrap: str, names: list[str], partitions: int = 8) -> None:
    """Create topics that are not in topics.yaml (test-only apps)."""

    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names]
            )
        finally:
            await admin.close()

    asyncio.run(run())


@pytest.fixture
def worker_env(
    kafka_bootstrap: str, run_id: str, request: pytest.FixtureRequest
) -> Iterator[dict[str, str]]:
    """Give one test its own app id and topic prefix."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
    yield {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "CP_APP_ID": f"{run_id}-{name}",
        "CP_TOPIC_PREFIX": f"{run_id}.{name}.",
        "CP_LOG_FORMAT": "console",
    }


@pytest.fixture
def logs_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def spawned() -> Iterator[list[Worker]]:
    """Collect the workers a test starts and make sure none outlives it."""
    workers: list[Worker] = []
    yield workers
    for worker in workers:
        worker.kill()


@pytest.fixture(scope="session")
def stack(
    kafka_bootstrap: str, run_id: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The whole system, shared by the pipeline tests: one control-plane and one provider worker."""
    root = tmp_path_factory.mktemp("stack")
    stack = new_stack(kafka_bootstrap, run_id, "pipe", root)
    try:
        stack.start_cp()
        stack.start_providers()
        yield stack
    finally:
        stack.stop()
