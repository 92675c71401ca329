"""The webhook sender: consume cp.webhooks, POST each finished job's response to its callback URL.

Its own consumer group (`webhook_group_id`), run inside the provider worker process. Each
delivery is a task: signed POST (domain.webhooks), retried with exponential backoff until 2xx or
until the next attempt would come later than `webhook_max_age_s` after the job ended. Only the
POSTs take a slot (`webhook_concurrency`); a delivery waiting for its retry holds none, and a slow
receiver holds up no other delivery. Offsets commit up to the oldest delivery not finished
(delivered or given up), so a crash sends again what was not finished, with the same webhook-id
(at least once). Every attempt goes to cp.commands as a `RecordWebhook` command, which the job
core records on the job's timeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiokafka import ConsumerRebalanceListener, TopicPartition
from pydantic import ValidationError

from domain.codec import DecodeError, encode, load_json, upcast
from domain.commands import RecordWebhook
from domain.messages import WebhookDelivery
from domain.webhooks import backoff_s, parse_allowed_hosts, refusal, sign
from providers.worker import (
    COMMIT_EVERY_S,
    OffsetTracker,
    ProviderMetrics,
    group_consumer,
    idempotent_producer,
)
from streams.settings import Settings
from streams.tracing import to_headers
from streams.webhook_secrets import tenant_secrets

log = logging.getLogger("providers.webhooks")

#: Deliveries held at once (most of them waiting for a retry); past it the consumer pauses.
MAX_PENDING = 10_000
USER_AGENT = "prompt-gateway-control-plane-webhooks/1"


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sender: WebhookSender) -> None:
        self.sender = sender

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.sender.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        return None


class WebhookSender:
    def __init__(self, settings: Settings, metrics: ProviderMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ProviderMetrics()
        self.topic = settings.topic("cp.webhooks")
        self.commands_topic = settings.topic("cp.commands")
        self.dlq_topic = settings.topic("cp.dlq")
        self.rules = parse_allowed_hosts(settings.webhook_allowed_hosts)
        self.tracker = OffsetTracker()
        self.slots = asyncio.Semaphore(max(1, settings.webhook_concurrency))
        #: (partition, offset) -> the task delivering that record.
        self.tasks: dict[tuple[TopicPartition, int], asyncio.Task[None]] = {}
        self.stopping = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self.consumer = group_consumer(settings, settings.webhook_group_id, fetch_max_wait_ms=100)
        self.producer = idempotent_producer(settings)

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s),
            headers={"User-Agent": USER_AGENT},
        )
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        log.info("webhook sender started", extra={"event": "webhook.started", "topic": self.topic})

    def request_stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        await self.start()
        try:
            loop = asyncio.get_running_loop()
            committed_at = loop.time()
            while not self.stopping.is_set():
                assignment = self.consumer.assignment()
                if len(self.tasks) >= MAX_PENDING:
                    self.consumer.pause(*assignment)
                else:
                    self.consumer.resume(*assignment)
                batches = await self.consumer.getmany(timeout_ms=200)
                for tp, records in batches.items():
                    for record in records:
                        self.take(tp, record)
                if not batches or loop.time() - committed_at >= COMMIT_EVERY_S:
                    await self.commit()
                    committed_at = loop.time()
        finally:
            await self.shutdown()

    def take(self, tp: TopicPartition, record: Any) -> None:
        self.tracker.start(tp, record.offset)
        try:
            data = load_json(record.value)
            delivery = WebhookDelivery.model_validate(upcast("webhook_delivery", data))
        except (DecodeError, ValidationError) as exc:
            log.warning(
                "unreadable webhook delivery dropped",
                extra={"event": "webhook.unreadable", "offset": record.offset, "why": str(exc)},
            )
            self.tracker.done(tp, record.offset)
            return
        task = asyncio.create_task(self.deliver(delivery))
        self.tasks[(tp, record.offset)] = task
        self.metrics.webhook_pending.inc()

        def finished(done: asyncio.Task[None]) -> None:
            self.metrics.webhook_pending.dec()
            self.tasks.pop((tp, record.offset), None)
            if not done.cancelled():
                self.tracker.done(tp, record.offset)

        task.add_done_callback(finished)

    async def commit(self) -> None:
        await self.tracker.commit(self.consumer, "webhook offset commit failed")

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        """Commit what is finished, then drop the deliveries of partitions taken away: their
        next owner sends them (again: at least once)."""
        await self.commit()
        for (tp, _), task in list(self.tasks.items()):
            if tp in revoked:
                task.cancel()
        self.tracker.forget(revoked)

    async def shutdown(self) -> None:
        """Cancel unfinished deliveries (left uncommitted for the next sender); commit the rest."""
        self.stopping.set()
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        with contextlib.suppress(Exception):
            await self.producer.flush()
            await self.commit()
        await self.consumer.stop()
        await self.producer.stop()
        if self.session is not None:
            await self.session.close()

    # -- one delivery ------------------------------------------------------------------------------

    async def deliver(self, delivery: WebhookDelivery) -> None:
        settings = self.settings
        ended = delivery.response.finished_at
        if ended.tzinfo is None:
            ended = ended.replace(tzinfo=UTC)
        give_up_at = ended + timedelta(seconds=settings.webhook_max_age_s)
        attempt = 0
        body = encode(delivery.response)
        while True:
            attempt += 1
            why = refusal(delivery.callback_url, self.rules)
            secret = tenant_secrets(settings).get(delivery.tenant_id)
            if why is None and secret is None:
                why = f"tenant {delivery.tenant_id} has no webhook signing secret"
            if why is not None:
                await self.record(delivery, attempt, "gave_up", error=why)
                return
            assert secret is not None
            status, latency_ms, error = await self.post(delivery, secret, body)
            if status is not None and 200 <= status < 300:
                await self.record(delivery, attempt, "delivered", status, latency_ms)
                return
            wait = backoff_s(
                attempt, base_s=settings.webhook_retry_base_s, max_s=settings.webhook_retry_max_s
            )
            next_at = datetime.now(UTC) + timedelta(seconds=wait)
            if next_at > give_up_at:
                await self.record(
                    delivery, attempt, "gave_up", status, latency_ms, error=error, last=True
                )
                return
            await self.record(
                delivery, attempt, "failed", status, latency_ms, error=error, next_at=next_at
            )
            await asyncio.sleep(wait)

    async def post(
        self, delivery: WebhookDelivery, secret: str, body: bytes
    ) -> tuple[int | None, int, str | None]:
        """One signed POST: (status or None, latency in ms, what went wrong or None)."""
        assert self.session is not None
        async with self.slots:
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "webhook-id": delivery.delivery_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(secret, delivery.delivery_id, timestamp, body),
            }
            started = time.monotonic()
            try:
                async with self.session.post(
                    delivery.callback_url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    await response.read()
                    status: int | None = response.status
                    error = None if 200 <= response.status < 300 else f"HTTP {response.status}"
            except TimeoutError:
                status, error = None, f"no answer within {self.settings.webhook_timeout_s:g} s"
            except aiohttp.ClientError as exc:
                status, error = None, f"{type(exc).__name__}: {exc}"[:500]
            latency_ms = int((time.monotonic() - started) * 1000)
        self.metrics.webhook_latency.observe(latency_ms / 1000)
        log.info(
            "webhook attempt",
            extra={
                "event": "webhook.attempt",
                "job_id": delivery.job_id,
                "delivery_id": delivery.delivery_id,
                "status": status,
                "latency_ms": latency_ms,
                "error": error,
            },
        )
        return status, latency_ms, error

    async def record(
        self,
        delivery: WebhookDelivery,
        attempt: int,
        outcome: str,
        status: int | None = None,
        latency_ms: int | None = None,
        *,
        error: str | None = None,
        next_at: datetime | None = None,
        last: bool = False,
    ) -> None:
        """Put the attempt on cp.commands for the job's timeline (acknowledged before going on)."""
        self.metrics.webhook_attempts.labels(outcome).inc()
        if last and error is not None:
            error = f"{error}; no attempt left within {self.settings.webhook_max_age_s:g} s"
        command = RecordWebhook(
            command_id=f"webhook:{delivery.delivery_id}:{attempt}:{uuid.uuid4().hex[:12]}",
            job_id=delivery.job_id,
            at=datetime.now(UTC),
            delivery_id=delivery.delivery_id,
            attempt=attempt,
            outcome=outcome,
            status_code=status,
            latency_ms=latency_ms,
            error=error[:1000] if error else None,
            next_attempt_at=next_at,
        )
        if outcome != "delivered":
            log.warning(
                "webhook not delivered",
                extra={
                    "event": f"webhook.{outcome}",
                    "job_id": delivery.job_id,
                    "attempt": attempt,
                    "why": error,
                },
            )
        try:
            await self.producer.send_and_wait(
                self.commands_topic,
                value=encode(command),
                key=delivery.job_id.encode(),
                headers=to_headers(delivery.trace),
            )
        except Exception:  # the timeline misses this attempt; the delivery itself goes on
            log.warning("webhook attempt not recorded", exc_info=True)
