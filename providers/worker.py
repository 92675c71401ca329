"""The provider worker: consume dispatch queues, call providers, report results to cp.results.

Its own consumer group, independent of the control plane. Many calls run at once (a bounded task
pool) while the poll loop keeps going; offsets are committed only up to the oldest attempt still
running, so a crash re-delivers unfinished attempts (at least once) and idempotency keys already
handled are skipped, persisted in a small RocksDB next to the worker (pruned after
`provider_handled_retention_s`, once no dispatch can come back).

On SIGTERM/SIGINT the worker stops taking dispatches and lets the calls in flight finish for up to
`provider_shutdown_grace_s` (a second signal ends the wait at once): their results are published
before their offsets commit and their keys are marked. Calls still running then are cancelled and
left unmarked and uncommitted, so the next worker gets their dispatches again at once.

Run: `python -m providers.worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import OrderedDict
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from opentelemetry.trace import SpanKind
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import ValidationError
from rocksdict import Options, Rdict

from api.problems import problem_documents
from domain.catalogue import Catalogue
from domain.codec import DecodeError, encode, load_json, upcast
from domain.limits import RAW_USAGE, check_tree
from domain.messages import (
    Dispatch,
    ProviderCancel,
    ProviderResult,
    RawProviderError,
)
from providers import genai
from providers.base import Completed, Failed, Outcome, ProviderAdapter
from providers.registry import build_adapters
from streams.pacing import FetchPacer
from streams.runtime import load_providers, report_providers
from streams.settings import Settings, get_settings
from streams.topology import MissingDispatchTopics, load_topology
from streams.tracing import annotate, setup_tracing, span, to_headers

log = logging.getLogger("providers.worker")

#: How often offsets commit while dispatches keep coming (at-least-once either way).
COMMIT_EVERY_S = 0.1
#: How often handled keys older than `provider_handled_retention_s` are dropped (also at start).
PRUNE_EVERY_S = 3600.0
#: Handled keys looked at between two turns of the event loop while pruning.
PRUNE_CHUNK = 5_000
#: How often the group consumers refresh topic metadata (new partitions of a grown topic).
METADATA_MAX_AGE_MS = 10_000
#: Longest wait for calls abandoned at shutdown to unwind once cancelled.
CANCEL_WAIT_S = 5.0


def group_consumer(
    settings: Settings, group_id: str, *, fetch_max_wait_ms: int | None = None
) -> AIOKafkaConsumer:
    """A consumer in one of the workers' groups over what the job core writes: read_committed,
    so what a fenced or aborted transaction wrote is never acted on; offsets committed by hand.
    `fetch_max_wait_ms` defaults to the setting (`CP_FETCH_MAX_WAIT_MS`)."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=settings.topic_prefix + group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        fetch_max_wait_ms=fetch_max_wait_ms or settings.fetch_max_wait_ms,
        session_timeout_ms=int(settings.broker_session_timeout_s * 1000),
        heartbeat_interval_ms=int(settings.broker_heartbeat_interval_s * 1000),
        max_poll_records=200,
        # Partitions added by `streams.repartition` are seen (and joined) within this time,
        # instead of aiokafka's 5 minutes.
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
    )


def idempotent_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=2,
        # A full batch makes the next send wait until it is sent: keep batches roomy.
        max_batch_size=1024 * 1024,
        max_request_size=2 * 1024 * 1024,
    )


class OffsetTracker:
    """Commit each partition only up to its oldest record still being worked on.

    A record started and never `done` (not taken because the worker was stopping, or its call
    abandoned at shutdown) holds its partition's commit back for good: the next worker gets it.
    """

    def __init__(self) -> None:
        self.inflight: dict[TopicPartition, set[int]] = {}
        self.next: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}

    def start(self, tp: TopicPartition, offset: int) -> None:
        self.inflight.setdefault(tp, set()).add(offset)
        self.next[tp] = max(self.next.get(tp, 0), offset + 1)

    def done(self, tp: TopicPartition, offset: int) -> None:
        self.inflight.get(tp, set()).discard(offset)

    def committable(self) -> dict[TopicPartition, int]:
        offsets: dict[TopicPartition, int] = {}
        for tp, nxt in self.next.items():
            running = self.inflight.get(tp)
            offset = min(running) if running else nxt
            if self.committed.get(tp) != offset:
                offsets[tp] = offset
        return offsets

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed.update(offsets)

    async def commit(self, consumer: AIOKafkaConsumer, failure: str) -> None:
        """Commit what is committable; a failed commit is logged (`failure`) and tried again."""
        offsets = self.committable()
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except Exception:
            log.warning(failure, exc_info=True)
            return
        self.mark_committed(offsets)

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self.inflight.pop(tp, None)
            self.next.pop(tp, None)
            self.committed.pop(tp, None)


class ProviderMetrics:
    """What the provider worker exposes on /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "provider_calls",
            "Provider calls by outcome",
            ["provider", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "provider_call_latency_seconds",
            "Provider call time",
            ["provider"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "provider_calls_in_flight", "Calls running now", registry=self.registry
        )
        self.skipped = Counter(
            "provider_dispatches_skipped",
            "Dispatches not run: already handled or cancelled",
            ["reason"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "provider_dead_letters",
            "Dispatch records sent to the dead-letter topic",
            ["reason"],
            registry=self.registry,
        )
        # Completion webhooks (providers.webhooks), sent from this process.
        self.webhook_attempts = Counter(
            "webhook_attempts",
            "Webhook POST attempts by outcome: delivered, failed (retried later), gave_up",
            ["outcome"],
            registry=self.registry,
        )
        self.webhook_latency = Histogram(
            "webhook_attempt_latency_seconds",
            "Time of one webhook POST, answered or not",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.webhook_pending = Gauge(
            "webhook_deliveries_pending",
            "Deliveries taken and not yet delivered or given up (retrying ones included)",
            registry=self.registry,
        )
        # The OpenTelemetry GenAI client metrics (gen_ai.client.*), in Prometheus naming.
        genai_labels = [
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
            "gen_ai_response_model",
        ]
        self.genai_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration (gen_ai.client.operation.duration); error_type set on errors",
            [*genai_labels, "error_type"],
            buckets=genai.DURATION_BUCKETS,
            registry=self.registry,
        )
        self.genai_tokens = Histogram(
            "gen_ai_client_token_usage",
            "Tokens used per GenAI operation (gen_ai.client.token.usage), input and output",
            [*genai_labels, "gen_ai_token_type"],
            buckets=genai.TOKEN_BUCKETS,
            registry=self.registry,
        )

    def observe_genai(
        self, provider: str, model: str, call: genai.CallTelemetry, seconds: float
    ) -> None:
        labels = (genai.OPERATION, provider, model, call.response_model or "")
        self.genai_duration.labels(*labels, call.error_type or "").observe(seconds)
        for token_type, count in (("input", call.input_tokens), ("output", call.output_tokens)):
            if count is not None:
                self.genai_tokens.labels(*labels, token_type).observe(count)


class HandledKeys:
    """Idempotency keys whose attempt already ran here, kept across restarts."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        self._db = Rdict(str(path / "handled"), options)

    def __contains__(self, key: str) -> bool:
        return self._db.get(key.encode()) is not None

    def add(self, key: str, *, now: float | None = None) -> None:
        self._db[key.encode()] = str(int(time.time() if now is None else now)).encode()

    async def prune(self, older_than: float, *, chunk: int = PRUNE_CHUNK) -> int:
        """Drop keys marked before `older_than` (epoch seconds); return how many went.

        Walks the store in chunks, yielding to the event loop between them, so calls and
        polls go on meanwhile. A value that is not a time stamp is dropped too.
        """
        removed = seen = 0
        it = self._db.iter()
        try:
            it.seek_to_first()
            while it.valid():
                try:
                    marked = int(it.value())
                except ValueError:
                    marked = 0
                if marked < older_than:
                    self._db.delete(it.key())
                    removed += 1
                it.next()
                seen += 1
                if seen % chunk == 0:
                    await asyncio.sleep(0)
        finally:
            del it
        return removed

    def close(self) -> None:
        self._db.close()


class _Revocations(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: ProviderWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.worker.commit()
        self.worker.tracker.forget(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info(
            "partitions assigned", extra={"event": "provider.assigned", "count": len(assigned)}
        )


class ProviderWorker:
    def __init__(
        self,
        settings: Settings,
        catalogue: Catalogue,
        adapters: dict[str, ProviderAdapter],
        *,
        data_dir: Path,
    ) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.adapters = adapters
        self.tracker = OffsetTracker()
        self.handled = HandledKeys(data_dir)
        self.inflight: dict[str, asyncio.Task[None]] = {}
        self.cancelled: OrderedDict[str, None] = OrderedDict()
        #: Keys of calls cancelled at shutdown: neither marked handled nor committed.
        self.abandoned: set[str] = set()
        self.slots = asyncio.Semaphore(settings.provider_concurrency)
        #: Set by the first stop signal: take no more dispatches, let calls finish (grace).
        self.stopping = asyncio.Event()
        #: Set by a second stop signal: end the grace period now.
        self.abort = asyncio.Event()
        self.metrics = ProviderMetrics()
        topology = load_topology(settings.topics_file, [p.name for p in catalogue.providers])
        #: The dispatch topic of every enabled provider, by provider.
        self.topic_of = {
            provider: settings.topic(spec.name)
            for provider, spec in topology.dispatch_topics().items()
            if (p := catalogue.provider(provider)) is not None and p.enabled
        }
        self.dispatch_topics = list(self.topic_of.values())
        self.results_topic = settings.topic("cp.results")
        self.dlq_topic = settings.topic("cp.dlq")
        self.consumer = group_consumer(settings, settings.provider_group_id)
        self.producer = idempotent_producer(settings)

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        try:
            self.check_dispatch_topics(set(await self.consumer.topics()))
        except MissingDispatchTopics as exc:
            log.critical(
                str(exc), extra={"event": "provider.missing_topics", "missing": exc.missing}
            )
            await self.consumer.stop()
            await self.producer.stop()
            raise
        self.consumer.subscribe(self.dispatch_topics, listener=_Revocations(self))
        log.info(
            "provider worker started",
            extra={
                "event": "provider.started",
                "topics": self.dispatch_topics,
                "adapters": sorted(self.adapters),
            },
        )

    def check_dispatch_topics(self, existing: set[str]) -> None:
        """Refuse to start when a provider this worker can call has no dispatch topic; a provider
        it cannot call (no API key here) and without a topic is left out of the subscription."""
        missing = {p: t for p, t in self.topic_of.items() if t not in existing}
        refused = {p: t for p, t in missing.items() if p in self.adapters}
        if refused:
            raise MissingDispatchTopics(refused, self.settings.kafka_bootstrap_servers)
        self.dispatch_topics = [t for t in self.topic_of.values() if t in existing]

    def request_stop(self) -> None:
        """A stop signal: the first stops taking dispatches, a second ends the grace period."""
        if not self.stopping.is_set():
            log.info(
                "stopping: no new dispatches, waiting for calls in flight",
                extra={
                    "event": "provider.stopping",
                    "in_flight": len(self.inflight),
                    "grace_s": self.settings.provider_shutdown_grace_s,
                },
            )
            self.stopping.set()
        elif not self.abort.is_set():
            log.warning(
                "second stop signal: abandoning calls in flight",
                extra={"event": "provider.stop_now", "in_flight": len(self.inflight)},
            )
            self.abort.set()

    async def run(self) -> None:
        await self.start()
        pruning = asyncio.create_task(self.prune_handled())
        try:
            loop = asyncio.get_running_loop()
            committed_at = loop.time()
            pacer = FetchPacer.of(self.consumer, self.settings)
            while not self.stopping.is_set():
                batches = await self.consumer.getmany(timeout_ms=200)
                pacer.observe(sum(map(len, batches.values())))
                for tp, records in batches.items():
                    for record in records:
                        if self.stopping.is_set():
                            break  # not started: the commit stays below it
                        self.tracker.start(tp, record.offset)
                        await self.handle(tp, record)
                # An offset commit is a round trip the next poll would wait for: under load,
                # commit every COMMIT_EVERY_S; when idle, at once.
                if not batches or loop.time() - committed_at >= COMMIT_EVERY_S:
                    await self.commit()
                    committed_at = loop.time()
        finally:
            pruning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pruning
            await self.shutdown()

    async def prune_handled(self) -> None:
        """Drop handled keys past their retention, at start and every PRUNE_EVERY_S."""
        while True:
            cutoff = time.time() - self.settings.provider_handled_retention_s
            try:
                removed = await self.handled.prune(cutoff)
            except Exception:
                log.warning("pruning handled keys failed", exc_info=True)
            else:
                log.info(
                    "handled keys pruned",
                    extra={"event": "provider.pruned", "removed": removed},
                )
            await asyncio.sleep(PRUNE_EVERY_S)

    async def commit(self) -> None:
        await self.tracker.commit(self.consumer, "offset commit failed")

    async def shutdown(self) -> None:
        """Stop taking dispatches, let calls finish within the grace period, then commit.

        A finished call has its results acknowledged by the broker (and its key marked) before
        its offset counts as done; the producer is flushed once more before the last commit.
        Calls abandoned keep their offsets uncommitted and their keys unmarked.
        """
        self.stopping.set()
        with contextlib.suppress(Exception):
            self.consumer.pause(*self.consumer.assignment())
        await self.drain(self.settings.provider_shutdown_grace_s)
        try:
            await self.producer.flush()
        except Exception:
            log.warning("producer flush failed at shutdown", exc_info=True)
        else:
            await self.commit()
        await self.consumer.stop()
        await self.producer.stop()
        for adapter in self.adapters.values():
            await adapter.close()
        self.handled.close()

    async def drain(self, grace_s: float) -> int:
        """Wait up to `grace_s` (or a second stop signal) for the calls in flight; cancel the
        rest as abandoned: not marked handled, offsets not committed. Return how many."""
        tasks = [task for task in self.inflight.values() if not task.done()]
        if tasks:
            started = time.monotonic()
            all_done = asyncio.ensure_future(asyncio.wait(tasks))
            abort = asyncio.ensure_future(self.abort.wait())
            try:
                await asyncio.wait(
                    {all_done, abort}, timeout=max(grace_s, 0), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                all_done.cancel()
                abort.cancel()
            log.info(
                "calls in flight finished",
                extra={
                    "event": "provider.drained",
                    "finished": sum(1 for task in tasks if task.done()),
                    "waited_ms": int((time.monotonic() - started) * 1000),
                },
            )
        pending = {key: task for key, task in self.inflight.items() if not task.done()}
        if not pending:
            return 0
        self.abandoned.update(pending)
        for task in pending.values():
            task.cancel()
        await asyncio.wait(pending.values(), timeout=CANCEL_WAIT_S)
        log.warning(
            "calls abandoned at shutdown: left to the next worker",
            extra={"event": "provider.abandoned", "count": len(pending)},
        )
        return len(pending)

    async def take_slot(self) -> bool:
        """Wait for a free call slot; False (holding none) if the worker starts stopping first."""
        if self.stopping.is_set():
            return False
        if not self.slots.locked():
            await self.slots.acquire()
            return True
        acquire = asyncio.ensure_future(self.slots.acquire())
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not acquire.done():
            acquire.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acquire
        if acquire.cancelled():
            return False
        if self.stopping.is_set():
            self.slots.release()
            return False
        return True

    async def handle(self, tp: TopicPartition, record: Any) -> None:
        try:
            data = load_json(record.value, max_bytes=self.settings.max_request_bytes)
            if data.get("type") == "cancel":
                self.on_cancel(ProviderCancel.model_validate(upcast("provider_cancel", data)))
                self.tracker.done(tp, record.offset)
                return
            dispatch = Dispatch.model_validate(upcast("dispatch", data))
        except (DecodeError, ValidationError) as exc:
            reason = exc.reason if isinstance(exc, DecodeError) else "schema"
            await self.dead_letter(record, reason, str(exc))
            self.tracker.done(tp, record.offset)
            return
        key = dispatch.idempotency_key
        if key in self.handled or key in self.cancelled or key in self.inflight:
            reason = (
                "handled"
                if key in self.handled
                else "cancelled"
                if key in self.cancelled
                else "running"
            )
            self.metrics.skipped.labels(reason).inc()
            log.info(
                "dispatch skipped",
                extra={**_ids(dispatch, event="provider.skip"), "reason": reason},
            )
            self.tracker.done(tp, record.offset)
            return
        if not await self.take_slot():
            return  # stopping: not taken, its offset stays uncommitted for the next worker
        task = asyncio.create_task(self.attempt(dispatch))
        self.inflight[key] = task
        self.metrics.in_flight.inc()

        def finished(_: asyncio.Task[None]) -> None:
            self.metrics.in_flight.dec()
            self.slots.release()
            self.inflight.pop(key, None)
            if key not in self.abandoned:
                self.tracker.done(tp, record.offset)

        task.add_done_callback(finished)

    def on_cancel(self, cancel: ProviderCancel) -> None:
        self.cancelled[cancel.idempotency_key] = None
        while len(self.cancelled) > 100_000:
            self.cancelled.popitem(last=False)
        task = self.inflight.get(cancel.idempotency_key)
        if task is not None:
            task.cancel()

    async def attempt(self, dispatch: Dispatch) -> None:
        """Run one attempt and report it; never raises for a provider problem."""
        with span(
            f"attempt {dispatch.provider}",
            dispatch.trace,
            kind=SpanKind.CONSUMER,
            job_id=dispatch.job_id,
            attempt_id=dispatch.attempt_id,
            provider=dispatch.provider,
        ) as trace:
            await self._attempt(dispatch.model_copy(update={"trace": trace}))

    async def _attempt(self, dispatch: Dispatch) -> None:
        key = dispatch.idempotency_key
        adapter = self.adapters.get(dispatch.provider)
        sent = [await self.send_result(dispatch, "started", f"{key}:started", adapter)]
        started = time.monotonic()
        request = genai.request_attributes(dispatch, self.catalogue)
        try:
            with span(
                genai.span_name(dispatch),
                dispatch.trace,
                kind=SpanKind.CLIENT,
                semconv=request,
                provider=dispatch.provider,
                model=dispatch.model,
                attempt_id=dispatch.attempt_id,
            ):
                call_started = time.monotonic()
                outcome = await self.call(adapter, dispatch)
                call_s = time.monotonic() - call_started
                call = genai.outcome_telemetry(
                    dispatch, outcome, adapter.kind if adapter else "unknown"
                )
                annotate(call.attributes, error=call.error_type)
        except asyncio.CancelledError:
            if key in self.cancelled:
                # The job no longer wants it (a ProviderCancel): never run it again.
                self.handled.add(key)
                log.info("attempt cancelled", extra=_ids(dispatch, event="provider.cancelled"))
            else:
                # Abandoned at shutdown: unmarked, so the next worker runs it again at once.
                log.info("attempt abandoned", extra=_ids(dispatch, event="provider.abandoned"))
            raise
        if isinstance(outcome, Completed):
            for n in range(1, outcome.repeat + 1):
                event_id = f"{key}:completed" + (f":{n}" if n > 1 else "")
                sent.append(
                    await self.send_result(dispatch, "completed", event_id, adapter, outcome)
                )
        elif isinstance(outcome, Failed):
            sent.append(
                await self.send_result(dispatch, "failed", f"{key}:failed", adapter, outcome)
            )
        for future in sent:
            await future
        self.handled.add(key)
        outcome_name = {Completed: "completed", Failed: "failed"}.get(type(outcome), "no_answer")
        self.metrics.calls.labels(dispatch.provider, outcome_name).inc()
        self.metrics.latency.labels(dispatch.provider).observe(time.monotonic() - started)
        self.metrics.observe_genai(
            str(request["gen_ai.provider.name"]), dispatch.model, call, call_s
        )
        log.info(
            "attempt finished",
            extra=_ids(
                dispatch,
                event="provider.attempt",
                outcome=type(outcome).__name__.lower(),
                latency_ms=int((time.monotonic() - started) * 1000),
            ),
        )

    async def call(self, adapter: ProviderAdapter | None, dispatch: Dispatch) -> Outcome:
        if adapter is None:
            return Failed(
                error=RawProviderError(
                    kind="http",
                    http_status=401,
                    code="no_credentials",
                    message=f"provider {dispatch.provider} has no adapter on this worker "
                    "(disabled, or its API key is not set)",
                ),
                latency_ms=0,
            )
        guard = dispatch.timeout_ms / 1000 + 10
        started = time.monotonic()
        try:
            return await asyncio.wait_for(adapter.call(dispatch), timeout=guard)
        except TimeoutError:
            return Failed(
                error=RawProviderError(kind="timeout", message=f"no answer within {guard:.0f} s"),
                latency_ms=int((time.monotonic() - started) * 1000),
            )

    async def send_result(
        self,
        dispatch: Dispatch,
        kind: str,
        event_id: str,
        adapter: ProviderAdapter | None,
        outcome: Outcome | None = None,
    ) -> asyncio.Future[Any]:
        fields: dict[str, Any] = {}
        if isinstance(outcome, Completed):
            raw_usage = outcome.raw_usage
            try:
                if raw_usage is not None:
                    check_tree(raw_usage, RAW_USAGE, name="raw_usage")
            except ValueError as exc:  # kept out, not fatal: the usage is estimated instead
                log.warning(
                    "raw usage dropped", extra={"event": "provider.usage_dropped", "why": str(exc)}
                )
                raw_usage = None
            fields = {
                "output": outcome.output,
                "raw_usage": raw_usage,
                "usage_shape": outcome.usage_shape,
                "latency_ms": outcome.latency_ms,
                "model": outcome.model or dispatch.model,
            }
        elif isinstance(outcome, Failed):
            fields = {"error": outcome.error, "latency_ms": outcome.latency_ms}
        result = ProviderResult(
            type=kind,
            event_id=event_id,
            job_id=dispatch.job_id,
            attempt_id=dispatch.attempt_id,
            provider=dispatch.provider,
            provider_kind=adapter.kind if adapter else "unknown",
            model=fields.pop("model", dispatch.model),
            occurred_at=datetime.now(UTC),
            trace=dispatch.trace,
            **fields,
        )
        value = encode(result)
        if len(value) > self.settings.max_result_bytes:
            # The job core reads no result over the limit: say why the attempt failed instead.
            log.warning(
                "answer over the result limit",
                extra={"event": "provider.result_too_large", "bytes": len(value)},
            )
            result = result.model_copy(
                update={
                    "type": "failed",
                    "output": None,
                    "raw_usage": None,
                    "usage_shape": None,
                    "error": RawProviderError(
                        kind="malformed",
                        message=(
                            f"the provider's answer is {len(value)} bytes as a result, over "
                            f"CP_MAX_RESULT_BYTES ({self.settings.max_result_bytes})"
                        ),
                    ),
                }
            )
            value = encode(result)
        headers = to_headers(dispatch.trace)
        future: asyncio.Future[Any] = await self.producer.send(
            self.results_topic, value=value, key=dispatch.job_id.encode(), headers=headers
        )
        return future

    async def dead_letter(self, record: Any, reason: str, detail: str) -> None:
        from streams.deadletter import dead_letter_record

        letter = dead_letter_record(
            reason=reason,
            detail=detail,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            payload=record.value,
        )
        log.warning("dead letter", extra={"event": "dead_letter", "reason": reason})
        self.metrics.dead_letters.labels(reason).inc()
        await self.producer.send_and_wait(
            self.dlq_topic, value=encode(letter), key=f"{record.topic}:{record.partition}".encode()
        )


def _ids(dispatch: Dispatch, **extra: Any) -> dict[str, Any]:
    return {
        "job_id": dispatch.job_id,
        "attempt_id": dispatch.attempt_id,
        "provider": dispatch.provider,
        "tenant_id": dispatch.tenant_id,
        **extra,
    }


async def serve(settings: Settings) -> None:
    resolved = load_providers(settings)
    report_providers(resolved, worker="providers")
    catalogue = resolved.catalogue
    adapters = build_adapters(catalogue, timeout_s=settings.provider_timeout_s)
    worker = ProviderWorker(settings, catalogue, adapters, data_dir=settings.provider_data_dir)
    # Completion webhooks: their own consumer group, in this process (providers.webhooks).
    from providers.webhooks import WebhookSender

    webhooks = WebhookSender(settings, worker.metrics)

    def stop() -> None:
        worker.request_stop()
        webhooks.request_stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop)
    runner = web.AppRunner(status_app(worker))
    await runner.setup()
    site = web.TCPSite(runner, settings.web_host, settings.provider_web_port)
    await site.start()
    sending = asyncio.create_task(webhooks.run())
    try:
        await worker.run()
    finally:
        webhooks.request_stop()
        with contextlib.suppress(Exception):
            await sending
        await runner.cleanup()


WORKER: web.AppKey[ProviderWorker] = web.AppKey("worker", ProviderWorker)


def status_app(worker: ProviderWorker) -> web.Application:
    """Health and readiness of the provider worker (and, with observability, its metrics)."""
    app = web.Application(middlewares=[problem_documents])
    app[WORKER] = worker

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        assigned = len(request.app[WORKER].consumer.assignment())
        stopping = worker.stopping.is_set()
        ready = assigned > 0 and not stopping
        body = {
            "ready": ready,
            "partitions": assigned,
            "in_flight": len(worker.inflight),
            "stopping": stopping,
        }
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(request.app[WORKER].metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def main() -> None:
    from streams.logs import configure_logging

    settings = get_settings()
    configure_logging(settings)
    setup_tracing("provider-worker")
    try:
        asyncio.run(serve(settings))
    except MissingDispatchTopics as exc:
        raise SystemExit(f"provider worker not started: {exc}") from None


if __name__ == "__main__":
    main()
