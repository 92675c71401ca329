"""One provider health for the cluster: every worker folds every attempt outcome.

The job core writes each attempt outcome its steps observe to cp.health, inside the step's
transaction (`JobCore._step`): an outcome is published once, and only when its step committed.
Every control-plane worker runs a `HealthFeed`: a read-committed consumer outside any group that
reads all of cp.health and folds it into the worker's `HealthBook` in log order. All workers
therefore hold the same health and open and close the same circuits, whichever worker's job saw
the failures. A worker that starts replays the last `health_replay_s` seconds of the topic before
its job core routes anything, so it does not begin blind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError

from domain.messages import HealthRecord
from streams.pacing import GATHER_MIN_BYTES
from streams.runtime import HealthBook
from streams.settings import Settings

log = logging.getLogger(__name__)

#: How long the broker gathers cp.health for one fetch: an outcome reaches every worker up to this
#: much later. Every worker folds every outcome, so a fetch per committed transaction (what an
#: answer-at-once fetch makes) would cost each worker more as workers are added; gathering
#: makes it at most 5 fetches per second. An idle worker spends ~20 ms of CPU per second at 50 ms.
FETCH_MAX_WAIT_MS = 200
#: Records folded per poll.
MAX_RECORDS = 2000


class MissingHealthTopic(RuntimeError):
    """cp.health does not exist: `make topics` creates it."""


class HealthMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.folded = Counter(
            "cp_health_outcomes_folded",
            "Attempt outcomes of the whole cluster folded into this worker's provider health",
            registry=registry,
        )
        self.invalid = Counter(
            "cp_health_records_invalid",
            "cp.health records that could not be read (skipped)",
            registry=registry,
        )
        self.lag = Gauge(
            "cp_health_feed_lag_seconds",
            "Age of the newest cp.health record when this worker folded it",
            registry=registry,
        )


class HealthFeed:
    """Folds cp.health into a `HealthBook` from a consumer of its own (no group, all partitions)."""

    def __init__(self, settings: Settings, book: HealthBook, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.book = book
        self.topic = settings.topic("cp.health")
        self.metrics = HealthMetrics(registry)
        self.consumer: AIOKafkaConsumer | None = None
        self.task: asyncio.Task[None] | None = None
        #: Set once the fold has read what the topic held when the feed started.
        self.caught_up = asyncio.Event()
        self._targets: dict[TopicPartition, int] = {}

    async def start(self, *, catch_up_timeout_s: float = 10.0) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            isolation_level="read_committed",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            fetch_min_bytes=GATHER_MIN_BYTES,
            max_poll_records=MAX_RECORDS,
        )
        await consumer.start()
        self.consumer = consumer
        # The consumer's own metadata only covers assigned topics: ask the cluster once.
        cluster = await consumer._client.fetch_all_metadata()
        numbers = cluster.partitions_for_topic(self.topic)
        if not numbers:
            await consumer.stop()
            raise MissingHealthTopic(
                f"topic {self.topic} does not exist at {self.settings.kafka_bootstrap_servers}: "
                "`make topics` creates it"
            )
        tps = [TopicPartition(self.topic, n) for n in sorted(numbers)]
        consumer.assign(tps)
        since = int((time.time() - self.settings.health_replay_s) * 1000)
        found = await consumer.offsets_for_times(dict.fromkeys(tps, since))
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            at = found.get(tp)
            if at is None:
                consumer.seek(tp, ends[tp])
            else:
                consumer.seek(tp, at.offset)
        self._targets = {tp: end for tp, end in ends.items() if end > 0}
        self._check_caught_up({tp: await consumer.position(tp) for tp in tps})
        self.task = asyncio.ensure_future(self._run())
        try:
            await asyncio.wait_for(self.caught_up.wait(), catch_up_timeout_s)
        except TimeoutError:
            log.warning(
                "provider health not caught up with the cluster yet: routing starts anyway",
                extra={"event": "health.catch_up_slow", "topic": self.topic},
            )
        log.info(
            "provider health replayed",
            extra={
                "event": "health.replayed",
                "topic": self.topic,
                "outcomes": self.book.folded,
                "seconds": self.settings.health_replay_s,
            },
        )

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        if self.consumer is not None:
            await self.consumer.stop()

    async def _run(self) -> None:
        assert self.consumer is not None
        while True:
            try:
                batch = await self.consumer.getmany(timeout_ms=1000, max_records=MAX_RECORDS)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("health feed poll failed", extra={"event": "health.poll_failed"})
                await asyncio.sleep(0.5)
                continue
            positions: dict[TopicPartition, int] = {}
            for tp, records in batch.items():
                self.fold(records)
                if records:
                    positions[tp] = records[-1].offset + 1
            if not self.caught_up.is_set():
                for tp in self._targets:
                    if tp not in positions:
                        positions[tp] = await self.consumer.position(tp)
                self._check_caught_up(positions)

    def fold(self, records: list[ConsumerRecord[Any, Any]]) -> None:
        """Fold a batch of cp.health records into the book, skipping unreadable ones."""
        for record in records:
            try:
                outcome = HealthRecord.model_validate_json(record.value or b"")
            except ValidationError as exc:
                self.metrics.invalid.inc()
                log.warning(
                    "unreadable health record skipped",
                    extra={
                        "event": "health.invalid",
                        "partition": record.partition,
                        "offset": record.offset,
                        "detail": str(exc)[:500],
                    },
                )
                continue
            self.book.observe(outcome)
            self.metrics.folded.inc()
        if records:
            self.metrics.lag.set(max(0.0, time.time() - records[-1].timestamp / 1000))

    def _check_caught_up(self, positions: dict[TopicPartition, int]) -> None:
        for tp, position in positions.items():
            if tp in self._targets and position >= self._targets[tp]:
                del self._targets[tp]
        if not self._targets:
            self.caught_up.set()
