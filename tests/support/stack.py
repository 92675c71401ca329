"""The whole control plane as real processes on the real broker, isolated by a topic prefix."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.admin import ensure_topics
from streams.settings import Settings
from tests.support.broker import delete_topics_starting
from tests.support.workers import ROOT, Worker, free_port

#: Fast timings for tests: attempts time out in 5 s, backoffs stay under half a second.
TEST_POLICY_OVERRIDES: dict[str, Any] = {
    "attempt_timeout_ms": 5000,
    "retry": {
        "max_attempts_per_job": 4,
        "max_attempts_per_provider": 2,
        "base_backoff_ms": 50,
        "max_backoff_ms": 400,
        "multiplier": 2.0,
        "jitter": 0.2,
        "honour_retry_after": True,
        "max_retry_after_ms": 2000,
    },
    # Health stays neutral so that expected routes do not depend on the order jobs ran in;
    # circuits and health-driven routing are proven by the unit tests of domain.health/routing.
    "circuit": {
        "failure_threshold": 1_000_000,
        "error_rate_threshold": 1.0,
        "min_samples": 1_000_000,
        "cooldown_ms": 1000,
        "ewma_alpha": 0.000001,
    },
}


def write_test_config(directory: Path) -> tuple[Path, Path]:
    """Write the shipped catalogue and policy with fast, error-free simulated providers."""
    catalogue = yaml.safe_load((ROOT / "config" / "catalogue.yaml").read_text())
    for provider in catalogue["providers"]:
        if provider.get("simulation"):
            provider["simulation"].update(latency_ms=10, latency_jitter_ms=5, error_rate=0.0)
    policy = yaml.safe_load((ROOT / "config" / "policy.yaml").read_text())
    policy.update(TEST_POLICY_OVERRIDES)
    policy["version"] = f"{policy['version']}-test"
    directory.mkdir(parents=True, exist_ok=True)
    cat_path, pol_path = directory / "catalogue.yaml", directory / "policy.yaml"
    cat_path.write_text(yaml.safe_dump(catalogue, sort_keys=False))
    pol_path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return cat_path, pol_path


@dataclass
class Stack:
    """A control-plane worker and a provider worker sharing one topic prefix."""

    bootstrap: str
    env: dict[str, str]
    root: Path
    workers: list[Worker] = field(default_factory=list)
    cp: Worker | None = None
    providers: Worker | None = None

    @property
    def prefix(self) -> str:
        return self.env["CP_TOPIC_PREFIX"]

    def topic(self, name: str) -> str:
        return self.prefix + name.replace("{app_id}", self.env["CP_APP_ID"])

    async def delete_topics(self) -> list[str]:
        """Delete every topic of this stack (its prefix, or named from its app id)."""
        return await delete_topics_starting(
            self.bootstrap, self.prefix, self.env["CP_APP_ID"] + "-"
        )

    def settings(self) -> Settings:
        return Settings(
            kafka_bootstrap_servers=self.bootstrap,
            app_id=self.env["CP_APP_ID"],
            topic_prefix=self.prefix,
            # The dispatch topics follow from the catalogue the workers run.
            catalogue_file=Path(self.env.get("CP_CATALOGUE_FILE", ROOT / "config/catalogue.yaml")),
            topics_file=Path(self.env.get("CP_TOPICS_FILE", ROOT / "topics.yaml")),
        )

    def create_topics(self) -> None:
        report = asyncio.run(ensure_topics(self.settings()))
        assert not report.errors, report.errors

    def start_cp(
        self, name: str = "cp-1", port: int | None = None, env: dict[str, str] | None = None
    ) -> Worker:
        """Start a control-plane worker with the stack's environment, and `env` over it."""
        worker = Worker.faust(
            "streams.app",
            env={**self.env, **(env or {})},
            data_dir=self.root / "data" / name,
            web_port=port or free_port(),
            log_path=self.root / "logs" / f"{name}.log",
        ).start()
        self.workers.append(worker)
        worker.wait_ready()
        if name == "cp-1":
            self.cp = worker
        return worker

    def start_providers(self, name: str = "providers-1") -> Worker:
        port = free_port()
        env = {
            **self.env,
            "CP_PROVIDER_DATA_DIR": str(self.root / "data" / name),
            "CP_PROVIDER_WEB_PORT": str(port),
        }
        worker = Worker(
            [sys.executable, "-m", "providers.worker"],
            env=env,
            log_path=self.root / "logs" / f"{name}.log",
            web_port=port,
        ).start()
        self.workers.append(worker)
        self.providers = worker
        worker.wait_ready()
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop(timeout=15)


def new_stack(
    bootstrap: str, run_id: str, name: str, root: Path, *, topics_file: Path | None = None
) -> Stack:
    catalogue, policy = write_test_config(root / "config")
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CP_APP_ID": f"{run_id}-{name}",
        "CP_TOPIC_PREFIX": f"{run_id}.{name}.",
        "CP_CATALOGUE_FILE": str(catalogue),
        "CP_POLICY_FILE": str(policy),
        "CP_LOG_FORMAT": "json",
        "CP_TIMER_INTERVAL_S": "0.1",
        "CP_PROVIDER_CONCURRENCY": "256",
    }
    if topics_file is not None:
        env["CP_TOPICS_FILE"] = str(topics_file)
    stack = Stack(bootstrap=bootstrap, env=env, root=root)
    stack.create_topics()
    return stack


# -- Kafka clients for tests ---------------------------------------------------------------------


async def produce(
    bootstrap: str,
    topic: str,
    values: Iterable[bytes],
    *,
    key: Callable[[int], bytes | None] | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value=value, key=key(i) if key else None, headers=headers)
            for i, value in enumerate(values)
        ]
        for future in futures:
            await future
    finally:
        await producer.stop()


def to_json(record: Mapping[str, Any]) -> bytes:
    return orjson.dumps(record)


class TopicReader:
    """Read a topic from the beginning, accumulating records, until a condition holds."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.records: list[Any] = []
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> TopicReader:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await self._consumer.start()
        partitions = await self._wait_partitions()
        tps = [TopicPartition(self.topic, p) for p in partitions]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        return self

    async def _wait_partitions(self) -> set[int]:
        assert self._consumer is not None
        for _ in range(100):
            partitions = self._consumer.partitions_for_topic(self.topic)
            if partitions:
                return set(partitions)
            await self._consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)
        raise AssertionError(f"topic {self.topic} has no partitions")

    async def __aexit__(self, *exc: object) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def poll(self, timeout_ms: int = 200) -> list[Any]:
        assert self._consumer is not None
        batches = await self._consumer.getmany(timeout_ms=timeout_ms)
        new = [record for records in batches.values() for record in records]
        self.records.extend(new)
        return new

    async def until(
        self, condition: Callable[[list[Any]], bool], *, timeout: float, what: str
    ) -> list[Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if condition(self.records):
                return self.records
            if loop.time() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what} on {self.topic} "
                    f"({len(self.records)} records read)"
                )
            await self.poll()

    def values(self) -> list[dict[str, Any]]:
        return [orjson.loads(record.value) for record in self.records]
