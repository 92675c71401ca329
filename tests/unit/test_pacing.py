"""FetchPacer: quiet consumers fetch at once; busy ones gather for CP_FETCH_GATHER_MS."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from streams.pacing import GATHER_MIN_BYTES, WINDOW_S, FetchPacer
from streams.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def consumer() -> SimpleNamespace:
    # aiokafka's consumer reads these two from its fetcher for every fetch it builds
    return SimpleNamespace(_fetcher=SimpleNamespace(_fetch_min_bytes=1, _fetch_max_wait_ms=100))


def run(pacer: FetchPacer, clock: Clock, records_per_s: float, seconds: float) -> None:
    """Polls every 10 ms bringing `records_per_s` on average."""
    for _ in range(int(seconds / 0.01)):
        clock.now += 0.01
        pacer.observe(int(records_per_s * 0.01))


def test_a_busy_consumer_gathers_and_a_quiet_one_answers_at_once() -> None:
    clock, c = Clock(), consumer()
    pacer = FetchPacer(c, idle_wait_ms=100, gather_ms=40, clock=clock)
    assert pacer.threshold == 50.0  # two records per 40 ms window

    run(pacer, clock, 0, 2)
    assert (c._fetcher._fetch_min_bytes, c._fetcher._fetch_max_wait_ms) == (1, 100)

    run(pacer, clock, 300, 2)
    assert pacer.gathering
    assert (c._fetcher._fetch_min_bytes, c._fetcher._fetch_max_wait_ms) == (GATHER_MIN_BYTES, 40)

    run(pacer, clock, 0, 2)
    assert not pacer.gathering
    assert (c._fetcher._fetch_min_bytes, c._fetcher._fetch_max_wait_ms) == (1, 100)


def test_the_rate_is_judged_over_a_window_not_one_poll() -> None:
    clock, c = Clock(), consumer()
    pacer = FetchPacer(c, idle_wait_ms=100, gather_ms=40, clock=clock)
    # one poll bringing 20 records, then nothing for the rest of the window: 40 records/s < 50
    clock.now += 0.01
    pacer.observe(20)
    clock.now += WINDOW_S
    pacer.observe(0)
    assert not pacer.gathering
    # 30 in the next window: 60 records/s
    clock.now += 0.01
    pacer.observe(30)
    clock.now += WINDOW_S - 0.01
    pacer.observe(0)
    assert pacer.gathering
    assert c._fetcher._fetch_max_wait_ms == 40


def test_zero_never_gathers() -> None:
    clock, c = Clock(), consumer()
    pacer = FetchPacer(c, idle_wait_ms=100, gather_ms=0, clock=clock)
    clock.now += 1
    pacer.observe(100_000)
    assert not pacer.gathering
    assert (c._fetcher._fetch_min_bytes, c._fetcher._fetch_max_wait_ms) == (1, 100)


def test_a_consumer_not_started_yet_gets_the_choice_at_the_next_window() -> None:
    clock, c = Clock(), SimpleNamespace()
    pacer = FetchPacer(c, idle_wait_ms=100, gather_ms=40, clock=clock)
    run(pacer, clock, 300, 1)
    assert pacer.gathering
    c._fetcher = consumer()._fetcher
    run(pacer, clock, 300, 1)
    assert (c._fetcher._fetch_min_bytes, c._fetcher._fetch_max_wait_ms) == (GATHER_MIN_BYTES, 40)


def test_setting_default_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().fetch_gather_ms == 40
    monkeypatch.setenv("CP_FETCH_GATHER_MS", "0")
    assert Settings().fetch_gather_ms == 0
    monkeypatch.setenv("CP_FETCH_GATHER_MS", "-1")
    with pytest.raises(ValueError, match="fetch_gather_ms"):
        Settings()


def test_the_workers_pacer_takes_both_waits_from_the_settings() -> None:
    pacer = FetchPacer.of(consumer(), Settings(fetch_max_wait_ms=250, fetch_gather_ms=60))
    assert (pacer.idle_wait_ms, pacer.gather_ms) == (250, 60)


def test_a_new_gather_window_applies_at_once_while_gathering() -> None:
    clock, c = Clock(), consumer()
    pacer = FetchPacer(c, idle_wait_ms=100, gather_ms=40, clock=clock)
    pacer.set_gather(160)
    assert pacer.threshold == 12.5 and not pacer.gathering
    assert c._fetcher._fetch_max_wait_ms == 100  # quiet: still answering at once
    run(pacer, clock, 300, 2)
    assert (c._fetcher._fetch_min_bytes, c._fetcher._fetch_max_wait_ms) == (GATHER_MIN_BYTES, 160)
    pacer.set_gather(80)
    assert c._fetcher._fetch_max_wait_ms == 80
    pacer.set_gather(0)
    assert not pacer.gathering
    assert (c._fetcher._fetch_min_bytes, c._fetcher._fetch_max_wait_ms) == (1, 100)


def test_gathering_per_worker_is_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().fetch_gather_per_worker is False
    monkeypatch.setenv("CP_FETCH_GATHER_PER_WORKER", "true")
    assert Settings().fetch_gather_per_worker is True
