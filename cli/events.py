"""Read the `routed` events of a time window from `cp.events` (read-only, no consumer group)."""

from __future__ import annotations

import asyncio
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from domain.messages import JobEvent


async def read_routed(
    bootstrap: str,
    topic: str,
    *,
    since: datetime,
    until: datetime | None = None,
    tenant: str | None = None,
    timeout_s: float = 60.0,
) -> tuple[list[JobEvent], int]:
    """Return the `routed` events with `since <= at < until` (and of `tenant`), in time order,
    and how many records could not be read as events.

    Each partition is read from the first offset at or after `since` (offsets_for_times) up to its
    end as it was when the read began (read_committed: only committed transactions). No offsets
    are committed and no group is joined, so nothing of the running system changes.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise LookupError(f"topic {topic} does not exist (or has no partitions)")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
        pending: dict[TopicPartition, int] = {}
        for tp in tps:
            found = starts.get(tp)
            if found is None or found.offset >= ends[tp]:
                continue
            consumer.seek(tp, found.offset)
            pending[tp] = ends[tp]
        events: dict[tuple[str, int], JobEvent] = {}
        unreadable = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while pending:
            if loop.time() > deadline:
                raise TimeoutError(f"reading {topic} took over {timeout_s:g} s")
            batches = await consumer.getmany(*pending, timeout_ms=500)
            for records in batches.values():
                for record in records:
                    if record.value is None:
                        continue
                    try:
                        event = JobEvent.model_validate_json(record.value)
                    except ValidationError:
                        unreadable += 1
                        continue
                    if event.type != "routed" or event.at < since:
                        continue
                    if until is not None and event.at >= until:
                        continue
                    if tenant is not None and event.tenant_id != tenant:
                        continue
                    events[(event.job_id, event.seq)] = event  # a redelivery counts once
            for tp in list(pending):
                if await consumer.position(tp) >= pending[tp]:
                    del pending[tp]
        ordered = sorted(events.values(), key=lambda e: (e.at, e.job_id, e.seq))
        return ordered, unreadable
    finally:
        await consumer.stop()
