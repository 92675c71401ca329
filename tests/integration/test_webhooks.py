"""Completion webhooks on the real broker, against a local receiver that fails, delays, duplicates.

One stack of its own (control-plane worker + provider worker, which runs the webhook sender), a
receiver on 127.0.0.1 allowed by CP_WEBHOOK_ALLOWED_HOSTS, short retry timings. Job A's receiver
answers 500 twice, then holds the third POST past the sender's timeout (it does get it: a
duplicate follows), then answers 200. Job B's receiver fails until the sender is SIGKILLed
mid-retry; after the restart it answers 200 and B is still delivered, with the same webhook-id.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from domain.ids import job_id_for
from tests.support.stack import TopicReader, new_stack, produce, to_json
from tests.support.workers import free_port, http_get

pytestmark = pytest.mark.integration

TENANT = "hooks"
SECRET = "whsec_" + base64.b64encode(b"integration-secret-0123456789").decode()


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float = field(default_factory=time.monotonic)


def signature_ok(headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks verification, written out here independently of domain.webhooks."""
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    if abs(time.time() - int(headers["webhook-timestamp"])) > 300:
        return False
    return any(
        hmac.compare_digest(s.removeprefix("v1,"), expected)
        for s in headers["webhook-signature"].split()
    )


class Receiver:
    """/a: 500, 500, a 3 s answer (past the 1 s timeout), then 200. /b: 500 until `b_ok`."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.b_ok = False

    def of(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        path = request.path
        n = len(self.of(path)) + 1
        failing = n <= 2 if path == "/a" else not self.b_ok
        status = 500 if failing else 200
        self.hits.append(Hit(path, headers, body, status))
        if path == "/a" and n == 3:
            await asyncio.sleep(3)  # the sender gave up waiting: it will send it again
        return web.Response(status=status)


async def refused_over_http(url: str, port: int) -> None:
    """POST /jobs: a host not allowed, or a tenant without a secret, is a 422 naming the setting."""
    cases = [
        ("key-h", "https://internal.corp/x", "CP_WEBHOOK_ALLOWED_HOSTS"),
        ("key-h", f"http://127.0.0.2:{port}/x", "CP_WEBHOOK_ALLOWED_HOSTS"),
        ("key-h", "http://user:pw@127.0.0.1/x", "credentials"),
        ("key-x", f"http://127.0.0.1:{port}/x", "CP_WEBHOOK_SECRETS"),
    ]
    async with aiohttp.ClientSession() as session:
        for n, (key, callback, named) in enumerate(cases):
            body = {
                "request_id": f"refused-{n}",
                "messages": [{"role": "user", "content": "hi"}],
                "callback_url": callback,
            }
            async with session.post(
                f"{url}/jobs", json=body, headers={"Authorization": f"Bearer {key}"}
            ) as response:
                problem = await response.json(content_type=None)
                assert response.status == 422, problem
                assert named in str(problem), problem


def events_of(reader: TopicReader, job_id: str) -> list[dict[str, Any]]:
    return [v for v in reader.values() if v["job_id"] == job_id]


def webhook_events(reader: TopicReader, job_id: str) -> list[dict[str, Any]]:
    return [e for e in events_of(reader, job_id) if e["type"].startswith("webhook_")]


def metric(text: str, name: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def test_webhooks_are_retried_signed_deduplicable_and_survive_a_sender_crash(
    kafka_bootstrap: str, run_id: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/{name}", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    stack = await asyncio.to_thread(new_stack, kafka_bootstrap, run_id, "hooks", tmp_path)
    stack.env.update(
        {
            "CP_WEBHOOK_ALLOWED_HOSTS": "http://127.0.0.1",
            "CP_WEBHOOK_SECRETS": f"{TENANT}={SECRET}",
            "CP_WEBHOOK_TIMEOUT_S": "1",
            "CP_WEBHOOK_RETRY_BASE_S": "0.5",
            "CP_WEBHOOK_RETRY_MAX_S": "1",
            "CP_WEBHOOK_MAX_AGE_S": "300",
            "CP_API_KEYS": f"key-h={TENANT},key-x=no-secret",
        }
    )
    try:
        await asyncio.to_thread(stack.start_cp)
        providers = await asyncio.to_thread(stack.start_providers)
        assert stack.cp is not None
        await refused_over_http(stack.cp.url, port)
        jobs = {name: job_id_for(TENANT, f"wh-{name}") for name in ("a", "b", "none")}
        await produce(
            kafka_bootstrap,
            stack.topic("cp.intake"),
            [
                to_json(
                    {
                        "request_id": f"wh-{name}",
                        "tenant_id": TENANT,
                        "messages": [{"role": "user", "content": f"webhook {name}"}],
                        "simulate": {"outcomes": {"sim-cheap": ["ok"]}},
                        **(
                            {"callback_url": f"http://127.0.0.1:{port}/{name}"}
                            if name != "none"
                            else {}
                        ),
                    }
                )
                for name in jobs
            ],
        )
        async with (
            TopicReader(kafka_bootstrap, stack.topic("cp.events")) as events,
            TopicReader(kafka_bootstrap, stack.topic("cp.responses")) as responses,
        ):
            # A: two 500s, a timeout (received nonetheless), then delivered.
            await events.until(
                lambda _: any(
                    e["type"] == "webhook_delivered" for e in webhook_events(events, jobs["a"])
                ),
                timeout=60,
                what="job A's webhook delivered",
            )
            a_hits = receiver.of("/a")
            assert [h.status for h in a_hits] == [500, 500, 200, 200]
            a_events = webhook_events(events, jobs["a"])
            assert [e["type"] for e in a_events] == [
                "webhook_failed",
                "webhook_failed",
                "webhook_failed",
                "webhook_delivered",
            ]
            assert [e["data"]["attempt"] for e in a_events] == [1, 2, 3, 4]
            assert [e["data"]["status_code"] for e in a_events] == [500, 500, None, 200]
            assert "no answer within 1 s" in a_events[2]["data"]["error"]
            assert all(e["data"]["delivery_id"] == f"whd_{jobs['a']}" for e in a_events)
            # The same webhook-id every time (a receiver dedups by it), each signature valid.
            assert {h.headers["webhook-id"] for h in a_hits} == {f"whd_{jobs['a']}"}
            assert all(signature_ok(h.headers, h.body) for h in a_hits)
            assert len({h.headers["webhook-timestamp"] for h in a_hits}) >= 2
            await responses.until(
                lambda rs: any(r.key == jobs["a"].encode() for r in rs),
                timeout=10,
                what="A's response",
            )
            [final] = [
                orjson.loads(r.value) for r in responses.records if r.key == jobs["a"].encode()
            ]
            assert all(orjson.loads(h.body) == final for h in a_hits)
            assert final["state"] == "COMPLETED"

            # B: failing; SIGKILL the sender mid-retry, let the receiver recover, restart it.
            await events.until(
                lambda _: len(webhook_events(events, jobs["b"])) >= 2,
                timeout=30,
                what="two failed attempts of B",
            )
            await asyncio.sleep(0.5)  # A's offset commits once it is delivered (not B's)
            # The sender's metrics count what the receiver saw.
            status, body = await asyncio.to_thread(http_get, providers.url + "/metrics")
            assert status == 200
            metrics = body.decode()
            assert metric(metrics, 'webhook_attempts_total{outcome="failed"}') >= 2, metrics
            assert metric(metrics, 'webhook_attempts_total{outcome="delivered"}') >= 1, metrics
            assert metric(metrics, "webhook_deliveries_pending") >= 1, metrics
            providers.kill()
            before = len(receiver.of("/b"))
            assert all(h.status == 500 for h in receiver.of("/b"))
            receiver.b_ok = True
            await asyncio.to_thread(stack.start_providers, "providers-2")
            await events.until(
                lambda _: any(
                    e["type"] == "webhook_delivered" for e in webhook_events(events, jobs["b"])
                ),
                timeout=60,
                what="job B's webhook delivered after the sender's restart",
            )
            b_hits = receiver.of("/b")
            assert len(b_hits) > before and b_hits[-1].status == 200
            assert {h.headers["webhook-id"] for h in b_hits} == {f"whd_{jobs['b']}"}
            assert all(signature_ok(h.headers, h.body) for h in b_hits)
            b_events = webhook_events(events, jobs["b"])
            assert b_events[-1]["type"] == "webhook_delivered"
            assert {e["type"] for e in b_events[:-1]} == {"webhook_failed"}

            # A job without a callback_url sends nothing; A is not sent again after delivery.
            await asyncio.sleep(1.5)
            assert receiver.of("/none") == []
            assert len(receiver.of("/a")) == 4
            assert [e["type"] for e in events_of(events, jobs["none"])][-1] == "completed"
    finally:
        await asyncio.to_thread(stack.stop)
        await runner.cleanup()
