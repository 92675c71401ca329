"""CP_FETCH_MAX_WAIT_MS reaches the provider worker's consumer; the webhook sender keeps its own."""

from __future__ import annotations

import pytest

from providers.worker import group_consumer
from streams.settings import Settings


async def test_setting_is_the_group_consumers_fetch_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CP_FETCH_MAX_WAIT_MS", "250")
    settings = Settings()
    assert settings.fetch_max_wait_ms == 250
    consumers = [
        group_consumer(settings, "g"),
        group_consumer(settings, "g", fetch_max_wait_ms=100),
    ]
    try:
        assert consumers[0]._fetch_max_wait_ms == 250
        # the webhook sender's own wait, whatever the setting
        assert consumers[1]._fetch_max_wait_ms == 100
    finally:
        for consumer in consumers:
            await consumer.stop()


def test_default_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().fetch_max_wait_ms == 100
    monkeypatch.setenv("CP_FETCH_MAX_WAIT_MS", "0")
    with pytest.raises(ValueError, match="fetch_max_wait_ms"):
        Settings()
