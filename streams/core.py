"""The job core: the one fenced writer of every job, running inside each control-plane worker.

It consumes cp.intake, cp.commands and cp.results as one consumer group with a co-partitioning
assignor, so partition N of all three belongs to one worker, which holds the jobs hashing to N in
memory (restored from the changelog) and applies `domain.decide.decide` to each input. Each step's
state, effects and input offset commit in the partition's Kafka transaction (`streams.txn`).
Intake requests and results that land on another partition than their job's are re-keyed onto
cp.commands in the same transaction. Timers (deadlines, backoff, attempt timeouts) and retention
run here too, as steps of the same transaction: nothing goes through Kafka to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord
from opentelemetry.trace import SpanKind

from domain.codec import DecodeError, decode_command, decode_intake, decode_result, encode
from domain.commands import CancelJob, Command, CreateJob, MarkPublished, RecordResult, Tick
from domain.decide import Context, Decision, decide, fail_internal, fail_undeliverable
from domain.ids import job_id_for
from domain.job import Job, OutboxEntry
from domain.messages import CancelRequest, Dispatch, TraceContext
from domain.outbox import render
from domain.webhooks import parse_allowed_hosts, refusal
from streams.assignor import CopartitionedAssignor
from streams.deadletter import dead_letter_record
from streams.lease import MembershipLease
from streams.metrics import Metrics
from streams.pacing import FetchPacer
from streams.partition import Partition, ViewCache
from streams.placement import partition_for
from streams.runtime import Runtime, report_providers
from streams.settings import MAX_GATHER_MS, Settings
from streams.topology import MissingDispatchTopics
from streams.tracing import from_headers, span, to_headers, trace_id
from streams.txn import Record, Transaction
from tables.exceptions import StateCorrupted
from tables.jobs import (
    REQUEST,
    RETIRED,
    ROW,
    RetiredJob,
    encode_request,
    encode_retired,
    encode_row,
    key,
    row_headers,
    split_key,
)
from tables.store import open_store

log = logging.getLogger(__name__)

#: How long an attempt timeout waits for answers already on cp.results but not read yet.
RESULTS_GATE_RECHECK = timedelta(milliseconds=200)
RESULTS_GATE_MAX = timedelta(seconds=10)
#: When a timer whose step failed outright looks at its job again.
TIMER_RETRY = timedelta(seconds=60)
#: How long a partition's producer gathers records before sending them without a commit.
TRANSACTION_LINGER_MS = 20
#: How long a stopping core waits for the loop to finish its turn before cancelling it.
STOP_TURN_WAIT_S = 10.0
#: The largest record the core writes to a job topic (topics.yaml: max.message.bytes 1 MiB, less
#: room for the key, headers and batch overhead).
MAX_RECORD_BYTES = 1_000_000
#: Timer and retention steps per loop turn, so a mass expiry does not stall the loop.
TIMERS_PER_TURN = 2000


#: Records applied between two looks at the clock (see `JobCore.turn_slice_s`).
TURN_CHUNK = 16


class RecordTooLarge(ValueError):
    """A step would write a record bigger than a topic takes: the step is not applied."""


class InjectedFault(RuntimeError):
    """A fault a test asked for (`fault_injection` setting, `cp_fault` request metadata)."""


class PartitionCountMismatch(RuntimeError):
    """The broker's job topics have another partition count than topics.yaml declares."""

    def __init__(self, declared: int, found: dict[str, int]) -> None:
        detail = ", ".join(f"{topic} has {count}" for topic, count in sorted(found.items()))
        super().__init__(
            f"topics.yaml declares {declared} job partitions but {detail}: to grow a deployment, "
            "stop every control-plane worker and run `python -m streams.repartition` "
            "(README, Scaling); otherwise set topics.yaml to the broker's count"
        )


class CoreNotReady(Exception):
    """The job's partition is not served here right now (moving, restoring or elsewhere)."""


class JobCore:
    """Consume, decide, commit; serve reads of the jobs it holds."""

    def __init__(
        self,
        settings: Settings,
        runtime: Runtime,
        metrics: Metrics,
        *,
        url: str,
        partitions: int,
        dispatch_topics: dict[str, str],
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.metrics = metrics
        self.url = url
        self.group_id = settings.topic_prefix + settings.app_id + "-core"
        self.intake_topic = settings.topic("cp.intake")
        self.commands_topic = settings.topic("cp.commands")
        self.results_topic = settings.topic("cp.results")
        self.events_topic = settings.topic("cp.events")
        self.responses_topic = settings.topic("cp.responses")
        self.webhooks_topic = settings.topic("cp.webhooks")
        self.webhook_hosts = parse_allowed_hosts(settings.webhook_allowed_hosts)
        self.dlq_topic = settings.topic("cp.dlq")
        self.health_topic = settings.topic("cp.health")
        self.changelog_topic = settings.topic("{app_id}-jobs-changelog")
        self.dispatch_topics = dispatch_topics
        #: Providers whose dispatch queue cannot take records, with why: their attempts fail at
        #: once (`dispatch_failed`) instead of a record nobody can send being tried again.
        self.undeliverable: dict[str, str] = {}
        self.partitions = partitions
        self.retention = timedelta(seconds=settings.job_retention_s)
        self.idempotency = timedelta(seconds=settings.idempotency_window_s)
        self.commit_interval = settings.commit_interval_ms / 1000
        self.turn_slice_s = settings.core_turn_slice_ms / 1000
        self.parts: dict[int, Partition] = {}
        #: Per partition: the open transaction that takes new records, and its twin, which
        #: commits meanwhile. Two transactional ids per partition, used in turn: a commit takes
        #: ~1 ms, but reusing an id right after its commit waits ~20 ms for the markers
        #: (CONCURRENT_TRANSACTIONS); with two, the next step never waits for the last commit.
        self.txns: dict[int, Transaction] = {}
        self.twins: dict[int, Transaction] = {}
        self.assigned: set[int] = set()
        self.generation = -1
        #: Last offset of cp.results applied per partition (the attempt-timeout gate).
        self.results_read: dict[int, int] = {}
        self.gated_since: dict[str, datetime] = {}
        self.waiters: dict[str, asyncio.Event] = {}
        self.commits: dict[int, asyncio.Task[None]] = {}
        self.failed: set[int] = set()
        self.assignor = CopartitionedAssignor(
            url, lambda: sorted(self.parts), read_url=settings.read_url
        )
        #: Renewed by the group coordinator; while it has lapsed, nothing held here is answered
        #: for (another worker may own it by now).
        self.lease = MembershipLease(settings.broker_session_timeout_s)
        #: Paces the consumer's fetches (set when the loop starts).
        self.pacer: FetchPacer | None = None
        #: From a revocation until the next assignment is applied: no step is applied. What was
        #: applied committed at the revocation; a step now (a timer) would be read over HTTP and
        #: then aborted with its partition if the partition moves, and its job go back.
        self.revoked = False
        self.lock = asyncio.Lock()
        self.consumer: AIOKafkaConsumer | None = None
        self.task: asyncio.Task[None] | None = None
        self.loading: asyncio.Future[None] | None = None
        self.stopping = False
        self.crashed: BaseException | None = None
        #: Told of every job whose state changes and of every partition that leaves (`api.readhub`);
        #: set before `start`, so every partition loaded tells it.
        self.view_listener: ViewListener | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            session_timeout_ms=int(self.settings.broker_session_timeout_s * 1000),
            heartbeat_interval_ms=int(self.settings.broker_heartbeat_interval_s * 1000),
            max_poll_records=self.settings.core_max_poll_records,
            partition_assignment_strategy=(self.assignor,),
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
        )
        await self.consumer.start()
        self.lease.watch(self.consumer._coordinator)
        report_providers(self.runtime.providers, worker="control-plane")
        try:
            self.check_dispatch_topics(set(await self.consumer.topics()))
        except MissingDispatchTopics as exc:
            log.critical(str(exc), extra={"event": "core.missing_topics", "missing": exc.missing})
            await self.consumer.stop()
            raise
        try:
            await self.check_partition_counts()
        except PartitionCountMismatch as exc:
            log.critical(str(exc), extra={"event": "core.partition_mismatch"})
            await self.consumer.stop()
            raise
        self.consumer.subscribe(
            [self.intake_topic, self.commands_topic, self.results_topic],
            listener=_Rebalance(self),
        )
        self.task = asyncio.ensure_future(self._run())

    async def check_partition_counts(self) -> None:
        """Refuse to start when the broker's job topics do not have the configured count.

        Jobs are placed by `murmur2(job_id) % partitions`: a worker counting differently from the
        broker (topics.yaml changed without `streams.repartition`, or the reverse) would look
        for every job in the wrong place.
        """
        assert self.consumer is not None
        cluster = await self.consumer._client.fetch_all_metadata()
        inputs = [self.intake_topic, self.commands_topic, self.results_topic, self.changelog_topic]
        counts = {t: len(cluster.partitions_for_topic(t) or ()) for t in inputs}
        wrong = {t: n for t, n in counts.items() if n and n != self.partitions}
        if wrong:
            raise PartitionCountMismatch(self.partitions, wrong)

    def check_dispatch_topics(self, existing: set[str]) -> None:
        """Refuse to start when a provider routing may choose has no dispatch topic.

        A provider it may not choose (disabled, no API key) is only remembered as undeliverable:
        an attempt of an older job still meant for it fails at once with `dispatch_failed`.
        """
        routable = set(self.runtime.providers.routable())
        missing = {p: t for p, t in self.dispatch_topics.items() if t not in existing}
        refused = {p: t for p, t in missing.items() if p in routable}
        if refused:
            raise MissingDispatchTopics(refused, self.settings.kafka_bootstrap_servers)
        for provider, topic in missing.items():
            self.undeliverable[provider] = (
                f"its dispatch topic {topic} does not exist (`make topics` creates it)"
            )
            log.warning(
                "no dispatch topic for a provider that is not routed to",
                extra={"event": "core.no_dispatch_topic", "provider": provider, "topic": topic},
            )

    async def stop(self) -> None:
        """Finish the turn in hand, commit what it applied, leave the group.

        The loop is not cancelled mid-turn: a flush cut short would leave part of a step's
        records unsent in a transaction that then commits (its state and effects half written).
        """
        self.stopping = True
        self._cancel_loading()
        if self.task is not None:
            await asyncio.wait({self.task}, timeout=STOP_TURN_WAIT_S)
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        async with self.lock:
            await self._commit_all()
            if self.consumer is not None:
                await self.consumer.stop()
            for number in list(self.txns):
                await self._drop(number)

    async def _run(self) -> None:
        """Poll, apply, flush; commit each partition on its own, without stopping the others.

        Records go to the partition's open transaction while its twin commits the previous
        ones (`_start_commit`); they are sent once that commit has ended (`_flush`). A
        partition commits when its transaction is older than the commit interval, or at once
        when the poll brought it nothing new (low load: lowest latency).
        """
        assert self.consumer is not None
        idle_ms = int(self.settings.timer_interval_s * 1000)
        pacer = self.pacer = FetchPacer.of(self.consumer, self.settings)
        self._pace_to_group()
        while not self.stopping:
            if self._ready_work():
                timeout = 0
            elif self.commits:
                timeout = 2
            else:
                timeout = idle_ms
            try:
                batch = await self.consumer.getmany(timeout_ms=timeout)
            except Exception:
                log.exception("core poll failed", extra={"event": "core.poll_failed"})
                await asyncio.sleep(0.5)
                continue
            pacer.observe(sum(map(len, batch.values())))
            async with self.lock:
                await self._turn(batch)

    def _ready_work(self) -> bool:
        return any(number not in self.commits and txn.pending for number, txn in self.txns.items())

    async def _turn(self, batch: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        for number in list(self.failed):
            self.failed.discard(number)
            await self._fail(number)
        if self.revoked:
            return  # records of this batch are fetched again from the positions kept with state
        # Applying is synchronous: every slice of it, the loop answers HTTP (reads, long-polls).
        slice_s = self.turn_slice_s
        until = time.perf_counter() + slice_s
        for tp, records in batch.items():
            for start in range(0, len(records), TURN_CHUNK):
                self._consume(tp, records[start : start + TURN_CHUNK])
                if time.perf_counter() >= until:
                    await asyncio.sleep(0)
                    until = time.perf_counter() + slice_s
        now = datetime.now(UTC)
        fresh = {tp.partition for tp, records in batch.items() if records}
        self._fire_timers(now)
        loop_time = asyncio.get_running_loop().time()
        for number, txn in list(self.txns.items()):
            await self._flush(number, txn)
            if self._may_commit(number, txn) and (
                number not in fresh or loop_time - txn.opened_at >= self.commit_interval
            ):
                self._start_commit(number, txn)

    # -- reads (API) -----------------------------------------------------------------------------

    def partition_of(self, job_id: str) -> int:
        return partition_for(job_id, self.partitions)

    def owner_url(self, job_id: str) -> str | None:
        """The URL of the worker that owns the job's partition, as the last assignment said."""
        return self.assignor.owners.get(self.partition_of(job_id))

    def serves(self, job_id: str) -> bool:
        """Whether this worker holds the job's partition and can still answer for it."""
        return self._answering(job_id) is not None

    def _answering(self, job_id: str) -> Partition | None:
        """The partition state holding the job here, while the membership lease holds: past
        it, the partition may have moved to another worker."""
        part = self.parts.get(self.partition_of(job_id))
        return part if part is not None and self.lease.holds() else None

    def ready(self) -> tuple[bool, str]:
        if self.crashed is not None:
            return False, f"job core stopped: {self.crashed!r}"
        if not self.assigned:
            return False, "no partitions assigned"
        if not self.lease.holds():
            unconfirmed = self.lease.lapsed_for() + self.lease.length
            since = "yet" if math.isinf(unconfirmed) else f"for {unconfirmed:.1f} s"
            return False, (
                f"group membership not confirmed {since}: its partitions may have moved to "
                "another worker"
            )
        missing = self.assigned - set(self.parts)
        if missing:
            return False, f"restoring {len(missing)} partitions"
        return True, "ready"

    def held(self, job_id: str) -> Partition:
        """The partition state holding the job here (raises CoreNotReady when it is not, or when
        the membership lease has lapsed)."""
        part = self._answering(job_id)
        if part is None:
            raise CoreNotReady(job_id)
        return part

    def job(self, job_id: str) -> Job | None:
        """Read a job of a partition held here (raises CoreNotReady or StateCorrupted)."""
        return self.held(job_id).job(job_id)

    def retired(self, job_id: str) -> RetiredJob | None:
        part = self._answering(job_id)
        return part.retired_job(job_id) if part is not None else None

    async def wait_final(self, job_id: str, seconds: float) -> None:
        """Return when the job's final step committed here, when its partition left this worker,
        or after `seconds`."""
        event = self.waiters.setdefault(job_id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            pass
        finally:
            if not event.is_set() and self.waiters.get(job_id) is event:
                self.waiters.pop(job_id, None)

    # -- consuming -------------------------------------------------------------------------------

    def _consume(self, tp: TopicPartition, records: list[ConsumerRecord[Any, Any]]) -> None:
        part = self.parts.get(tp.partition)
        if part is None or not records:
            return  # not ours any more (fenced or failed): whoever owns it reads them again
        txn = self.txns[tp.partition]
        txn.touch()
        for record in records:
            try:
                if tp.topic == self.results_topic:
                    self._result(part, txn, record)
                elif tp.topic == self.commands_topic:
                    self._command(part, txn, record)
                else:
                    self._intake(txn, record)
            except Exception as exc:  # a bug must not lose the record: dead-letter it
                log.exception(
                    "agent failed", extra={"event": "agent.error", "agent": self._agent(tp.topic)}
                )
                self._dead_letter(
                    txn, record, "agent_error", f"{exc!r}\n{traceback.format_exc(limit=5)}"
                )
        txn.offsets[tp] = records[-1].offset + 1
        if tp.topic == self.results_topic:
            self.results_read[tp.partition] = records[-1].offset

    def _agent(self, topic: str) -> str:
        """The stage a topic feeds, as logs and metrics name it."""
        if topic == self.results_topic:
            return "results"
        return "jobs" if topic == self.commands_topic else "intake"

    def _intake(self, txn: Transaction, record: ConsumerRecord[Any, Any]) -> None:
        try:
            request = decode_intake(record.value, max_bytes=self.settings.max_request_bytes)
        except DecodeError as exc:
            self._dead_letter(txn, record, exc.reason, exc.detail)
            return
        if request.tenant_id is None:
            self._dead_letter(txn, record, "schema", "tenant_id: required on Kafka intake")
            return
        now = datetime.now(UTC)
        command_id = f"intake:{record.topic}:{record.partition}:{record.offset}"
        command: Command
        if isinstance(request, CancelRequest):
            job_id = request.job_id or job_id_for(request.tenant_id, request.request_id or "")
            command = CancelJob(
                command_id=command_id,
                job_id=job_id,
                at=now,
                tenant_id=request.tenant_id,
                reason=request.reason or "cancelled by producer",
                source="kafka",
            )
            self._rekey(txn, record, job_id, encode(command), [])
            return
        if request.callback_url is not None:
            refused = refusal(request.callback_url, self.webhook_hosts)
            if refused is not None:
                self._dead_letter(txn, record, "callback_url_refused", refused)
                return
        job_id = job_id_for(request.tenant_id, request.request_id)
        with span(
            "intake",
            from_headers(record.headers),
            kind=SpanKind.CONSUMER,
            job_id=job_id,
            tenant_id=request.tenant_id,
        ) as trace:
            command = CreateJob(
                command_id=command_id,
                job_id=job_id,
                at=now,
                tenant_id=request.tenant_id,
                fingerprint=request.fingerprint(),
                request=request,
                trace=trace,
                source="kafka",
            )
            self._rekey(txn, record, job_id, encode(command), to_headers(trace))

    def _rekey(
        self,
        txn: Transaction,
        record: ConsumerRecord[Any, Any],
        job_id: str,
        value: bytes,
        headers: Any,
    ) -> None:
        """Send a command to its job's partition, in this step's transaction.

        A record the broker would refuse would fail the transaction again on every retry (the
        partition would stall); it is dead-lettered instead, with the input it came from.
        """
        if len(value) > MAX_RECORD_BYTES:
            self._dead_letter(
                txn,
                record,
                "oversize",
                f"its {len(value)}-byte command is over the {MAX_RECORD_BYTES}-byte record limit",
            )
            return
        txn.add(
            self.commands_topic,
            job_id.encode(),
            value,
            headers,
            partition=self.partition_of(job_id),
        )

    def _result(self, part: Partition, txn: Transaction, record: ConsumerRecord[Any, Any]) -> None:
        try:
            result = decode_result(record.value, max_bytes=self.settings.max_result_bytes)
        except DecodeError as exc:
            self._dead_letter(txn, record, exc.reason, exc.detail)
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
                command_id=f"result:{record.topic}:{record.partition}:{record.offset}",
                job_id=result.job_id,
                at=datetime.now(UTC),
                result=result.model_copy(update={"trace": trace}),
            )
            if self.partition_of(result.job_id) != part.number:
                self._rekey(txn, record, result.job_id, encode(command), to_headers(trace))
                return
            self._step(part, txn, command, record)

    def _command(self, part: Partition, txn: Transaction, record: ConsumerRecord[Any, Any]) -> None:
        try:
            command = decode_command(record.value)
        except DecodeError as exc:
            self._dead_letter(txn, record, exc.reason, exc.detail)
            return
        if isinstance(command, MarkPublished):
            return  # marks of the outbox-and-marks design; effects now commit with their step
        if self.partition_of(command.job_id) != part.number:
            self._rekey(txn, record, command.job_id, record.value, list(record.headers or ()))
            return
        self._step(part, txn, command, record)

    # -- one step --------------------------------------------------------------------------------

    def _step(
        self,
        part: Partition,
        txn: Transaction,
        command: Command,
        record: ConsumerRecord[Any, Any] | None,
    ) -> None:
        try:
            job = part.job(command.job_id)
        except StateCorrupted as exc:
            if record is not None:
                self._dead_letter(txn, record, "state_corrupted", str(exc))
            else:
                log.error("unreadable job", extra={"job_id": command.job_id, "detail": str(exc)})
            return
        if job is None and isinstance(command, CreateJob):
            retired = part.retired_job(command.job_id)
            if retired is not None:
                self._create_retired(txn, record, command, retired)
                return
        # Everything that can fail comes first; the step's state and effects then go in whole.
        with span(f"job.{command.kind}", _parent_trace(command, job), job_id=command.job_id):
            try:
                self._inject("decide", command, job)
                decision, new, effects, request = self._decide(job, command, decide)
            except Exception as exc:  # a command that cannot be applied fails its job
                log.exception(
                    "step failed: the job ends FAILED (internal)",
                    extra={"event": "job.internal_error", "job_id": command.job_id},
                )
                self.metrics.internal_errors.labels(command.kind).inc()
                error = type(exc).__name__

                def internal(job: Job | None, command: Command, ctx: Context) -> Decision:
                    return fail_internal(job, command, ctx, error)

                decision, new, effects, request = self._decide(job, command, internal)
        for observation in decision.observations:
            # Folded by every worker's HealthFeed once this step commits (streams.health).
            txn.add(
                self.health_topic,
                observation.provider.encode(),
                orjson.dumps(
                    {
                        "schema_version": 1,
                        "provider": observation.provider,
                        "ok": observation.ok,
                        "latency_ms": observation.latency_ms,
                        "at": observation.at,
                        "job_id": command.job_id,
                        "worker": self.url,
                    }
                ),
            )
        if decision.dead_letter is not None and record is not None:
            self._dead_letter(txn, record, *decision.dead_letter)
        if new is None or new is job:
            return
        # The step's state, its effects, its timer and its retirement go in together: nothing
        # that can raise stands between them.
        txn.extend(effects)
        if request is not None:
            txn.add(self.changelog_topic, key(REQUEST, new.job_id), request, partition=part.number)
            part.add_request(new.job_id, new.request, request)
        txn.rows[new.job_id] = new
        part.keep(new)
        part.wake.set(new.job_id, new.next_wake())
        if new.terminal and (job is None or not job.terminal):
            txn.finished.append(new.job_id)
            part.retire.set(new.job_id, new.updated_at + self.retention)
            self.gated_since.pop(new.job_id, None)
        try:
            self._inject("after_write", command, new)
            self._observe(job, new, decision.outcome)
        except Exception:
            log.exception("step bookkeeping failed", extra={"job_id": new.job_id})

    def _decide(
        self,
        job: Job | None,
        command: Command,
        decider: Callable[[Job | None, Command, Context], Decision],
    ) -> tuple[Decision, Job | None, list[Record], bytes | None]:
        """Decide one step and render what it owes; raises before anything is applied."""
        decision = decider(job, command, self.runtime.context())
        new = decision.job
        effects: list[Record] = []
        if new is not None and new is not job and new.outbox:
            blocked = self._blocked(new)
            if blocked:
                # Every undeliverable provider, not only those in the outbox now: a fallback
                # from a failed dispatch may go to another one.
                blocked = {**self.undeliverable, **blocked}
                failed = fail_undeliverable(new, blocked, self.runtime.context(), command.at)
                if failed is not None and failed.job is not None:
                    log.warning(
                        "dispatch cannot be sent: the attempt failed at once",
                        extra={
                            "event": "job.dispatch_failed",
                            "job_id": new.job_id,
                            "providers": sorted(
                                {a.provider for a in failed.job.attempts} & set(blocked)
                            ),
                        },
                    )
                    new = failed.job
                    decision = dataclasses.replace(decision, job=new)
            effects = self._render(new, new.outbox)
            new = _published(new, command, self.runtime)
        request = encode_request(new.request) if job is None and new is not None else None
        for effect in effects:
            if len(effect.value or b"") > MAX_RECORD_BYTES:
                raise RecordTooLarge(
                    f"a {len(effect.value or b'')}-byte record for {effect.topic} is over the "
                    f"{MAX_RECORD_BYTES}-byte limit"
                )
        return decision, new, effects, request

    def _blocked(self, job: Job) -> dict[str, str]:
        """The providers of the job's outbox whose dispatch queue cannot take a record, and why."""
        blocked: dict[str, str] = {}
        for entry in job.outbox:
            if entry.topic not in ("dispatch", "provider_cancel") or entry.provider is None:
                continue
            if entry.provider not in self.dispatch_topics:
                blocked[entry.provider] = "it has no dispatch topic (not in the catalogue)"
            elif entry.provider in self.undeliverable:
                blocked[entry.provider] = self.undeliverable[entry.provider]
        return blocked

    def _inject(self, stage: str, command: Command, job: Job | None) -> None:
        """Raise where a test asked for a fault (CP_FAULT_INJECTION only)."""
        if not self.settings.fault_injection:
            return
        request = command.request if isinstance(command, CreateJob) else None
        if request is None and job is not None:
            request = job.request
        if request is not None and request.metadata.get("cp_fault") == stage:
            raise InjectedFault(f"fault injected at {stage}")

    def _observe(self, job: Job | None, new: Job, outcome: str) -> None:
        if outcome == "duplicate_command":
            return
        self.metrics.observe_step(job, new)
        if outcome != "noop":
            log.info(
                "job step",
                extra={
                    "event": f"job.{outcome}",
                    "job_id": new.job_id,
                    "tenant_id": new.tenant_id,
                    "state": new.status.value,
                    "attempt_id": new.current.attempt_id if new.current else None,
                    "provider": new.current.provider if new.current else None,
                    "trace_id": trace_id(new.trace),
                },
            )

    def _create_retired(
        self,
        txn: Transaction,
        record: ConsumerRecord[Any, Any] | None,
        command: CreateJob,
        retired: RetiredJob,
    ) -> None:
        """A request re-sent after its job retired: the same job, so nothing new is created."""
        if retired.fingerprint != command.fingerprint and record is not None:
            self._dead_letter(
                txn,
                record,
                "conflict",
                f"request_id {command.request.request_id!r} of tenant {command.tenant_id!r} "
                f"was accepted as {retired.job_id} with a different payload",
            )
            return
        log.info(
            "request of a retired job",
            extra={"event": "job.duplicate_retired", "job_id": retired.job_id},
        )

    def _render(self, job: Job, entries: Iterable[OutboxEntry]) -> list[Record]:
        """The messages a step owes, rendered from its new state."""
        key_ = job.job_id.encode()
        headers = to_headers(job.trace)
        records: list[Record] = []
        for entry in entries:
            message = render(job, entry)
            if entry.topic == "events":
                records.append(Record(self.events_topic, key_, encode(message), headers))
            elif entry.topic == "responses":
                records.append(Record(self.responses_topic, key_, encode(message), headers))
            elif entry.topic == "webhook":
                records.append(Record(self.webhooks_topic, key_, encode(message), headers))
            else:
                topic = self.dispatch_topics.get(entry.provider or "")
                if topic is None:
                    log.error(
                        "no dispatch topic for provider",
                        extra={"job_id": job.job_id, "provider": entry.provider},
                    )
                    continue
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
                        records.append(Record(topic, key_, encode(message), to_headers(trace)))
                else:
                    records.append(Record(topic, key_, encode(message), headers))
        return records

    def _dead_letter(
        self, txn: Transaction, record: ConsumerRecord[Any, Any], reason: str, detail: str
    ) -> None:
        self.metrics.dead_letters.labels(reason, record.topic).inc()
        letter = dead_letter_record(
            reason=reason,
            detail=detail,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            payload=record.value,
        )
        log.warning(
            "dead letter",
            extra={
                "event": "dead_letter",
                "reason": reason,
                "origin_topic": record.topic,
                "origin_partition": record.partition,
                "origin_offset": record.offset,
            },
        )
        # Keyed by origin, so one partition's letters stay in order.
        txn.add(self.dlq_topic, f"{record.topic}:{record.partition}".encode(), encode(letter))

    # -- timers and retention --------------------------------------------------------------------

    def _fire_timers(self, now: datetime) -> None:
        if self.revoked:
            return
        budget = TIMERS_PER_TURN
        for number, part in self.parts.items():
            txn = self.txns.get(number)
            if txn is None:
                continue
            for job_id in part.wake.pop_due(now, limit=budget):
                budget -= 1
                txn.touch()
                self._timer(part, txn, job_id, now)
            for job_id in part.retire.pop_due(now, limit=max(budget, 0)):
                budget -= 1
                txn.touch()
                self._retire(part, txn, job_id, now)
            for job_id in part.purge.pop_due(now, limit=max(budget, 0)):
                budget -= 1
                txn.touch()
                part.purge_retired(job_id)
                txn.add(self.changelog_topic, key(RETIRED, job_id), None, partition=number)
            if budget <= 0:
                return

    def _timer(self, part: Partition, txn: Transaction, job_id: str, now: datetime) -> None:
        try:
            job = part.job(job_id)
        except StateCorrupted:
            log.exception("unreadable job on its timer", extra={"job_id": job_id})
            return
        if job is None or job.terminal:
            return
        if self._hold_timeout(part.number, job, now):
            part.wake.set(job_id, now + RESULTS_GATE_RECHECK)
            return
        self.gated_since.pop(job_id, None)
        tick = Tick(
            command_id=f"tick:{job_id}:{int(now.timestamp() * 1000)}", job_id=job_id, at=now
        )
        try:
            self._step(part, txn, tick, None)
        except Exception:  # even failing the job failed: look again later, never spin
            log.exception("timer step failed", extra={"job_id": job_id})
            part.wake.set(job_id, now + TIMER_RETRY)
            return
        if job_id not in part.wake.due:
            # Not due yet after all (a restored time is rounded): look again when it is.
            after = part.jobs.get(job_id)
            if after is not None:
                part.wake.set(job_id, after.next_wake())

    def _hold_timeout(self, number: int, job: Job, now: datetime) -> bool:
        """Hold an attempt timeout while answers already on cp.results wait to be read.

        Under backlog an answer can sit in cp.results while its attempt's timeout comes due; the
        timeout must not win a race the provider won. Deadlines and backoffs are never held.
        """
        current = job.current
        if current is None or not current.status.live or current.expires_at > now:
            return False
        if job.deadline_at is not None and job.deadline_at <= now:
            return False
        assert self.consumer is not None
        results = TopicPartition(self.results_topic, number)
        if results not in self.consumer.assignment():
            return True  # the partition is moving: whoever gets it decides
        since = self.gated_since.setdefault(job.job_id, now)
        if now - since > RESULTS_GATE_MAX:
            return False
        highwater: int | None = self.consumer.highwater(results)
        if highwater is None:
            return True
        return self.results_read.get(number, -1) + 1 < highwater

    def _retire(self, part: Partition, txn: Transaction, job_id: str, now: datetime) -> None:
        try:
            job = part.job(job_id)
        except StateCorrupted:
            log.exception("unreadable job at retirement", extra={"job_id": job_id})
            job = None
        if job is not None and not job.terminal:
            return
        number = part.number
        txn.rows.pop(job_id, None)
        txn.add(self.changelog_topic, key(ROW, job_id), None, partition=number)
        txn.add(self.changelog_topic, key(REQUEST, job_id), None, partition=number)
        if job is None:
            part.retire_job(job_id, None)
            return
        purge_at = now + self.idempotency
        record = RetiredJob(
            job_id=job.job_id,
            tenant_id=job.tenant_id,
            request_id=job.request_id,
            fingerprint=job.fingerprint,
            state=job.status.value,
            finished_at=job.final.finished_at if job.final else job.updated_at,
            retired_at=now,
        )
        retired = encode_retired(record)
        txn.add(
            self.changelog_topic,
            key(RETIRED, job_id),
            retired,
            row_headers(None, purge_at),
            partition=number,
        )
        part.retire_job(job_id, retired)
        part.purge.set(job_id, purge_at)
        self.metrics.retired.inc()

    # -- transactions ----------------------------------------------------------------------------

    async def _flush(self, number: int, txn: Transaction) -> None:
        """Queue one row per touched job; hand the queue to the producer unless the twin commits."""
        part = self.parts.get(number)
        if txn.rows:
            for job in txn.rows.values():
                retire = job.updated_at + self.retention if job.terminal else None
                row = encode_row(job)
                txn.add(
                    self.changelog_topic,
                    key(ROW, job.job_id),
                    row,
                    row_headers(job.next_wake(), retire, job),
                    partition=number,
                )
                if part is not None and job.terminal:
                    part.keep(job, row)
            txn.rows.clear()
        if part is not None:
            part.flush()
        # While the twin commits, hold the records back: the twin's producer may not have
        # appended its batches yet (it waits out CONCURRENT_TRANSACTIONS on the partitions it
        # adds), and a record appended before them would put the changelog, the timeline and
        # the responses out of the order the steps were applied in. A restore replays the
        # changelog in log order: an older row landing after a newer one would revive a job.
        if txn.records and number not in self.commits:
            records = list(txn.records)
            txn.records.clear()
            try:
                await txn.send(records)
            except asyncio.CancelledError:  # part of the records went: this one must not commit
                self.failed.add(number)
                raise
            except Exception:
                log.exception("send failed", extra={"event": "core.send_failed"})
                self.failed.add(number)

    def _start_commit(self, number: int, txn: Transaction) -> None:
        """Commit `txn` in the background; new records go to its twin meanwhile.

        At most one commit per partition is in flight, and the twin commits only after it, so
        the partition's transactions commit in the order their records were applied.
        """
        task = asyncio.ensure_future(self._commit(number, txn))
        self.commits[number] = task
        task.add_done_callback(lambda _: self.commits.pop(number, None))
        self.txns[number], self.twins[number] = self.twins[number], txn

    def _may_commit(self, number: int, txn: Transaction) -> bool:
        """A pending transaction commits after its twin's commit, and never after a failed one:
        its steps were applied on top of what that one held."""
        return txn.pending and number not in self.commits and number not in self.failed

    async def _commit_all(self) -> None:
        """Commit every partition now and wait (rebalance and stop)."""
        while True:
            for number in list(self.failed):
                self.failed.discard(number)
                await self._fail(number)
            for number, txn in list(self.txns.items()):
                await self._flush(number, txn)
                if self._may_commit(number, txn):
                    self._start_commit(number, txn)
            if not self.commits:
                break
            await asyncio.gather(*self.commits.values(), return_exceptions=True)

    async def _commit(self, number: int, txn: Transaction) -> None:
        finished = list(txn.finished)
        offsets = dict(txn.offsets)
        try:
            await txn.commit(self.changelog_topic)
        except Exception as exc:  # noqa: BLE001 (fenced, timed out, broker gone: all the same here)
            log.warning(
                "transaction failed: the partition is rebuilt from its changelog",
                extra={"event": "core.commit_failed", "partition": number, "error": repr(exc)},
            )
            self.metrics.transactions.labels("failed").inc()
            self.failed.add(number)
            return
        self.metrics.transactions.labels("committed").inc()
        part = self.parts.get(number)
        if part is not None:
            part.offsets.update({tp.topic: offset for tp, offset in offsets.items()})
        for job_id in finished:
            waiter = self.waiters.pop(job_id, None)
            if waiter is not None:
                waiter.set()

    async def _fail(self, number: int) -> None:
        """A transaction that did not commit: forget the partition and rejoin to get it back."""
        await self._drop(number)
        if self.consumer is not None and not self.stopping:
            self.consumer._coordinator.request_rejoin()

    async def _drop(self, number: int) -> None:
        part = self.parts.pop(number, None)
        if part is not None:
            part.close()
            if self.view_listener is not None:
                self.view_listener.reset()
        # Long-polls of its jobs look again now: the partition is no longer answered here.
        for job_id in [j for j in self.waiters if self.partition_of(j) == number]:
            self.waiters.pop(job_id).set()
        commit = self.commits.get(number)
        if commit is not None:
            await asyncio.gather(commit, return_exceptions=True)
        for txn in (self.txns.pop(number, None), self.twins.pop(number, None)):
            if txn is None:
                continue
            try:
                await txn.abort()
            except Exception:  # noqa: BLE001 (fenced or broker gone: the epoch bump aborts it)
                log.info("abort failed", extra={"partition": number})
            try:
                await txn.producer.stop()
            except Exception:  # noqa: BLE001
                log.info("producer stop failed", extra={"partition": number})

    # -- rebalance -------------------------------------------------------------------------------

    async def on_revoked(self) -> None:
        self._cancel_loading()
        async with self.lock:
            await self._commit_all()
            self.revoked = True

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Keep what was held without a gap; fence and rebuild the rest, off the rebalance path.

        Loading runs in a task of its own with the new partitions paused, so a long restore
        neither holds up the group's rebalance nor stops this worker's heartbeat and HTTP answers.
        """
        assert self.consumer is not None
        self._cancel_loading()
        async with self.lock:
            generation = self.consumer._coordinator.generation
            numbers = {tp.partition for tp in assigned}
            continuous = generation == self.generation + 1
            self.generation = generation
            for number in sorted(set(self.txns) - numbers if continuous else set(self.txns)):
                await self._drop(number)
            self.assigned = numbers
            # Positions live with the state (o:<topic> changelog records), not in the group:
            # a partition kept from the last generation resumes where its last commit left it.
            for tp in assigned:
                kept = self.parts.get(tp.partition)
                if kept is not None:
                    await self._seek(tp, kept.offsets.get(tp.topic))
            load = sorted(numbers - set(self.parts))
            if load:
                self.consumer.pause(*[tp for tp in assigned if tp.partition in load])
                self.loading = asyncio.ensure_future(self._load(load, assigned))
                self.loading.add_done_callback(self._loaded)
            self._reset_in_flight()
            self.lease.applied(generation)
            self._pace_to_group()
            self.revoked = False
            if self.view_listener is not None:
                self.view_listener.placed(self.partitions, dict(self.assignor.readers))

    def _pace_to_group(self) -> None:
        """With `CP_FETCH_GATHER_PER_WORKER`: gather for the base window times the workers."""
        if self.pacer is None or not self.settings.fetch_gather_per_worker:
            return
        workers = max(1, len(set(self.assignor.owners.values())))
        self.pacer.set_gather(min(MAX_GATHER_MS, self.settings.fetch_gather_ms * workers))

    def _cancel_loading(self) -> None:
        if self.loading is not None and not self.loading.done():
            self.loading.cancel()
        self.loading = None

    def _loaded(self, task: asyncio.Future[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error(
            "partitions failed to load: rejoining to get them again",
            extra={"event": "core.load_failed", "error": repr(task.exception())},
        )
        if self.consumer is not None and not self.stopping:
            self.consumer._coordinator.request_rejoin()

    def _reset_in_flight(self) -> None:
        live = [j for p in self.parts.values() for j, job in p.jobs.items() if not job.terminal]
        self.metrics.reset_in_flight(live)

    async def _load(self, numbers: list[int], assigned: set[TopicPartition]) -> None:
        """Fence each partition's earlier writers, then rebuild it from its committed changelog."""
        assert self.consumer is not None
        started = asyncio.get_running_loop().time()
        producers = {(n, twin): self._producer(n, twin) for n in numbers for twin in (0, 1)}
        parts: dict[int, Partition] = {}
        try:
            # InitProducerId bumps each id's epoch: the last holder's open transaction is
            # aborted and its later sends and commits are refused. Only then read the state.
            await asyncio.gather(*(p.start() for p in producers.values()))
            parts = await restore(
                self.settings, self.changelog_topic, numbers, partitions=self.partitions
            )
            tps = [tp for tp in assigned if tp.partition in parts]
            committed = {tp: parts[tp.partition].offsets.get(tp.topic) for tp in tps}
        except BaseException:  # cancelled by a new rebalance, or failed: leave nothing behind
            await asyncio.gather(*(p.stop() for p in producers.values()), return_exceptions=True)
            for part in parts.values():
                part.close()
            raise
        async with self.lock:
            for (number, twin), producer in producers.items():
                (self.twins if twin else self.txns)[number] = Transaction(number, producer)
            self.parts.update(parts)
            if self.view_listener is not None:
                for part in parts.values():
                    part.views.changed = self.view_listener.changed
            for tp, offset in committed.items():
                await self._seek(tp, offset)
                if tp.topic == self.results_topic:
                    self.results_read[tp.partition] = (offset or 0) - 1
            self.consumer.resume(*tps)
            self._reset_in_flight()
        elapsed = asyncio.get_running_loop().time() - started
        self.metrics.restore_seconds.observe(elapsed)
        log.info(
            "partitions restored",
            extra={
                "event": "core.restored",
                "partitions": numbers,
                "records": sum(p.restored for p in parts.values()),
                "jobs": sum(p.held for p in parts.values()),
                "seconds": round(elapsed, 3),
            },
        )

    async def _seek(self, tp: TopicPartition, offset: int | None) -> None:
        assert self.consumer is not None
        if offset is not None:
            self.consumer.seek(tp, offset)
        else:
            await self.consumer.seek_to_beginning(tp)

    def _producer(self, number: int, twin: int) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            transactional_id=f"{self.group_id}-{number}" + ("-b" if twin else ""),
            enable_idempotence=True,
            acks="all",
            # A commit sends what is queued at once; lingering only gathers bigger batches.
            linger_ms=TRANSACTION_LINGER_MS,
            # A full batch makes the next send wait for it to be sent: keep batches roomy.
            max_batch_size=1024 * 1024,
            max_request_size=2 * 1024 * 1024,
            transaction_timeout_ms=60000,
        )


def changelog_reader(settings: Settings) -> AIOKafkaConsumer:
    """A consumer outside any group that reads what committed to the changelog, in big fetches."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=32 * 1024 * 1024,
    )


class ViewListener(Protocol):
    """Who else keeps status views of this worker's jobs (the reader processes)."""

    def changed(self, job_id: str) -> None: ...
    def reset(self) -> None: ...
    def placed(self, partitions: int, readers: dict[int, str]) -> None:
        """After each assignment: the read URL of every partition's owner that has one."""


async def restore(
    settings: Settings, changelog: str, numbers: list[int], *, partitions: int = 1
) -> dict[int, Partition]:
    """Read the committed changelog of the given partitions into fresh partition states."""
    views = max(16, settings.status_views // max(1, partitions))
    parts = {
        n: Partition(
            n, store=open_store(settings.store, settings.data_dir, n), views=ViewCache(views)
        )
        for n in numbers
    }
    consumer = changelog_reader(settings)
    await consumer.start()
    try:
        tps = [TopicPartition(changelog, n) for n in numbers]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        remaining = {tp for tp in tps if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=500, max_records=10000)
            for tp, records in batch.items():
                good = [r for r in records if _changelog_key(r.key)]
                parts[tp.partition].apply_changelog((r.key, r.value, r.headers) for r in good)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    except BaseException:
        for part in parts.values():
            part.close()
        raise
    finally:
        await consumer.stop()
    for part in parts.values():
        part.held = sum(1 for _ in part.store.keys(f"{ROW}:".encode()))
    return parts


def _changelog_key(raw: bytes | None) -> bool:
    try:
        split_key(raw or b"")
    except (StateCorrupted, UnicodeDecodeError):
        log.error("changelog record with a foreign key skipped", extra={"key": repr(raw)[:80]})
        return False
    return True


def _published(job: Job, command: Command, runtime: Runtime) -> Job:
    """The job with its outbox sent: effects leave with this step's transaction."""
    done = decide(
        job,
        MarkPublished(
            command_id=f"published:{command.command_id}",
            job_id=job.job_id,
            # An attempt's timeout counts from now, not from when its command was produced
            # (it may have waited in Kafka).
            at=max(command.at, datetime.now(UTC)),
            entry_ids=[e.entry_id for e in job.outbox],
        ),
        runtime.context(),
    ).job
    assert done is not None
    return done


def _parent_trace(command: Command, job: Job | None) -> TraceContext | None:
    if isinstance(command, CreateJob):
        return command.trace
    if isinstance(command, RecordResult):
        return command.result.trace
    return job.trace if job is not None else None


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, core: JobCore) -> None:
        self.core = core

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.core.on_revoked()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.core.on_assigned(set(assigned))
