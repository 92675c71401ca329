"""The provider worker's graceful stop, offset bookkeeping and handled-keys pruning, without Kafka.

The worker runs its real code with a fake consumer and producer that log what happens in order,
and an adapter whose calls sleep as long as each test says.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

from domain.catalogue import load_catalogue
from domain.codec import encode
from domain.messages import Dispatch, Output, ProviderCancel
from providers.base import Completed, Outcome
from providers.worker import HandledKeys, OffsetTracker, ProviderWorker
from streams.settings import Settings
from tests.unit.providers.conftest import MakeDispatch

ROOT = Path(__file__).resolve().parents[3]
TOPIC = "cp.dispatch.sim-cheap"
TP = TopicPartition(TOPIC, 0)


@dataclass
class Record:
    value: bytes
    offset: int
    topic: str = TOPIC
    partition: int = 0
    key: bytes | None = None


@dataclass
class FakeProducer:
    log: list[tuple[str, Any]]
    values: list[dict[str, Any]] = field(default_factory=list)

    async def send(
        self, topic: str, *, value: bytes, key: bytes, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        result = orjson.loads(value)
        self.values.append(result)
        self.log.append(("sent", (result["type"], result["attempt_id"])))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def flush(self) -> None:
        self.log.append(("flush", None))

    async def stop(self) -> None:
        self.log.append(("producer.stop", None))


@dataclass
class FakeConsumer:
    log: list[tuple[str, Any]]
    paused: set[TopicPartition] = field(default_factory=set)

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)
        self.log.append(("pause", None))

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.log.append(("commit", dict(offsets)))

    async def stop(self) -> None:
        self.log.append(("consumer.stop", None))


class SleepyAdapter:
    """Answers every call after the delay set for its attempt (default 0)."""

    name = "sim-cheap"
    kind = "simulated"

    def __init__(self) -> None:
        self.delays: dict[str, float] = {}
        self.calls: list[str] = []

    async def call(self, dispatch: Dispatch) -> Outcome:
        self.calls.append(dispatch.attempt_id)
        await asyncio.sleep(self.delays.get(dispatch.attempt_id, 0.0))
        return Completed(
            output=Output(text="hi", finish_reason="stop"),
            raw_usage=None,
            usage_shape=None,
            latency_ms=1,
            model=dispatch.model,
        )

    async def close(self) -> None:
        pass


@dataclass
class Rig:
    worker: ProviderWorker
    adapter: SleepyAdapter
    log: list[tuple[str, Any]]
    make: Callable[[int], Record]

    def committed(self) -> list[int]:
        return [offsets[TP] for kind, offsets in self.log if kind == "commit" and TP in offsets]

    def sent(self, kind: str) -> list[str]:
        return [what[1] for entry, what in self.log if entry == "sent" and what[0] == kind]

    async def take(self, record: Record) -> None:
        """What the poll loop does with one record."""
        self.worker.tracker.start(TP, record.offset)
        await self.worker.handle(TP, record)


@pytest.fixture
async def rig(
    tmp_path: Path, make_dispatch: MakeDispatch, request: pytest.FixtureRequest
) -> AsyncIterator[Rig]:
    options: dict[str, Any] = getattr(request, "param", {})
    settings = Settings(
        topics_file=ROOT / "topics.yaml",
        catalogue_file=ROOT / "config" / "catalogue.yaml",
        provider_data_dir=tmp_path / "providers",
        provider_shutdown_grace_s=options.get("grace_s", 5.0),
        provider_concurrency=options.get("concurrency", 8),
    )
    adapter = SleepyAdapter()
    worker = ProviderWorker(
        settings,
        load_catalogue(settings.catalogue_file),
        {"sim-cheap": adapter},
        data_dir=settings.provider_data_dir,
    )
    await worker.consumer.stop()  # never started: closed so that nothing warns
    await worker.producer.stop()
    log: list[tuple[str, Any]] = []
    worker.producer = FakeProducer(log)
    worker.consumer = FakeConsumer(log)

    def make(offset: int) -> Record:
        dispatch = make_dispatch(
            provider="sim-cheap",
            model="sim-cheap-1",
            provider_attempt_no=offset + 1,
            idempotency_key=f"job-1:att-{offset + 1}",
        )
        return Record(value=encode(dispatch), offset=offset)

    yield Rig(worker, adapter, log, make)
    for task in worker.inflight.values():
        task.cancel()


def key(offset: int) -> str:
    return f"job-1:att-{offset + 1}"


# -- graceful stop --------------------------------------------------------------------------------


async def test_calls_finishing_within_grace_publish_before_commit_and_mark(rig: Rig) -> None:
    rig.adapter.delays = {"att-1": 0.05, "att-2": 0.2}
    for offset in (0, 1):
        await rig.take(rig.make(offset))
    rig.worker.request_stop()
    await rig.worker.shutdown()

    assert rig.sent("completed") == ["att-1", "att-2"]
    assert rig.committed()[-1] == 2
    # Fetching paused first; every result out and flushed before the commit.
    kinds = [entry for entry, _ in rig.log]
    last_sent = max(i for i, kind in enumerate(kinds) if kind == "sent")
    assert kinds.index("pause") < kinds.index("flush") < kinds.index("commit")
    assert last_sent < kinds.index("flush")
    reopened = HandledKeys(rig.worker.settings.provider_data_dir)
    try:
        assert key(0) in reopened and key(1) in reopened
    finally:
        reopened.close()


@pytest.mark.parametrize("rig", [{"grace_s": 0.3}], indirect=True)
async def test_call_outlasting_grace_is_abandoned_unmarked_and_uncommitted(rig: Rig) -> None:
    rig.adapter.delays = {"att-1": 0.01, "att-2": 30.0, "att-3": 0.01}
    for offset in (0, 1, 2):
        await rig.take(rig.make(offset))
    await asyncio.sleep(0.05)  # att-1 and att-3 done, att-2 running
    rig.worker.request_stop()
    started = time.monotonic()
    await rig.worker.shutdown()

    assert time.monotonic() - started < 2
    assert rig.sent("started") == ["att-1", "att-2", "att-3"]
    assert rig.sent("completed") == ["att-1", "att-3"]
    # The commit stops at the abandoned dispatch: the next worker gets it (and att-3) again.
    assert rig.committed() and max(rig.committed()) == 1
    reopened = HandledKeys(rig.worker.settings.provider_data_dir)
    try:
        assert key(0) in reopened and key(2) in reopened
        assert key(1) not in reopened
    finally:
        reopened.close()


@pytest.mark.parametrize("rig", [{"grace_s": 60.0}], indirect=True)
async def test_second_stop_signal_ends_the_grace_period(rig: Rig) -> None:
    rig.adapter.delays = {"att-1": 30.0}
    await rig.take(rig.make(0))
    await asyncio.sleep(0.01)
    rig.worker.request_stop()
    loop = asyncio.get_running_loop()
    loop.call_later(0.2, rig.worker.request_stop)
    started = time.monotonic()
    await rig.worker.shutdown()

    assert time.monotonic() - started < 2
    assert rig.sent("completed") == []
    assert all(offset == 0 for offset in rig.committed())
    reopened = HandledKeys(rig.worker.settings.provider_data_dir)
    try:
        assert key(0) not in reopened
    finally:
        reopened.close()


@pytest.mark.parametrize("rig", [{"concurrency": 1}], indirect=True)
async def test_stopping_takes_no_dispatch_waiting_for_a_slot(rig: Rig) -> None:
    rig.adapter.delays = {"att-1": 0.3}
    await rig.take(rig.make(0))
    waiting = asyncio.create_task(rig.take(rig.make(1)))  # no free slot: waits
    await asyncio.sleep(0.05)
    assert not waiting.done()
    rig.worker.request_stop()
    await asyncio.wait_for(waiting, 1)
    await rig.worker.shutdown()

    assert rig.adapter.calls == ["att-1"]  # att-2 never started
    assert rig.sent("completed") == ["att-1"]
    assert max(rig.committed()) == 1  # done up to att-1, att-2 left for the next worker


async def test_provider_cancel_still_marks_the_attempt_handled(rig: Rig) -> None:
    rig.adapter.delays = {"att-1": 30.0}
    await rig.take(rig.make(0))
    await asyncio.sleep(0.01)
    cancel = ProviderCancel(
        job_id="job-1", attempt_id="att-1", idempotency_key=key(0), reason="job_cancelled"
    )
    rig.worker.on_cancel(cancel)
    await asyncio.sleep(0.01)
    assert key(0) in rig.worker.handled
    assert rig.worker.tracker.committable() == {TP: 1}
    await rig.worker.shutdown()


# -- offset bookkeeping ---------------------------------------------------------------------------


def test_commit_never_passes_an_unfinished_dispatch() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.start(TP, offset)
    tracker.done(TP, 11)
    tracker.done(TP, 12)
    assert tracker.committable() == {TP: 10}
    tracker.mark_committed({TP: 10})
    assert tracker.committable() == {}
    tracker.done(TP, 10)
    assert tracker.committable() == {TP: 13}


# -- pruning handled keys -------------------------------------------------------------------------


async def test_prune_drops_keys_older_than_the_cutoff(tmp_path: Path) -> None:
    now = time.time()
    store = HandledKeys(tmp_path)
    try:
        for i in range(25):
            store.add(f"old-{i}", now=now - 8 * 86400)
            store.add(f"new-{i}", now=now - 60)
        store._db[b"garbage"] = b"not a time"
        removed = await store.prune(now - 7 * 86400, chunk=4)
        assert removed == 26
        assert all(f"new-{i}" in store for i in range(25))
        assert not any(f"old-{i}" in store for i in range(25))
        assert "garbage" not in store
    finally:
        store.close()
    reopened = HandledKeys(tmp_path)
    try:
        assert "new-0" in reopened and "old-0" not in reopened
    finally:
        reopened.close()


async def test_worker_prunes_at_start(rig: Rig) -> None:
    retention = rig.worker.settings.provider_handled_retention_s
    rig.worker.handled.add("ancient", now=time.time() - retention - 60)
    rig.worker.handled.add("recent", now=time.time() - retention + 60)
    pruning = asyncio.create_task(rig.worker.prune_handled())
    await asyncio.sleep(0.05)
    pruning.cancel()
    assert "ancient" not in rig.worker.handled
    assert "recent" in rig.worker.handled
    rig.worker.handled.close()


# -- what a provider answers must fit what the job core reads --------------------------------------


async def test_an_answer_over_the_result_limit_fails_the_attempt_saying_why(rig: Rig) -> None:
    """Before: a result over the limit was dead-lettered by the job core, which then waited out
    the attempt timeout (or, wrapped near 1 MB, failed the commit)."""
    limit = rig.worker.settings.max_result_bytes

    async def huge(dispatch: Dispatch) -> Outcome:
        return Completed(
            output=Output(text="x" * limit, finish_reason="stop"),
            raw_usage={"input_tokens": 1, "output_tokens": 2},
            usage_shape="openai_chat",
            latency_ms=5,
            model=dispatch.model,
        )

    rig.adapter.call = huge  # type: ignore[method-assign]
    await rig.take(rig.make(0))
    await rig.worker.drain(5.0)

    assert isinstance(rig.worker.producer, FakeProducer)
    [result] = [v for v in rig.worker.producer.values if v["type"] != "started"]
    assert result["type"] == "failed" and result["output"] is None
    assert result["error"]["kind"] == "malformed"
    assert "CP_MAX_RESULT_BYTES" in result["error"]["message"]
    assert len(orjson.dumps(result)) < limit


async def test_raw_usage_past_its_bounds_is_dropped_not_fatal(rig: Rig) -> None:
    deep: dict[str, Any] = {"input_tokens": 3}
    node = deep
    for _ in range(20):
        node["nested"] = {}
        node = node["nested"]

    async def odd_usage(dispatch: Dispatch) -> Outcome:
        return Completed(
            output=Output(text="hi", finish_reason="stop"),
            raw_usage=deep,
            usage_shape="openai_chat",
            latency_ms=5,
            model=dispatch.model,
        )

    rig.adapter.call = odd_usage  # type: ignore[method-assign]
    await rig.take(rig.make(0))
    await rig.worker.drain(5.0)

    assert isinstance(rig.worker.producer, FakeProducer)
    [result] = [v for v in rig.worker.producer.values if v["type"] != "started"]
    assert result["type"] == "completed" and result["raw_usage"] is None
