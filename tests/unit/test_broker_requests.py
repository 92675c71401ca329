"""bench.broker_requests: parsing the JMX tool's lines (FetchConsumer is part of Fetch, not
added to it) and per-job differences."""

from __future__ import annotations

from collections import Counter

import pytest

from bench import broker_requests


def test_parse_sums_lines_and_drops_the_brokers_own_requests() -> None:
    out = (
        "Produce 120\nFetch 40\nFetchConsumer 40\nBrokerHeartbeat 9\nFetch.Controller 3\n"
        "EndTxn 10\n\nnoise\n"
    )
    assert broker_requests.parse(out) == Counter({"Produce": 120, "Fetch": 40, "EndTxn": 10})


def test_per_job_is_the_difference_most_first() -> None:
    before = Counter({"Produce": 100, "Fetch": 50, "Metadata": 7})
    after = Counter({"Produce": 400, "Fetch": 250, "Metadata": 7, "EndTxn": 50})
    per_job = broker_requests.per_job(before, after, jobs=100)
    assert per_job == {"Produce": 3.0, "Fetch": 2.0, "EndTxn": 0.5}
    assert list(per_job) == ["Produce", "Fetch", "EndTxn"]
    assert broker_requests.summary(per_job, top=2) == "5.50 in all (Produce 3.00, Fetch 2.00)"


def test_port_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_JMX_PORT", raising=False)
    assert broker_requests.jmx_port() is None
    monkeypatch.setenv("KAFKA_JMX_PORT", "9999")
    assert broker_requests.jmx_port() == 9999


def test_an_unreachable_jmx_port_says_what_to_do() -> None:
    with pytest.raises(SystemExit, match="KAFKA_JMX_PORT=1"):
        broker_requests.snapshot(1)
