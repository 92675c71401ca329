"""One Kafka transaction per job partition: the fence and the atomic step.

Each partition number has two transactional producers (`<group>-<partition>` and `...-b`), used
in turn: one commits while the other collects the next steps, and sends them only once that
commit has ended, so records reach the log in the order the steps were applied. Starting a
producer bumps its id's epoch at the broker, which aborts what an earlier holder left open and
refuses its later sends and commits: a worker that lost the partition while paused can no
longer write. The state records (changelog), the step's effects (dispatch, events, final
response, dead letters) and the input offsets commit together, or none of them do.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from domain.job import Job
from tables.jobs import OFFSET, key

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


@dataclass(slots=True)
class Record:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    partition: int | None = None


@dataclass
class Transaction:
    """What one partition's open transaction will commit: records, rows, input offsets."""

    partition: int
    producer: AIOKafkaProducer
    records: list[Record] = field(default_factory=list)
    #: Jobs changed by steps in this transaction, written once each when it flushes.
    rows: dict[str, Job] = field(default_factory=dict)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    #: Jobs that became final in this transaction (long-polls wake when it commits).
    finished: list[str] = field(default_factory=list)
    begun: bool = False
    opened_at: float = 0.0
    futures: list[asyncio.Future[Any]] = field(default_factory=list)

    @property
    def pending(self) -> bool:
        return bool(self.records or self.rows or self.offsets or self.begun)

    def add(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> None:
        if not self.begun and not self.records and not self.rows and not self.offsets:
            self.opened_at = asyncio.get_running_loop().time()
        self.records.append(Record(topic, key, value, headers or [], partition))

    def extend(self, records: list[Record]) -> None:
        if records:
            self.touch()
            self.records.extend(records)

    def touch(self) -> None:
        if not self.pending:
            self.opened_at = asyncio.get_running_loop().time()

    async def send(self, records: list[Record]) -> None:
        if not self.begun:
            await self.producer.begin_transaction()
            self.begun = True
        for record in records:
            future = await self.producer.send(
                record.topic,
                record.value,
                key=record.key,
                partition=record.partition,
                headers=record.headers,
            )
            self.futures.append(future)

    async def commit(self, changelog: str) -> None:
        """Send what is queued and the input offsets, and commit; raises when the commit fails.

        The offsets go to the partition's changelog (`o:<topic>`), not to the consumer group:
        two round trips fewer per commit than `send_offsets_to_transaction`, and the position
        is restored with the state it belongs to.
        """
        if not self.pending:
            return
        offsets = [
            Record(changelog, key(OFFSET, tp.topic), str(offset).encode(), [], self.partition)
            for tp, offset in self.offsets.items()
        ]
        await self.send([*self.records, *offsets])
        self.records.clear()
        await self.producer.commit_transaction()
        for future in self.futures:
            future.result()  # surfaces a failed send (the commit would have failed too)
        self.reset()

    async def abort(self) -> None:
        try:
            if self.begun:
                await self.producer.abort_transaction()
        finally:
            self.reset()

    def reset(self) -> None:
        for future in self.futures:
            # A failed transaction fails its sends too: their errors are the commit's, seen.
            future.add_done_callback(_retrieve)
        self.records.clear()
        self.rows.clear()
        self.offsets.clear()
        self.finished.clear()
        self.futures.clear()
        self.begun = False


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
