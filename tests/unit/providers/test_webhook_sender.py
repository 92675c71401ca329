"""The webhook sender's delivery loop, without Kafka: a real local receiver, attempts captured."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiokafka import TopicPartition
from pydantic import SecretStr

from domain.commands import RecordWebhook
from domain.messages import FinalResponse, JobCost, WebhookDelivery
from domain.webhooks import verify
from providers.webhooks import WebhookSender
from streams.settings import Settings

SECRET = "s3cret-of-tenant-a"


@dataclass
class Seen:
    headers: dict[str, str]
    body: bytes


class Receiver:
    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.seen: list[Seen] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(dict(request.headers), await request.read()))
        status = self.statuses[min(len(self.seen), len(self.statuses)) - 1]
        return web.Response(status=status)


@pytest.fixture
async def receiver_url() -> AsyncIterator[tuple[Receiver, str]]:
    receiver = Receiver([500, 503, 204])
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield receiver, f"http://127.0.0.1:{port}/hook"
    await runner.cleanup()


def delivery(url: str, *, ended: datetime | None = None) -> WebhookDelivery:
    at = ended or datetime.now(UTC)
    response = FinalResponse(
        job_id="job_1",
        request_id="r-1",
        tenant_id="tenant-a",
        state="COMPLETED",
        output=None,
        provider="sim-cheap",
        model="m",
        usage=None,
        cost=JobCost(total=None),
        error=None,
        attempts=1,
        created_at=at,
        finished_at=at,
    )
    return WebhookDelivery(
        delivery_id="whd_job_1",
        job_id="job_1",
        tenant_id="tenant-a",
        callback_url=url,
        response=response,
    )


async def sender(**overrides: Any) -> tuple[WebhookSender, list[RecordWebhook]]:
    fields: dict[str, Any] = {
        "webhook_allowed_hosts": "http://127.0.0.1",
        "webhook_secrets": SecretStr(f"tenant-a={SECRET}"),
        "webhook_retry_base_s": 0.01,
        "webhook_retry_max_s": 0.02,
        "webhook_timeout_s": 2,
        **overrides,
    }
    sender = WebhookSender(Settings(**fields))
    await sender.consumer.stop()  # never started: closed so that nothing warns
    await sender.producer.stop()
    sender.session = aiohttp.ClientSession()
    recorded: list[RecordWebhook] = []

    class Producer:
        async def send_and_wait(
            self, topic: str, *, value: bytes, key: bytes, headers: Any
        ) -> None:
            recorded.append(RecordWebhook.model_validate_json(value))
            assert key == b"job_1" and topic == sender.commands_topic

    sender.producer = Producer()
    return sender, recorded


async def test_failed_attempts_are_retried_with_the_same_id_until_delivered(
    receiver_url: tuple[Receiver, str],
) -> None:
    receiver, url = receiver_url
    s, recorded = await sender()
    try:
        await s.deliver(delivery(url))
    finally:
        await s.session.close()  # type: ignore[union-attr]
    assert [r.outcome for r in recorded] == ["failed", "failed", "delivered"]
    assert [r.attempt for r in recorded] == [1, 2, 3]
    assert [r.status_code for r in recorded] == [500, 503, 204]
    assert recorded[0].next_attempt_at is not None
    assert {seen.headers["webhook-id"] for seen in receiver.seen} == {"whd_job_1"}
    now = int(datetime.now(UTC).timestamp())
    for seen in receiver.seen:
        headers = {k.lower(): v for k, v in seen.headers.items()}
        assert verify(SECRET, headers, seen.body, now=now)
        assert FinalResponse.model_validate_json(seen.body).job_id == "job_1"


async def test_a_delivery_gives_up_when_the_next_attempt_would_pass_its_max_age(
    receiver_url: tuple[Receiver, str],
) -> None:
    receiver, url = receiver_url
    receiver.statuses = [500]
    s, recorded = await sender(webhook_max_age_s=60)
    try:
        await s.deliver(delivery(url, ended=datetime.now(UTC) - timedelta(seconds=59.99)))
    finally:
        await s.session.close()  # type: ignore[union-attr]
    assert [r.outcome for r in recorded] == ["gave_up"]
    assert recorded[0].status_code == 500 and "no attempt left" in (recorded[0].error or "")
    assert len(receiver.seen) == 1


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"webhook_allowed_hosts": ""}, "CP_WEBHOOK_ALLOWED_HOSTS"),
        ({"webhook_secrets": None}, "no webhook signing secret"),
    ],
)
async def test_a_delivery_the_settings_no_longer_allow_is_given_up_unsent(
    receiver_url: tuple[Receiver, str], overrides: dict[str, Any], why: str
) -> None:
    receiver, url = receiver_url
    s, recorded = await sender(**overrides)
    try:
        await s.deliver(delivery(url))
    finally:
        await s.session.close()  # type: ignore[union-attr]
    [only] = recorded
    assert only.outcome == "gave_up" and why in (only.error or "")
    assert receiver.seen == []


async def test_offsets_commit_only_up_to_the_oldest_unfinished_delivery(
    receiver_url: tuple[Receiver, str],
) -> None:
    """A slow delivery holds back the commit of its partition, not the deliveries after it."""
    _, url = receiver_url
    s, _ = await sender()
    gate = asyncio.Event()

    async def deliver(d: WebhookDelivery) -> None:
        if d.job_id == "slow":
            await gate.wait()

    setattr(s, "deliver", deliver)  # noqa: B010 (a stand-in for the method)

    @dataclass
    class Rec:
        value: bytes
        offset: int

    tp = TopicPartition(s.topic, 0)
    slow = delivery(url).model_copy(update={"job_id": "slow"})
    s.take(tp, Rec(slow.model_dump_json().encode(), 0))
    s.take(tp, Rec(delivery(url).model_dump_json().encode(), 1))
    s.take(tp, Rec(b"not json", 2))
    await asyncio.sleep(0.01)
    assert s.tracker.committable() == {tp: 0}
    gate.set()
    await asyncio.sleep(0.01)
    assert s.tracker.committable() == {tp: 3}
    await s.session.close()  # type: ignore[union-attr]
