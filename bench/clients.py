"""Kafka plumbing of the benchmark: tails read read_committed, end offsets, volumes, the ceiling.

Output topics of the control plane are written in transactions: every commit leaves one control
marker in each partition it touched, so records are counted by consuming, never by subtracting
offsets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

Offsets = dict[TopicPartition, int]


@dataclass
class Volume:
    """Records and key+value bytes written to one topic."""

    records: int = 0
    bytes: int = 0


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    for _ in range(100):
        found = consumer.partitions_for_topic(topic)
        if found:
            return [TopicPartition(topic, p) for p in sorted(found)]
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"topic {topic} has no partitions")


class Tail:
    """One read_committed consumer over every partition of some topics, from given offsets.

    Without `start`, it starts at the end (what the topics get from now on).
    """

    def __init__(
        self,
        bootstrap: str,
        topics: Iterable[str],
        start: Offsets | None = None,
        *,
        fetch_max_wait_ms: int = 50,
    ) -> None:
        self.topics = list(topics)
        self.start = start
        self.tps: list[TopicPartition] = []
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            fetch_max_wait_ms=fetch_max_wait_ms,
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024,
        )

    async def __aenter__(self) -> Tail:
        await self.consumer.start()
        for topic in self.topics:
            self.tps.extend(await _partitions(self.consumer, topic))
        self.consumer.assign(self.tps)
        if self.start is None:
            await self.consumer.seek_to_end(*self.tps)
        else:
            for tp in self.tps:
                self.consumer.seek(tp, self.start.get(tp, 0))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.consumer.stop()

    async def poll(self, timeout_ms: int = 50) -> list[Any]:
        batches = await self.consumer.getmany(timeout_ms=timeout_ms)
        return [record for records in batches.values() for record in records]

    async def ends(self) -> Offsets:
        """The last stable offsets (read_committed end offsets) of every partition."""
        ends: Offsets = await self.consumer.end_offsets(self.tps)
        return ends

    async def reached(self, ends: Offsets) -> bool:
        for tp in self.tps:
            if await self.consumer.position(tp) < ends[tp]:
                return False
        return True


async def end_offsets(bootstrap: str, topics: Iterable[str]) -> Offsets:
    async with Tail(bootstrap, topics) as tail:
        return await tail.ends()


async def settle(
    bootstrap: str, topics: Iterable[str], *, quiet_s: float = 1.5, limit_s: float = 30.0
) -> Offsets:
    """End offsets once they stop moving for `quiet_s` (or after `limit_s`)."""
    async with Tail(bootstrap, topics) as tail:
        deadline = time.monotonic() + limit_s
        last = await tail.ends()
        still_since = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            now = await tail.ends()
            if now != last:
                last, still_since = now, time.monotonic()
            elif time.monotonic() - still_since >= quiet_s:
                break
        return last


async def volumes(
    bootstrap: str, start: Offsets, end: Offsets, *, timeout_s: float = 120.0
) -> dict[str, Volume]:
    """Consume each topic read_committed from `start` to `end`: records and bytes per topic."""
    topics = sorted({tp.topic for tp in end})
    counted = {topic: Volume() for topic in topics}
    async with Tail(bootstrap, topics, start) as tail:
        deadline = time.monotonic() + timeout_s
        while not await tail.reached(end):
            if time.monotonic() > deadline:
                raise RuntimeError(f"counting records did not reach the end in {timeout_s:.0f} s")
            for record in await tail.poll(200):
                tp = TopicPartition(record.topic, record.partition)
                if record.offset >= end[tp]:
                    continue
                volume = counted[record.topic]
                volume.records += 1
                volume.bytes += len(record.key or b"") + len(record.value or b"")
    return counted


# -- admin -----------------------------------------------------------------------------------------


async def _admin(bootstrap: str) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    return admin


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = await _admin(bootstrap)
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: Iterable[str]) -> list[str]:
    """Delete the topics that exist among `names`; return the ones deleted."""
    admin = await _admin(bootstrap)
    try:
        existing = set(await admin.list_topics())
        doomed = sorted(set(names) & existing)
        if doomed:
            await admin.delete_topics(doomed)
        return doomed
    finally:
        await admin.close()


# -- the raw ceiling -------------------------------------------------------------------------------


@dataclass
class Ceiling:
    """One producer and one consumer in one process: the most this client and broker carry."""

    records: int
    record_bytes: int
    produce_s: float
    consume_s: float

    @property
    def produced_per_s(self) -> float:
        return self.records / self.produce_s

    @property
    def consumed_per_s(self) -> float:
        return self.records / self.consume_s


async def ceiling(
    bootstrap: str,
    topic: str,
    *,
    records: int = 50_000,
    size: int = 600,
    partitions: int = 8,
    timeout_s: float = 120.0,
) -> Ceiling:
    """Produce `records` of `size` bytes onto a fresh topic and consume them back, concurrently.

    The topic is created here and deleted before returning.
    """
    await create_topic(bootstrap, topic, partitions)
    try:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            async with Tail(bootstrap, [topic], {}) as tail:
                payload = bytes(max(0, size - 36))  # keys are 36 bytes, like job ids
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout_s

                async def consume() -> float:
                    seen = 0
                    while seen < records:
                        if loop.time() > deadline:
                            raise RuntimeError(f"ceiling: consumed {seen} of {records} records")
                        seen += len(await tail.poll(100))
                    return time.monotonic()

                started = time.monotonic()
                consumer = asyncio.ensure_future(consume())
                for i in range(records):
                    key = f"job_{i:032d}".encode()
                    await producer.send(topic, value=payload, key=key)
                await producer.flush()
                produced = time.monotonic()
                consumed = await asyncio.wait_for(consumer, timeout_s)
        finally:
            await producer.stop()
    finally:
        await delete_topics(bootstrap, [topic])
    return Ceiling(
        records=records,
        record_bytes=size,
        produce_s=produced - started,
        consume_s=consumed - started,
    )
