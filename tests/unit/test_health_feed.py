"""The cluster health fold (streams.health): cp.health records folded in log order, bad ones
skipped and counted, the fold identical on every worker that reads the same records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry

from domain.policy import load_policy
from streams.health import HealthFeed
from streams.runtime import HealthBook
from streams.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
AT = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def record(offset: int, value: bytes) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(
        topic="cp.health",
        partition=0,
        offset=offset,
        timestamp=int(AT.timestamp() * 1000),
        timestamp_type=0,
        key=b"sim-cheap",
        value=value,
        checksum=None,
        serialized_key_size=9,
        serialized_value_size=len(value),
        headers=(),
    )


def outcome(offset: int, *, ok: bool, provider: str = "sim-cheap") -> ConsumerRecord[Any, Any]:
    at = AT + timedelta(milliseconds=offset)
    body = {"schema_version": 1, "provider": provider, "ok": ok, "latency_ms": 40, "at": at}
    return record(offset, orjson.dumps(body))


def feed() -> tuple[HealthFeed, HealthBook, CollectorRegistry]:
    settings = Settings(policy_file=ROOT / "config" / "policy.yaml")
    book = HealthBook(load_policy(settings.policy_file))
    registry = CollectorRegistry()
    return HealthFeed(settings, book, registry), book, registry


def test_five_failures_from_the_topic_open_the_circuit() -> None:
    health_feed, book, registry = feed()
    health_feed.fold([outcome(n, ok=False) for n in range(4)])
    circuit: str = book.providers["sim-cheap"].circuit
    assert circuit == "closed"
    health_feed.fold([outcome(4, ok=False), outcome(5, ok=True, provider="sim-fast")])
    assert book.providers["sim-cheap"].circuit == "open"
    assert book.providers["sim-cheap"].consecutive_failures == 5
    assert book.providers["sim-fast"].samples == 1
    assert book.folded == 6
    assert book.as_of == AT + timedelta(milliseconds=5)
    assert registry.get_sample_value("cp_health_outcomes_folded_total") == 6


def test_unreadable_records_are_skipped_and_counted() -> None:
    health_feed, book, registry = feed()
    bad = [
        record(0, b"not json"),
        record(1, orjson.dumps({"schema_version": 1, "provider": "sim-cheap", "ok": False})),
        record(2, orjson.dumps({"schema_version": 9, "provider": "x", "ok": True, "at": AT})),
    ]
    health_feed.fold([*bad, outcome(3, ok=False)])
    assert book.folded == 1 and book.providers["sim-cheap"].consecutive_failures == 1
    assert registry.get_sample_value("cp_health_records_invalid_total") == 3


def test_two_workers_reading_the_same_records_hold_the_same_health() -> None:
    records = [
        outcome(n, ok=n % 3 != 0, provider=("sim-cheap", "sim-fast")[n % 2]) for n in range(40)
    ]
    first, book_a, _ = feed()
    second, book_b, _ = feed()
    first.fold(records)
    for start in range(0, len(records), 7):  # other batch boundaries, same order
        second.fold(records[start : start + 7])
    assert book_a.providers == book_b.providers
    assert book_a.as_of == book_b.as_of
