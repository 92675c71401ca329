"""Agent-tier fixtures: the real faust app and agents, driven by `test_context()`, no broker.

`streams.app` builds the faust app at import from settings read once from the environment, so it
is imported here, at conftest import time, with the environment pointing it at an in-memory table
store, a temporary data dir and an app id of its own. The variables are restored right after the
import: worker processes that later tiers of the same session start inherit `os.environ`, and they
must not run on `memory://`.

What the agents send is captured by replacing `streams.agents._send` (commands and outbox entries)
and `send_dead_letter` (dead letters) with recording fakes: the real ones need a running producer.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from domain.messages import DeadLetter

_DATA_DIR = tempfile.mkdtemp(prefix="cp-agents-")
atexit.register(shutil.rmtree, _DATA_DIR, ignore_errors=True)
_TEST_ENV = {
    "CP_STORE": "memory://",
    "CP_DATA_DIR": _DATA_DIR,
    "CP_APP_ID": f"agents-{uuid.uuid4().hex[:10]}",
    "CP_TOPIC_PREFIX": "",
}
#: Set when streams.app was imported before this conftest (then its settings are not ours).
APP_IMPORTED_EARLY = "streams.app" in sys.modules


def _import_app_with_test_env() -> None:
    saved = {name: os.environ.get(name) for name in _TEST_ENV}
    os.environ.update(_TEST_ENV)
    try:
        import streams.app  # noqa: F401  (builds the app from the environment set above)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_import_app_with_test_env()

import streams.agents as agents  # noqa: E402

import streams.deadletter as deadletter  # noqa: E402
from streams.app import app, runtime, settings  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _app_on_memory_store() -> None:
    if APP_IMPORTED_EARLY or settings.store != "memory://":
        pytest.fail(
            "streams.app was imported before tests/agents/conftest.py with "
            f"CP_STORE={settings.store!r}: the agent tier needs memory://"
        )


@dataclass
class Sent:
    """One record an agent sent: topic name, key, value bytes, headers."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = orjson.loads(self.value)
        return data

    def header(self, name: str) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


@dataclass
class Capture:
    """What the agents sent, in order; delivery futures stay pending until `acknowledge`."""

    sent: list[Sent] = field(default_factory=list)
    dead: list[tuple[str, bytes, DeadLetter]] = field(default_factory=list)
    futures: list[asyncio.Future[Any]] = field(default_factory=list)

    def to(self, topic: str) -> list[Sent]:
        return [s for s in self.sent if s.topic == topic]

    def reasons(self) -> list[str]:
        return [record.reason for _, _, record in self.dead]

    def clear(self) -> None:
        self.sent.clear()
        self.dead.clear()

    def acknowledge(self) -> None:
        """Kafka acknowledges every send so far (the agent marks them published next step)."""
        for future in self.futures:
            if not future.done():
                future.set_result(None)


@pytest.fixture
async def capture(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Capture]:
    """Replace the agents' producer sends and dead-letter sends with recorders."""
    captured = Capture()

    async def fake_send(
        topic: Any, key: bytes, value: bytes, headers: list[tuple[str, bytes]] | None
    ) -> asyncio.Future[Any]:
        captured.sent.append(Sent(topic.get_topic_name(), key, value, list(headers or [])))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        captured.futures.append(future)
        return future

    async def fake_dead_letter(dlq: Any, record: DeadLetter) -> None:
        key = f"{record.topic}:{record.partition}".encode()
        captured.dead.append((dlq.get_topic_name(), key, record))

    monkeypatch.setattr(agents, "_send", fake_send)
    monkeypatch.setattr(agents, "send_dead_letter", fake_dead_letter)
    monkeypatch.setattr(deadletter, "send_dead_letter", fake_dead_letter)
    yield captured
    # Delivery watchers of this test's outbox sends must not outlive its event loop.
    for task in list(agents._background):
        task.cancel()
    await asyncio.gather(*agents._background, return_exceptions=True)
    for future in captured.futures:
        future.cancel()


@pytest.fixture(autouse=True)
def _fresh_runtime() -> Iterator[None]:
    """Per-worker runtime state (acks, timers, health) must not leak between tests."""
    runtime.delivered.clear()
    runtime.wake.clear()
    runtime.health.providers.clear()
    yield
    runtime.delivered.clear()
    runtime.wake.clear()
    runtime.health.providers.clear()


@dataclass(frozen=True)
class ChangelogWrite:
    topic: str
    key: Any
    value: Any


def _drain_changelog() -> list[ChangelogWrite]:
    """Take the table's changelog writes out of the (never started) producer's buffer."""
    pending = app.producer.buffer.pending
    writes = []
    while not pending.empty():
        message = pending.get_nowait().message
        writes.append(ChangelogWrite(message.channel.get_topic_name(), message.key, message.value))
    return writes


@pytest.fixture
def changelog() -> Iterator[Any]:
    """Return a function listing the changelog writes since the test began (or the last call)."""
    _drain_changelog()
    yield _drain_changelog
    _drain_changelog()


@pytest.fixture
def unique() -> str:
    """A request id no other test uses: the job table lives as long as the session."""
    return "r-" + uuid.uuid4().hex[:12]
