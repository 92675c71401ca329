"""Fixtures for provider adapter tests: a local fake HTTP provider and a dispatch factory."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiohttp import web

from domain.messages import ChatMessage, Dispatch, JobRequest


@dataclass(frozen=True)
class Reply:
    """What the fake provider answers on a path: status, body, headers and an optional delay."""

    status: int = 200
    json: Any = None
    text: str | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass(frozen=True)
class Received:
    """One request the fake provider received."""

    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any


class FakeProvider:
    """A local HTTP server that speaks a provider's wire format and counts requests."""

    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        self.received: list[Received] = []
        self.port = 0
        self._release = asyncio.Event()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reply(self, path: str, **fields: Any) -> None:
        """Answer every request on `path` with a `Reply` built from `fields`."""
        self.replies[path] = Reply(**fields)

    def count(self, path: str) -> int:
        return sum(1 for r in self.received if r.path == path)

    def release(self) -> None:
        """Wake every handler still sleeping in a delayed reply."""
        self._release.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw.decode(errors="replace")
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(Received(request.path, headers, body))
        reply = self.replies.get(request.path)
        if reply is None:
            return web.json_response({"error": {"message": "no reply scripted"}}, status=404)
        if reply.delay_s:
            try:
                async with asyncio.timeout(reply.delay_s):
                    await self._release.wait()
            except TimeoutError:
                pass
        payload = reply.text.encode() if reply.text is not None else orjson.dumps(reply.json)
        return web.Response(
            status=reply.status,
            body=payload,
            headers={"Content-Type": reply.content_type, **reply.headers},
        )


@pytest.fixture
async def fake_provider() -> AsyncIterator[FakeProvider]:
    """Serve a `FakeProvider` on 127.0.0.1 with an ephemeral port."""
    fake = FakeProvider()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.port = runner.addresses[0][1]
    try:
        yield fake
    finally:
        fake.release()
        await runner.cleanup()


@pytest.fixture
def closed_port() -> int:
    """Return a local port nothing listens on, so connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


MakeDispatch = Callable[..., Dispatch]


@pytest.fixture
def make_dispatch() -> MakeDispatch:
    """Return a factory of dispatches; keyword arguments override dispatch or request fields."""

    def make(
        *,
        provider: str = "fake",
        model: str = "fake-model",
        provider_attempt_no: int = 1,
        idempotency_key: str = "job-1:att-1",
        timeout_ms: int = 30_000,
        messages: list[tuple[str, str] | dict[str, Any]] | None = None,
        **request_fields: Any,
    ) -> Dispatch:
        chat = [
            ChatMessage.model_validate(
                m if isinstance(m, dict) else {"role": m[0], "content": m[1]}
            )
            for m in (messages or [("user", "Say hello to the test suite, please.")])
        ]
        request = JobRequest(request_id="req-1", messages=chat, **request_fields)
        return Dispatch(
            job_id="job-1",
            attempt_id=f"att-{provider_attempt_no}",
            attempt_no=provider_attempt_no,
            provider_attempt_no=provider_attempt_no,
            tenant_id="tenant-1",
            provider=provider,
            model=model,
            idempotency_key=idempotency_key,
            request=request,
            dispatched_at=datetime.now(UTC),
            timeout_ms=timeout_ms,
        )

    return make
