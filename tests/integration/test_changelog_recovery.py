"""A real faust agent with the RocksDB store keeps its table across restarts via the changelog."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from tests.integration.conftest import create_topics
from tests.support.workers import Worker, free_port, http_get, wait_for

pytestmark = pytest.mark.integration


def produce(bootstrap: str, topic: str, words: list[str]) -> None:
    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for word in words:
                await producer.send_and_wait(topic, key=word.encode(), value=word.encode())
        finally:
            await producer.stop()

    asyncio.run(run())


def count_of(worker: Worker, word: str) -> int:
    status, body = http_get(f"{worker.url}/counts/{word}")
    return int(json.loads(body)["count"]) if status == 200 else -1


def test_table_state_survives_restart_and_loss_of_local_state(
    kafka_bootstrap: str,
    worker_env: dict[str, str],
    tmp_path: Path,
    logs_dir: Path,
    spawned: list[Worker],
) -> None:
    env = {**worker_env, "CP_STORE": "rocksdb://"}
    create_topics(kafka_bootstrap, [env["CP_TOPIC_PREFIX"] + "words"])
    data_dir = tmp_path / "data"
    port = free_port()

    def start() -> Worker:
        worker = Worker.faust(
            "tests.integration.apps.counter",
            env=env,
            data_dir=data_dir,
            web_port=port,
            log_path=logs_dir / "counter.log",
        ).start()
        spawned.append(worker)
        worker.wait_ready()
        return worker

    worker = start()
    words = ["alpha"] * 20 + ["beta"] * 7 + ["gamma"]
    produce(kafka_bootstrap, env["CP_TOPIC_PREFIX"] + "words", words)
    wait_for(
        lambda: count_of(worker, "alpha") == 20 and count_of(worker, "gamma") == 1,
        timeout=60,
        what="the agent to count every word",
    )
    assert count_of(worker, "beta") == 7
    assert list(data_dir.rglob("*.db")) or list(data_dir.rglob("CURRENT")), "RocksDB files expected"

    # Graceful restart: local RocksDB state plus the changelog.
    assert worker.stop() == 0
    worker = start()
    assert (count_of(worker, "alpha"), count_of(worker, "beta")) == (20, 7)

    # Crash and lose the local state: everything comes back from the changelog alone.
    worker.kill()
    shutil.rmtree(data_dir)
    worker = start()
    try:
        assert (count_of(worker, "alpha"), count_of(worker, "beta"), count_of(worker, "gamma")) == (
            20,
            7,
            1,
        )
        produce(kafka_bootstrap, env["CP_TOPIC_PREFIX"] + "words", ["alpha"])
        wait_for(
            lambda: count_of(worker, "alpha") == 21, timeout=30, what="counting after recovery"
        )
    finally:
        worker.stop()
