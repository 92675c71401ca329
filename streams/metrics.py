"""Prometheus metrics of the control plane, derived from the events each job step appends.

Counting from the timeline (rather than from scattered call sites) keeps metrics and the audit
trail in agreement: a redelivered command appends no event, so it counts nothing twice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from domain.job import Job
from domain.messages import JobEvent

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TERMINAL_EVENTS = {
    "completed": "COMPLETED",
    "failed": "FAILED",
    "cancelled": "CANCELLED",
    "expired": "EXPIRED",
}
CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}

disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series only add noise to every scrape


class CostCollector(Collector):
    """Cost sums kept as exact decimals, converted to a float only when scraped."""

    def __init__(self) -> None:
        self.totals: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)

    def add(self, provider: str, model: str, currency: str, amount: Decimal) -> None:
        self.totals[(provider, model, currency)] += amount

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily(
            "cp_cost",
            "Billed cost of attempts (failed ones priced from reported usage too), summed exactly",
            labels=["provider", "model", "currency"],
        )
        for (provider, model, currency), amount in sorted(self.totals.items()):
            family.add_metric([provider, model, currency], float(amount))
        yield family


class CircuitCollector(Collector):
    """Circuit state per provider as seen by this worker (0 closed, 1 half-open, 2 open)."""

    def __init__(self, states: Callable[[], dict[str, str]]) -> None:
        self.states = states

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "cp_circuit_state",
            "Provider circuit: 0 closed, 1 half-open, 2 open",
            labels=["provider"],
        )
        for provider, state in sorted(self.states().items()):
            family.add_metric([provider], CIRCUIT_VALUES.get(state, 0))
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry, circuits: Callable[[], dict[str, str]]) -> None:
        self.registry = registry
        self.transitions = Counter(
            "cp_job_transitions", "Jobs entering each state", ["state"], registry=registry
        )
        self.in_flight = Gauge(
            "cp_jobs_in_flight", "Jobs not yet final on this worker", registry=registry
        )
        self.attempts = Counter(
            "cp_attempts",
            "Attempts by provider and outcome",
            ["provider", "outcome"],
            registry=registry,
        )
        self.retries = Counter(
            "cp_retries", "Retries on the same target", ["provider", "reason"], registry=registry
        )
        self.fallbacks = Counter(
            "cp_fallbacks",
            "Fallbacks to another target",
            ["from_provider", "to_provider", "reason"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "cp_dead_letters",
            "Records sent to the dead-letter topic",
            ["reason", "topic"],
            registry=registry,
        )
        self.reader_reads = Counter(
            "cp_reader_reads",
            "Requests on the read port (CP_READ_PORT) by what its readers did: served from a view "
            "they held, served after asking the worker for it, passed to the read port of the "
            "job's owner, or relayed to the worker",
            ["outcome"],
            registry=registry,
        )
        self.internal_errors = Counter(
            "cp_internal_errors",
            "Commands the job core could not apply (their job ended FAILED, code internal)",
            ["command"],
            registry=registry,
        )
        self.attempt_latency = Histogram(
            "cp_attempt_latency_seconds",
            "Provider time of an attempt",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.job_latency = Histogram(
            "cp_job_latency_seconds",
            "Job creation to final state",
            ["state"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.transactions = Counter(
            "cp_transactions",
            "Job-core transactions ended (one partition's steps each), by outcome: "
            "committed or failed",
            ["outcome"],
            registry=registry,
        )
        self.retired = Counter(
            "cp_jobs_retired", "Finished jobs that left the hot store", registry=registry
        )
        self.restore_seconds = Histogram(
            "cp_restore_seconds",
            "Time to fence and rebuild newly assigned partitions from the changelog",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=registry,
        )
        self.overhead = Histogram(
            "cp_job_overhead_seconds",
            "Job time minus provider time: the control plane's share",
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.cost = CostCollector()
        registry.register(self.cost)
        registry.register(CircuitCollector(circuits))
        self._in_flight_jobs: set[str] = set()

    def observe_step(self, before: Job | None, after: Job) -> None:
        """Count what one job step appended to the timeline."""
        seen = before.seq if before is not None else 0
        for event in after.events:
            if event.seq > seen:
                self._event(after, event)
        if after.terminal:
            self._in_flight_jobs.discard(after.job_id)
        else:
            self._in_flight_jobs.add(after.job_id)
        self.in_flight.set(len(self._in_flight_jobs))

    def reset_in_flight(self, job_ids: Iterable[str]) -> None:
        """After a rebalance: the jobs of this worker's partitions that are not final."""
        self._in_flight_jobs = set(job_ids)
        self.in_flight.set(len(self._in_flight_jobs))

    def _event(self, job: Job, event: JobEvent) -> None:
        data: dict[str, Any] = event.data
        kind = event.type
        if kind == "created":
            self.transitions.labels("CREATED").inc()
        elif kind == "routed" and data.get("chosen") is not None:
            self.transitions.labels("ROUTED").inc()
        elif kind == "dispatched":
            self.transitions.labels("DISPATCHED").inc()
        elif kind == "started":
            self.transitions.labels("STARTED").inc()
        elif kind == "retried":
            self.transitions.labels("RETRYING").inc()
            self.retries.labels(str(data.get("provider")), str(data.get("reason"))).inc()
        elif kind == "fallback":
            self.fallbacks.labels(
                str(data.get("from_provider")),
                str(data.get("to_provider")),
                str(data.get("reason")),
            ).inc()
        elif kind == "attempt_failed":
            attempt = job.attempt(event.attempt_id or "")
            error = data.get("error") or {}
            outcome = "timeout" if error.get("code") == "timeout" else "failed"
            if attempt is not None:
                self.attempts.labels(attempt.provider, outcome).inc()
                if attempt.latency_ms is not None:
                    self.attempt_latency.labels(attempt.provider).observe(attempt.latency_ms / 1000)
        if kind in TERMINAL_EVENTS:
            self._final(job, TERMINAL_EVENTS[kind], event)

    def _final(self, job: Job, state: str, event: JobEvent) -> None:
        self.transitions.labels(state).inc()
        winner = job.attempt(event.attempt_id or "") if state == "COMPLETED" else None
        if winner is not None:
            self.attempts.labels(winner.provider, "completed").inc()
            if winner.latency_ms is not None:
                self.attempt_latency.labels(winner.provider).observe(winner.latency_ms / 1000)
        for attempt in job.attempts:
            # Failed attempts that billed nothing (amount 0) or an unknown amount add nothing.
            if attempt.cost is not None and attempt.cost.amount:
                self.cost.add(
                    attempt.provider, attempt.model, attempt.cost.currency, attempt.cost.amount
                )
            if state != "COMPLETED" and attempt.status.value == "CANCELLED":
                self.attempts.labels(attempt.provider, "cancelled").inc()
        elapsed = (event.at - job.created_at).total_seconds()
        self.job_latency.labels(state).observe(max(elapsed, 0.0))
        provider_time = sum((a.latency_ms or 0) for a in job.attempts) / 1000
        self.overhead.observe(max(elapsed - provider_time, 0.0))
