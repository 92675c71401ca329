"""Agents of the control plane: intake, results, the job agent (sole writer of jobs), timers.

Inputs from outside (intake requests, provider results) are parsed here and re-keyed by job_id
onto `cp.commands`; the job agent applies `domain.decide.decide` to each command, writes the new
state and publishes the step's outbox entries. Nothing awaits between reading and writing a job.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import faust
from faust.types import TP, EventT
from opentelemetry.trace import SpanKind

from domain.codec import DecodeError, decode_command, decode_intake, decode_result, encode
from domain.commands import CancelJob, Command, CreateJob, MarkPublished, RecordResult, Tick
from domain.decide import decide
from domain.ids import job_id_for
from domain.job import Job, OutboxEntry
from domain.messages import CancelRequest, Dispatch, JobRequest, TraceContext
from domain.outbox import render
from streams.app import app, metrics, rocksdb_options, runtime, settings, topics
from streams.deadletter import dead_letter_record, send_dead_letter
from streams.tracing import from_headers, span, to_headers, trace_id
from tables.exceptions import StateCorrupted
from tables.jobs import TABLE_NAME, decode_job, encode_job

log = logging.getLogger(__name__)

#: An outbox entry not marked published after this long is published again.
OUTBOX_RETRY = timedelta(seconds=settings.outbox_retry_s)
#: After a rebalance, overdue timers wait this long for answers still queued on cp.results.
REBALANCE_GRACE = timedelta(seconds=5)
#: How often a timer held behind unread results looks again; how long the results agent may
#: make no progress before the hold ends; the longest a timer is held at all.
RESULTS_GATE_RECHECK = timedelta(milliseconds=200)
RESULTS_GATE_IDLE = timedelta(seconds=1)
RESULTS_GATE_MAX = timedelta(seconds=60)
#: Delivered-but-unmarked outbox entries of a job with nothing else to do wait this long for a tick.
MARK_SETTLE = timedelta(seconds=30)
#: A tick not applied within this long (lost with a failed send) is sent again.
TICK_RESEND = timedelta(seconds=60)

_job_schema = faust.Schema(
    key_type=str, value_type=bytes, key_serializer="raw", value_serializer="raw"
)
jobs = app.Table(
    TABLE_NAME,
    schema=_job_schema,
    partitions=topics.commands.partitions,
    changelog_topic=app.topic(
        settings.topic("{app_id}-jobs-changelog"),
        schema=_job_schema,
        partitions=topics.commands.partitions,
        compacting=True,
        internal=True,
    ),
    options=rocksdb_options(settings),
)
# faust derives table serializers from the value type ("json" for bytes); the codec is ours.
jobs.key_serializer = "raw"
jobs.value_serializer = "raw"


class JobCache:
    """Jobs this worker last wrote, so a step skips decoding its own write back.

    Only the job agent writes the table, so the cache is exact while the partitions stay here;
    it is dropped whenever partitions are revoked.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.jobs: OrderedDict[str, Job] = OrderedDict()

    def get(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is not None:
            self.jobs.move_to_end(job_id)
        return job

    def put(self, job_id: str, job: Job) -> None:
        self.jobs[job_id] = job
        self.jobs.move_to_end(job_id)
        while len(self.jobs) > self.size:
            self.jobs.popitem(last=False)


_job_cache = JobCache(size=settings.job_cache_size)


@app.on_partitions_revoked.connect
async def _forget_cached_jobs(sender: Any, revoked: Any, **_: Any) -> None:
    _job_cache.jobs.clear()


def _headers(event: EventT) -> list[tuple[str, bytes | None]]:
    headers: Any = event.message.headers
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers or [])


async def _dead_letter(event: EventT, reason: str, detail: str) -> None:
    message = event.message
    metrics.dead_letters.labels(reason, message.topic).inc()
    await send_dead_letter(
        topics.dlq,
        dead_letter_record(
            reason=reason,
            detail=detail,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key if isinstance(message.key, bytes | None) else str(message.key).encode(),
            payload=message.value if isinstance(message.value, bytes) else None,
        ),
    )


async def _guarded(handler: Callable[[EventT], Awaitable[None]], event: EventT, agent: str) -> None:
    """Run a handler; a bug must not lose the record: it goes to the DLQ and the stream moves on."""
    try:
        await handler(event)
    except Exception as exc:
        log.exception("agent failed", extra={"event": "agent.error", "agent": agent})
        await _dead_letter(event, "agent_error", f"{exc!r}\n{traceback.format_exc(limit=5)}")


async def send_command(
    job_id: str, payload: bytes, headers: list[tuple[str, bytes]] | None = None
) -> Any:
    """Send a command keyed by job_id; returns the delivery future (batched by the producer)."""
    return await _send(topics.commands, job_id.encode(), payload, headers)


async def _send(
    topic: Any, key: bytes, value: bytes, headers: list[tuple[str, bytes]] | None
) -> Any:
    # The producer directly: faust's Topic.send costs more than the message itself here.
    return await app.producer.send(topic.get_topic_name(), key, value, None, None, headers or [])


# -- intake ---------------------------------------------------------------------------------------


@app.agent(topics.intake, name="intake")
async def intake(stream: Any) -> AsyncIterator[None]:
    """Validate producer requests and hand them to the job agent keyed by job_id."""
    async for event in stream.events():
        await _guarded(_accept, event, "intake")
        yield None


async def _accept(event: EventT) -> None:
    message = event.message
    try:
        request = decode_intake(event.value, max_bytes=settings.max_request_bytes)
    except DecodeError as exc:
        await _dead_letter(event, exc.reason, exc.detail)
        return
    if request.tenant_id is None:
        await _dead_letter(event, "schema", "tenant_id: required on Kafka intake")
        return
    now = datetime.now(UTC)
    command_id = f"intake:{message.topic}:{message.partition}:{message.offset}"
    if isinstance(request, CancelRequest):
        job_id = request.job_id or job_id_for(request.tenant_id, request.request_id or "")
        cancel = CancelJob(
            command_id=command_id,
            job_id=job_id,
            at=now,
            tenant_id=request.tenant_id,
            reason=request.reason or "cancelled by producer",
        )
        await send_command(job_id, encode(cancel))
        return
    job_id = job_id_for(request.tenant_id, request.request_id)
    with span(
        "intake",
        from_headers(_headers(event)),
        kind=SpanKind.CONSUMER,
        job_id=job_id,
        tenant_id=request.tenant_id,
    ) as trace:
        await _create(job_id, request, trace, command_id, now)


async def _create(
    job_id: str, request: JobRequest, trace: TraceContext, command_id: str, now: datetime
) -> None:
    assert request.tenant_id is not None
    create = CreateJob(
        command_id=command_id,
        job_id=job_id,
        at=now,
        tenant_id=request.tenant_id,
        fingerprint=request.fingerprint(),
        request=request,
        trace=trace,
        source="kafka",
    )
    await send_command(job_id, encode(create), to_headers(trace))


# -- results --------------------------------------------------------------------------------------


@app.agent(topics.results, name="results")
async def results(stream: Any) -> AsyncIterator[None]:
    """Re-key provider result events by job_id onto the command topic."""
    async for event in stream.events():
        await _guarded(_ingest, event, "results")
        runtime.results_read[event.message.partition] = event.message.offset
        yield None


async def _ingest(event: EventT) -> None:
    try:
        result = decode_result(event.value, max_bytes=settings.max_request_bytes)
    except DecodeError as exc:
        await _dead_letter(event, exc.reason, exc.detail)
        return
    with span(
        "result.ingest",
        result.trace,
        kind=SpanKind.CONSUMER,
        job_id=result.job_id,
        attempt_id=result.attempt_id,
        provider=result.provider,
        result=result.type,
    ) as trace:
        command = RecordResult(
            # The record's position, not the event id: a redelivered record is a duplicate
            # command, a provider re-sending an answer is a duplicate result the job records.
            command_id=f"result:{event.message.topic}:{event.message.partition}"
            f":{event.message.offset}",
            job_id=result.job_id,
            at=datetime.now(UTC),
            result=result.model_copy(update={"trace": trace}),
        )
        await send_command(result.job_id, encode(command), to_headers(trace))


# -- the job agent --------------------------------------------------------------------------------


@app.agent(topics.commands, name="jobs", concurrency=1)
async def job_agent(stream: Any) -> AsyncIterator[None]:
    """Apply each command to its job: the only writer of the job table."""
    async for event in stream.events():
        await _guarded(_apply, event, "jobs")
        yield None


async def _apply(event: EventT) -> None:
    try:
        command = decode_command(event.value)
    except DecodeError as exc:
        await _dead_letter(event, exc.reason, exc.detail)
        return
    try:
        job = _job_cache.get(command.job_id) or decode_job(jobs.get(command.job_id))
    except StateCorrupted as exc:
        await _dead_letter(event, "state_corrupted", str(exc))
        return
    parent = _parent_trace(command, job)
    with span(f"job.{command.kind}", parent, job_id=command.job_id):
        await _step(event, command, job)


def _parent_trace(command: Command, job: Job | None) -> TraceContext | None:
    if isinstance(command, CreateJob):
        return command.trace
    if isinstance(command, RecordResult):
        return command.result.trace
    return job.trace if job is not None else None


async def _step(event: EventT, command: Command, job: Job | None) -> None:
    context = runtime.context()
    delivered = runtime.delivered.pop(command.job_id, None)
    if job is not None and delivered:
        # Outbox entries Kafka has acknowledged since this job's last step: mark them first.
        mark = MarkPublished(
            command_id=f"published:{command.command_id}",
            job_id=command.job_id,
            at=max(delivered.values()),
            entry_ids=sorted(delivered),
        )
        job = decide(job, mark, context).job
    decision = decide(job, command, context)
    new = decision.job
    if new is not None and (new is not job or delivered):
        jobs[command.job_id] = encode_job(new)
        _job_cache.put(command.job_id, new)
    for observation in decision.observations:
        runtime.health.observe(observation)
    if new is not None and decision.outcome != "duplicate_command":
        metrics.observe_step(job, new)
    if decision.dead_letter is not None:
        await _dead_letter(event, *decision.dead_letter)
    if new is None:
        return
    publish = list(decision.publish)
    stale_before = command.at - OUTBOX_RETRY
    already = {entry.entry_id for entry in publish}
    if isinstance(command, Tick):
        publish.extend(
            e for e in new.outbox if e.entry_id not in already and e.created_at <= stale_before
        )
    if publish:
        await publish_outbox(new, publish)
    runtime.wake.set(new.job_id, _wake_time(new))
    timer = new.next_wake()
    if timer is None:
        runtime.timers.pop(new.job_id, None)
    else:
        runtime.timers[new.job_id] = timer
    runtime.settling.discard(new.job_id)
    if new.outbox:
        runtime.outbox_ids[new.job_id] = frozenset(e.entry_id for e in new.outbox)
    else:
        runtime.outbox_ids.pop(new.job_id, None)
    if decision.outcome not in ("noop", "duplicate_command"):
        log.info(
            "job step",
            extra={
                "event": f"job.{decision.outcome}",
                "job_id": new.job_id,
                "tenant_id": new.tenant_id,
                "state": new.status.value,
                "attempt_id": new.current.attempt_id if new.current else None,
                "provider": new.current.provider if new.current else None,
                "trace_id": trace_id(new.trace),
            },
        )


def _wake_time(job: Job) -> datetime | None:
    times = [t for t in (job.next_wake(),) if t is not None]
    if job.outbox:
        times.append(min(entry.created_at for entry in job.outbox) + OUTBOX_RETRY)
    return min(times) if times else None


async def publish_outbox(job: Job, entries: Iterable[OutboxEntry]) -> None:
    """Send outbox entries now; once Kafka has them, tell the job agent to drop them."""
    headers = to_headers(job.trace)
    key = job.job_id.encode()
    pending: list[tuple[str, Any]] = []
    for entry in entries:
        topic = _topic_for(entry)
        if topic is None:
            log.error(
                "no topic for outbox entry", extra={"entry": entry.entry_id, "job_id": job.job_id}
            )
            continue
        message = render(job, entry)
        if isinstance(message, Dispatch):
            with span(
                f"dispatch {message.provider}",
                job.trace,
                kind=SpanKind.PRODUCER,
                job_id=job.job_id,
                attempt_id=message.attempt_id,
                provider=message.provider,
            ) as trace:
                message = message.model_copy(update={"trace": trace})
                future = await _send(topic, key, encode(message), to_headers(trace))
        else:
            future = await _send(topic, key, encode(message), headers)
        pending.append((entry.entry_id, future))
    if pending:
        task = asyncio.ensure_future(_note_delivery(job.job_id, pending))
        _background.add(task)
        task.add_done_callback(_background.discard)


_background: set[asyncio.Future[None]] = set()


def _topic_for(entry: OutboxEntry) -> Any:
    if entry.topic == "events":
        return topics.events
    if entry.topic == "responses":
        return topics.responses
    return topics.dispatch.get(entry.provider or "")


async def _note_delivery(job_id: str, pending: list[tuple[str, Any]]) -> None:
    """Remember what Kafka acknowledged; the job's next command marks it published."""
    for entry_id, future in pending:
        try:
            await future
        except Exception:  # noqa: BLE001 (left pending: the timer publishes it again)
            log.warning("outbox send failed", extra={"job_id": job_id, "entry": entry_id})
            continue
        runtime.delivered.setdefault(job_id, {})[entry_id] = datetime.now(UTC)


# -- timers ---------------------------------------------------------------------------------------

_assignment_seen: frozenset[Any] = frozenset()


@app.timer(interval=settings.timer_interval_s)
async def tick_due_jobs() -> None:
    """Turn deadlines, backoffs, attempt timeouts and stale outboxes into Tick commands."""
    try:
        await _tick_due_jobs()
    except Exception:  # a timer that raises would stop the whole worker
        log.exception("timer failed", extra={"event": "timers.failed"})


async def _tick_due_jobs() -> None:
    global _assignment_seen  # noqa: PLW0603 (one timer per worker owns it)
    if app.rebalancing or app.in_recovery or not app.tables.recovery.completed.is_set():
        return
    assignment = frozenset(app.assignor.assigned_actives())
    if assignment != _assignment_seen:
        _assignment_seen = assignment
        await rebuild_wake_index()
    now = datetime.now(UTC)
    for job_id in runtime.wake.pop_due(now):
        if _only_marks_pending(job_id, now) or _results_behind(job_id, now):
            continue
        tick = Tick(
            command_id=f"tick:{job_id}:{int(now.timestamp() * 1000)}", job_id=job_id, at=now
        )
        await send_command(job_id, encode(tick))
        # No second tick while this one waits in the command topic: under load that would
        # multiply commands. The job agent re-arms the timer when it applies a command.
        runtime.wake.set(job_id, now + TICK_RESEND)


def _results_behind(job_id: str, now: datetime) -> bool:
    """Hold a job's timer until every result that reached cp.results before it fired is re-keyed.

    Under backlog an answer can wait in cp.results while its attempt's timeout comes due; the
    tick must queue behind it on cp.commands, or the timeout wins a race the provider won. The
    hold ends when the results agent has read up to the end offset seen when the timer came due,
    or when it makes no progress on that partition for a while (nothing is queued: after a
    restart our count of what was read starts empty), and never lasts longer than a cap.
    """
    timer = runtime.timers.get(job_id)
    if timer is None or timer > now:
        return False
    partition = job_partition(job_id)
    read = runtime.results_read.get(partition, -1)
    gate = runtime.results_gate.get(job_id)
    if gate is None:
        try:
            target = app.consumer.highwater(TP(topics.results.get_topic_name(), partition))
        except Exception:  # noqa: BLE001 (no position known: do not hold the timer)
            return False
        if not target:
            return False
        gate = ResultsGate(target=target, read=read, progress_at=now, since=now)
    if read + 1 >= gate.target or now - gate.since > RESULTS_GATE_MAX:
        runtime.results_gate.pop(job_id, None)
        return False
    if read != gate.read:
        gate = gate._replace(read=read, progress_at=now)
    elif now - gate.progress_at > RESULTS_GATE_IDLE:
        runtime.results_gate.pop(job_id, None)
        return False
    runtime.results_gate[job_id] = gate
    runtime.wake.set(job_id, now + RESULTS_GATE_RECHECK)
    return True


class ResultsGate(NamedTuple):
    target: int
    read: int
    progress_at: datetime
    since: datetime


def job_partition(job_id: str) -> int:
    return int(
        app.producer.key_partition(topics.commands.get_topic_name(), job_id.encode()).partition
    )


def _only_marks_pending(job_id: str, now: datetime) -> bool:
    """Say whether a due job only owes marks for entries Kafka already has, and defer it.

    Those marks ride along with the job's next command. A job that expects none (it is final,
    or waits for a provider) gets one tick later, so a backlog does not breed ticks.
    """
    pending = runtime.outbox_ids.get(job_id)
    delivered = runtime.delivered.get(job_id, {})
    if not pending or not pending <= delivered.keys():
        return False
    timer = runtime.timers.get(job_id)
    if timer is not None and timer <= now:
        return False
    if job_id in runtime.settling:
        runtime.settling.discard(job_id)
        return False
    runtime.settling.add(job_id)
    runtime.wake.set(job_id, min(timer, now + MARK_SETTLE) if timer else now + MARK_SETTLE)
    return True


async def rebuild_wake_index() -> None:
    """After a rebalance, find every job of our partitions that needs a timer or a republish.

    Pending outbox entries are published again right away. Timers already overdue get a grace
    period first: answers that arrived while no worker owned the partition are still queued on
    cp.results, and a timeout must not beat them.
    """
    runtime.wake.clear()
    runtime.timers.clear()
    runtime.outbox_ids.clear()
    runtime.settling.clear()
    runtime.results_gate.clear()
    count = 0
    live: list[str] = []
    grace = datetime.now(UTC) + REBALANCE_GRACE
    for key, raw in jobs.items():
        job_id = key.decode() if isinstance(key, bytes) else str(key)
        try:
            job = decode_job(raw)
        except StateCorrupted:
            log.exception("unreadable job during sweep", extra={"job_id": job_id})
            continue
        if job is None:
            continue
        if job.outbox:
            await publish_outbox(job, job.outbox)
        when = job.next_wake()
        if when is not None:
            runtime.timers[job_id] = when
        if job.outbox:
            runtime.outbox_ids[job_id] = frozenset(e.entry_id for e in job.outbox)
        if job.outbox:
            when = min(when, grace) if when is not None else grace
        runtime.wake.set(job_id, max(when, grace) if when is not None else None)
        count += 1
        if not job.terminal:
            live.append(job_id)
    metrics.reset_in_flight(live)
    log.info("timer index rebuilt", extra={"event": "timers.rebuilt", "jobs": count})
