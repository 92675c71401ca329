"""Agent-tier fixtures and helpers: a real `JobCore` driven one record at a time, no broker.

The core is built as `streams.app` builds it (real settings, catalogue, policy and metrics) but
without importing `streams.app`, which would create the faust app. Instead of a consumer, tests
hand `ConsumerRecord`s to `JobCore._consume`; instead of transactional producers, each partition's
`Transaction` gets a `FakeProducer` that records what a commit sends. Steps only queue records in
their partition's transaction, so what a step did is read from `Driver.pending`; `Driver.commit`
runs the core's own flush and commit, after which the records are in `Driver.committed`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry

from domain.codec import decode_command, encode
from domain.commands import Command
from domain.ids import job_id_for
from domain.job import Job
from domain.messages import DeadLetter, ProviderResult
from streams.core import JobCore
from streams.metrics import Metrics
from streams.partition import Partition
from streams.placement import partition_for
from streams.runtime import Runtime
from streams.settings import Settings
from streams.topology import catalogue_topology
from streams.txn import Record, Transaction

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 8
TENANT = "acme"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

Headers = list[tuple[str, bytes]]


# -- messages --------------------------------------------------------------------------------------


def request_body(request_id: str, *, tenant: str | None = TENANT, **fields: Any) -> dict[str, Any]:
    """A valid cp.intake job request (tenant_id left out when `tenant` is None)."""
    body: dict[str, Any] = {
        "request_id": request_id,
        "messages": [{"role": "user", "content": "Say hello."}],
        **fields,
    }
    if tenant is not None:
        body["tenant_id"] = tenant
    return body


def as_bytes(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body)


def request_id_on(partition: int, *, prefix: str = "req", tenant: str = TENANT) -> str:
    """The first request id `<prefix>-<n>` whose job lands on `partition` (deterministic)."""
    for n in itertools.count():
        request_id = f"{prefix}-{n}"
        if partition_for(job_id_for(tenant, request_id), PARTITIONS) == partition:
            return request_id
    raise AssertionError("unreachable")


def provider_result(job_id: str, attempt_id: str, provider: str, model: str, **fields: Any) -> Any:
    kind = fields.pop("type", "completed")
    return ProviderResult(
        event_id=fields.pop("event_id", f"{attempt_id}:{kind}"),
        type=kind,
        job_id=job_id,
        attempt_id=attempt_id,
        provider=provider,
        model=model,
        occurred_at=datetime.now(UTC),
        **fields,
    )


def header(record: Record, name: str) -> bytes | None:
    return next((v for k, v in record.headers if k == name), None)


# -- fakes ---------------------------------------------------------------------------------------


@dataclass
class FakeProducer:
    """Stands in for a partition's transactional producer: records calls and sent records."""

    calls: list[str] = field(default_factory=list)
    sent: list[Record] = field(default_factory=list)

    async def begin_transaction(self) -> None:
        self.calls.append("begin")

    async def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: Headers | None = None,
    ) -> asyncio.Future[None]:
        self.calls.append("send")
        self.sent.append(Record(topic, key, value, list(headers or []), partition))
        await asyncio.sleep(0)  # a real send may yield to other tasks: let them run here
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    #: How many of the next commits fail (as a broker error or a fence would make them).
    fail_commits: int = 0

    #: When set, a commit waits for it (a commit the broker has not answered yet).
    hold_commits: asyncio.Event | None = None

    async def commit_transaction(self) -> None:
        self.calls.append("commit")
        if self.hold_commits is not None:
            await self.hold_commits.wait()
        if self.fail_commits:
            self.fail_commits -= 1
            raise RuntimeError("commit refused")

    async def abort_transaction(self) -> None:
        self.calls.append("abort")

    async def stop(self) -> None:
        self.calls.append("stop")


@dataclass
class FakeConsumer:
    """What the attempt-timeout gate asks of the consumer: assignment, cp.results' high water."""

    highwaters: dict[int, int | None] = field(default_factory=dict)
    topic: str = ""
    rejoins: int = 0
    stopped: bool = False

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.highwaters.get(tp.partition)

    @property
    def _coordinator(self) -> FakeConsumer:
        return self

    def request_rejoin(self) -> None:
        self.rejoins += 1

    async def stop(self) -> None:
        self.stopped = True

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(self.topic, p) for p in range(PARTITIONS)}


# -- the driver ----------------------------------------------------------------------------------


@dataclass
class Driver:
    """A job core holding every partition, fed records by hand."""

    core: JobCore
    producers: dict[int, FakeProducer]
    consumer: FakeConsumer
    committed: list[Record] = field(default_factory=list)
    _offsets: defaultdict[tuple[str, int], Iterator[int]] = field(
        default_factory=lambda: defaultdict(itertools.count)
    )

    # -- names

    @property
    def settings(self) -> Settings:
        return self.core.settings

    def topic(self, name: str) -> str:
        return self.settings.topic(name)

    def partition_of(self, job_id: str) -> int:
        return self.core.partition_of(job_id)

    def part(self, job_id: str) -> Partition:
        return self.core.parts[self.partition_of(job_id)]

    def txn(self, job_id: str) -> Transaction:
        return self.core.txns[self.partition_of(job_id)]

    def job(self, job_id: str) -> Job | None:
        return self.core.job(job_id)

    # -- input

    def record(
        self,
        topic: str,
        partition: int,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Iterable[tuple[str, bytes]] = (),
    ) -> ConsumerRecord[bytes, bytes]:
        """A record of a logical topic at the next offset of its partition."""
        real = self.topic(topic)
        return ConsumerRecord(
            topic=real,
            partition=partition,
            offset=next(self._offsets[(real, partition)]),
            timestamp=0,
            timestamp_type=0,
            key=key,
            value=value,
            checksum=None,
            serialized_key_size=len(key) if key is not None else -1,
            serialized_value_size=len(value) if value is not None else -1,
            headers=tuple(headers),
        )

    def consume(
        self,
        topic: str,
        partition: int,
        *values: bytes | None,
        key: bytes | None = None,
        headers: Iterable[tuple[str, bytes]] = (),
    ) -> list[ConsumerRecord[bytes, bytes]]:
        """Hand one batch of records of a logical topic's partition to the core."""
        fixed = list(headers)
        records = [self.record(topic, partition, v, key=key, headers=fixed) for v in values]
        self.core._consume(TopicPartition(self.topic(topic), partition), records)
        return records

    def intake(
        self,
        body: dict[str, Any] | bytes | None,
        *,
        partition: int = 0,
        key: bytes | None = None,
        headers: Iterable[tuple[str, bytes]] = (),
    ) -> ConsumerRecord[bytes, bytes]:
        value = as_bytes(body) if isinstance(body, dict) else body
        [record] = self.consume("cp.intake", partition, value, key=key, headers=headers)
        return record

    def command(
        self, command: Command | bytes, *, partition: int | None = None, key: bytes | None = None
    ) -> ConsumerRecord[bytes, bytes]:
        """Put a command on cp.commands, by default on its job's partition keyed by job_id."""
        if isinstance(command, bytes):
            value = command
            assert partition is not None
        else:
            value = encode(command)
            partition = self.partition_of(command.job_id) if partition is None else partition
            key = command.job_id.encode() if key is None else key
        [record] = self.consume("cp.commands", partition, value, key=key)
        return record

    def result(
        self, result: ProviderResult, *, partition: int | None = None
    ) -> ConsumerRecord[bytes, bytes]:
        """Put a provider result on cp.results, by default on its job's partition."""
        number = self.partition_of(result.job_id) if partition is None else partition
        [record] = self.consume("cp.results", number, encode(result), key=result.job_id.encode())
        return record

    def redeliver(self, record: Record) -> ConsumerRecord[bytes, bytes]:
        """Consume a record the core produced (a re-keyed command) where Kafka would put it."""
        assert record.topic == self.topic("cp.commands") and record.partition is not None
        [consumed] = self.consume(
            "cp.commands", record.partition, record.value, key=record.key, headers=record.headers
        )
        return consumed

    # -- output

    def pending(self, topic: str | None = None) -> list[Record]:
        """Records queued in the open transactions (partition order, then queue order)."""
        records = [r for n in sorted(self.core.txns) for r in self.core.txns[n].records]
        return records if topic is None else [r for r in records if r.topic == self.topic(topic)]

    def pending_commands(self) -> list[Command]:
        return [decode_command(r.value) for r in self.pending("cp.commands")]

    def dead(self) -> list[DeadLetter]:
        return dead_letters(self.pending("cp.dlq"))

    def reasons(self) -> list[str]:
        return [letter.reason for letter in self.dead()]

    def sent_to(self, records: list[Record], topic: str) -> list[Record]:
        return [r for r in records if r.topic == self.topic(topic)]

    def dispatches(self, records: list[Record] | None = None) -> list[Record]:
        prefix = self.topic("cp.dispatch.")
        return [
            r
            for r in (self.pending() if records is None else records)
            if r.topic.startswith(prefix)
        ]

    async def commit(self) -> list[Record]:
        """Flush and commit every open transaction; return what this commit produced."""
        before = {n: len(p.sent) for n, p in self.producers.items()}
        await self.core._commit_all()
        produced = [r for n, p in sorted(self.producers.items()) for r in p.sent[before[n] :]]
        self.committed.extend(produced)
        return produced

    # -- whole flows

    async def admit(self, request_id: str, *, partition: int = 0, **fields: Any) -> Record:
        """Run a request through intake and commit: return the CreateJob record it produced."""
        self.intake(request_body(request_id, **fields), partition=partition)
        [create] = self.sent_to(await self.commit(), "cp.commands")
        return create

    async def create(self, request_id: str, **fields: Any) -> Job:
        """Admit a request, apply its CreateJob and commit: return the job as stored."""
        self.redeliver(await self.admit(request_id, **fields))
        await self.commit()
        job = self.job(job_id_for(TENANT, request_id))
        assert job is not None
        return job


def dead_letters(records: list[Record]) -> list[DeadLetter]:
    return [DeadLetter.model_validate_json(r.value or b"") for r in records]


@pytest.fixture
def settings() -> Settings:
    return Settings(
        app_id="agents",
        topic_prefix="agents-tier.",
        topics_file=ROOT / "topics.yaml",
        catalogue_file=ROOT / "config" / "catalogue.yaml",
        policy_file=ROOT / "config" / "policy.yaml",
        fault_injection=True,
    )


@pytest.fixture
def make_driver(settings: Settings) -> Callable[..., Driver]:
    """Build a job core holding the given partitions (all of them by default)."""

    def make(partitions: Iterable[int] = range(PARTITIONS)) -> Driver:
        runtime = Runtime.load(settings)
        metrics = Metrics(CollectorRegistry(), circuits=runtime.circuits)
        topology = catalogue_topology(settings.topics_file, settings.catalogue_file)
        assert topology.job_partitions() == PARTITIONS
        core = JobCore(
            settings,
            runtime,
            metrics,
            url="http://agents.test",
            partitions=PARTITIONS,
            dispatch_topics={
                provider: settings.topic(spec.name)
                for provider, spec in topology.dispatch_topics().items()
            },
        )
        consumer = FakeConsumer(topic=core.results_topic)
        core.consumer = cast(AIOKafkaConsumer, consumer)
        producers = {n: FakeProducer() for n in partitions}
        for number, producer in producers.items():
            core.parts[number] = Partition(number)
            # The twin shares the fake producer: what a partition sends is recorded in one place.
            core.txns[number] = Transaction(number, cast(AIOKafkaProducer, producer))
            core.twins[number] = Transaction(number, cast(AIOKafkaProducer, producer))
        core.assigned = set(producers)
        # No group coordinator here: the membership it would confirm holds for the whole test.
        core.lease.until = float("inf")
        return Driver(core, producers, consumer)

    return make


@pytest.fixture
def driver(make_driver: Callable[..., Driver]) -> Driver:
    return make_driver()
