"""A gathering fetch on the real broker: aiokafka builds its fetches from the pacer's choice, and
the broker answers one after the gather wait with what it has (1 MiB is never waited for)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.consumer import fetcher as aiokafka_fetcher

from streams.pacing import GATHER_MIN_BYTES, FetchPacer
from tests.integration.conftest import create_topics

pytestmark = pytest.mark.integration


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_gathering_fetches_deliver(
    kafka_bootstrap: str, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = f"{run_id}pacing"
    create_topics(kafka_bootstrap, [topic], partitions=1)
    sent: list[tuple[int, int]] = []
    real = aiokafka_fetcher.FetchRequest

    def spy(max_wait_ms: int, min_bytes: int, *args: Any, **kwargs: Any) -> Any:
        sent.append((max_wait_ms, min_bytes))
        return real(max_wait_ms, min_bytes, *args, **kwargs)

    monkeypatch.setattr(aiokafka_fetcher, "FetchRequest", spy)

    async def run() -> list[bytes]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka_bootstrap, fetch_max_wait_ms=100, auto_offset_reset="earliest"
        )
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await consumer.start()
        await producer.start()
        try:
            consumer.assign([TopicPartition(topic, 0)])
            clock = Clock()
            pacer = FetchPacer(consumer, idle_wait_ms=100, gather_ms=50, clock=clock)
            clock.now = 1.0
            pacer.observe(1000)  # 1,000 records/s: gather
            assert pacer.gathering
            values: list[bytes] = []
            for n in range(3):
                await producer.send_and_wait(topic, f"r{n}".encode())
            async with asyncio.timeout(20):
                while len(values) < 3:
                    batch = await consumer.getmany(timeout_ms=500)
                    values += [r.value for records in batch.values() for r in records]
            return values
        finally:
            await producer.stop()
            await consumer.stop()

    assert asyncio.run(run()) == [b"r0", b"r1", b"r2"]
    assert (50, GATHER_MIN_BYTES) in sent
