"""Observability end to end: no prompt text in logs, metrics that add up, linked traces, Prometheus.

One stack for the whole module, with spans printed as JSON lines (OTEL_TRACES_EXPORTER=console)
and JSON logs at DEBUG in both workers; each worker's stdout and stderr land in one log file, so
span lines and log lines can be read back from the same place. Metrics are cumulative per worker:
every metrics assertion compares a scrape taken before a batch with one taken after it.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import subprocess
import time
import urllib.parse
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from domain.commands import CreateJob
from domain.ids import job_id_for
from domain.messages import JobRequest
from tests.support.stack import Stack, TopicReader, new_stack, to_json
from tests.support.workers import free_port, http_get, wait_for

pytestmark = pytest.mark.integration

PROMETHEUS = Path("/usr/bin/prometheus")
USAGE = {"input_tokens": 100, "output_tokens": 50}
PROVIDERS = ("sim-cheap", "sim-fast", "sim-smart")

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


# -- the stack ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def obs(
    kafka_bootstrap: str, run_id: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A control-plane and a provider worker writing spans and DEBUG JSON logs to their logs."""
    root = tmp_path_factory.mktemp("observability")
    stack = new_stack(kafka_bootstrap, run_id, "obs", root)
    stack.env.update(
        OTEL_TRACES_EXPORTER="console",
        CP_LOG_FORMAT="json",
        CP_LOG_LEVEL="DEBUG",
        CP_FAULT_INJECTION="true",
    )
    try:
        stack.start_cp()
        stack.start_providers()
        yield stack
    finally:
        stack.stop()


def log_files(stack: Stack) -> dict[str, Path]:
    return {worker.log_path.stem: worker.log_path for worker in stack.workers}


def request(
    tenant: str,
    request_id: str,
    outcomes: dict[str, list[str]],
    *,
    text: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "tenant_id": tenant,
        "messages": [{"role": "user", "content": text or f"question {request_id}"}],
        "preference": "cost",  # routes sim-cheap -> sim-fast -> sim-smart
        "simulate": {"outcomes": outcomes, "latency_ms": 5, "usage": USAGE},
        **extra,
    }


async def send(
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[bytes | None, bytes | None]],
    headers: list[tuple[str, bytes]] | None = None,
) -> list[tuple[int, int]]:
    """Produce (key, value) records; return each one's (partition, offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [
            await producer.send(topic, key=key, value=value, headers=headers)
            for key, value in records
        ]
        return [(meta.partition, meta.offset) for meta in [await f for f in futures]]
    finally:
        await producer.stop()


async def finals_of(stack: Stack, tenant: str, count: int, *, timeout: float) -> dict[str, Any]:
    """Wait for `count` final responses of a tenant; return them by request_id."""

    def mine(reader: TopicReader) -> dict[str, Any]:
        return {v["request_id"]: v for v in reader.values() if v.get("tenant_id") == tenant}

    async with TopicReader(stack.bootstrap, stack.topic("cp.responses")) as reader:
        await reader.until(
            lambda _: len(mine(reader)) >= count,
            timeout=timeout,
            what=f"{count} final responses of tenant {tenant}",
        )
        return mine(reader)


async def letters_at(
    stack: Stack, origins: dict[str, tuple[str, int, int]], *, timeout: float
) -> dict[str, dict[str, Any]]:
    """Wait for the dead letter of each (topic, partition, offset); return them by name."""

    def found(reader: TopicReader) -> dict[str, dict[str, Any]]:
        by_origin = {(v["topic"], v["partition"], v["offset"]): v for v in reader.values()}
        return {name: by_origin[o] for name, o in origins.items() if o in by_origin}

    async with TopicReader(stack.bootstrap, stack.topic("cp.dlq")) as reader:
        await reader.until(
            lambda _: len(found(reader)) == len(origins),
            timeout=timeout,
            what=f"dead letters for {sorted(origins)}",
        )
        return found(reader)


async def wait_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


# -- a. no prompt text in any log line ------------------------------------------------------------


async def test_canary_prompt_never_reaches_a_log_line(obs: Stack) -> None:
    canary = "CANARY" + uuid.uuid4().hex  # 38 chars: the simulated answer echoes 40
    tenant = f"obs-canary-{uuid.uuid4().hex[:8]}"
    text = f"{canary} what is the capital of France?"
    jobs = {
        "success": ({"sim-cheap": ["ok"]}, "COMPLETED"),
        "retry": ({"sim-cheap": ["rate_limited", "ok"]}, "COMPLETED"),
        "fallback": ({"sim-cheap": ["provider_internal"], "sim-fast": ["ok"]}, "COMPLETED"),
        "all-fail": ({p: ["provider_internal"] for p in PROVIDERS}, "FAILED"),
    }
    intake = obs.topic("cp.intake")
    await send(
        obs.bootstrap,
        intake,
        [
            (rid.encode(), to_json(request(tenant, rid, outcomes, text=text)))
            for rid, (outcomes, _) in jobs.items()
        ],
    )

    # Dead letters: an invalid field, and a record that is not JSON at all, both with the canary.
    invalid = request(tenant, "invalid", {"sim-cheap": ["ok"]}, text=text, temperature=5)
    poison = [
        (b"invalid", to_json(invalid)),
        (b"not-json", b'{"messages": "' + canary.encode() + b'", oops'),
    ]
    poison_at = await send(obs.bootstrap, intake, poison)

    # A step that raises (a fault injected on purpose): the job core logs it with log.exception
    # and the job ends FAILED with the canonical `internal` error.
    boom = request(
        tenant, "boom", {"sim-cheap": ["ok"]}, text=text, metadata={"cp_fault": "decide"}
    )
    await send(obs.bootstrap, intake, [(b"boom", to_json(boom))])
    # A command whose time would overflow the deadline arithmetic: refused as invalid.
    far_request = JobRequest.model_validate(
        request(tenant, "far", {"sim-cheap": ["ok"]}, text=text, deadline_ms=60_000)
    )
    far_job = job_id_for(tenant, "far")
    far = CreateJob.model_construct(
        command_id=f"obs-far-{uuid.uuid4().hex}",
        job_id=far_job,
        at=datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
        tenant_id=tenant,
        fingerprint=far_request.fingerprint(),
        request=far_request,
        kind="create",
        schema_version=1,
        source="kafka",
    )
    commands = obs.topic("cp.commands")
    [far_at] = await send(
        obs.bootstrap, commands, [(far_job.encode(), far.model_dump_json().encode())]
    )

    finals = await finals_of(obs, tenant, len(jobs) + 1, timeout=60)
    letters = await letters_at(
        obs,
        {
            "invalid": (intake, *poison_at[0]),
            "not-json": (intake, *poison_at[1]),
            "far": (commands, *far_at),
        },
        timeout=60,
    )

    assert {rid: f["state"] for rid, f in finals.items()} == {
        "boom": "FAILED",
        **{rid: state for rid, (_, state) in jobs.items()},
    }
    assert finals["boom"]["error"]["code"] == "internal"
    # The canary did reach Kafka: in the answers (the simulator echoes the prompt) and the letters.
    for rid, final in finals.items():
        if final["state"] == "COMPLETED":
            assert canary in final["output"]["text"], (rid, final["output"])
    assert {name: letter["reason"] for name, letter in letters.items()} == {
        "invalid": "schema",
        "not-json": "not_json",
        "far": "schema",
    }
    for name, letter in letters.items():
        assert canary.encode() in base64.b64decode(letter["payload_b64"]), name
    assert "years 2000 to 9000" in letters["far"]["detail"]

    files = log_files(obs)

    def internal_error_logged() -> bool:
        return any(
            line.get("msg") == "step failed: the job ends FAILED (internal)"
            and line.get("exc_type") == "InjectedFault"
            for line in json_lines(files["cp-1"])
        )

    # The exception path was really taken, and logged (as type and frames).
    await wait_until(internal_error_logged, timeout=10, what="the job agent's exception log line")

    leaks: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for worker, path in files.items():
        for raw in path.read_text(errors="replace").splitlines():
            if canary not in raw:
                continue
            line = parse_object(raw)
            if line is None:
                where = ("(not JSON)", "")
            elif "context" in line and "name" in line:
                where = ("span", str(line["name"]))
            else:
                where = (str(line.get("level")), str(line.get("logger")))
            leaks[(worker, *where)].append(raw)
    report = "\n".join(
        f"  {worker} {level} {logger}: {len(lines)} line(s), e.g. {lines[0][:400]}"
        for (worker, level, logger), lines in sorted(leaks.items())
    )
    if leaks:
        pytest.fail(f"the prompt's canary appears in worker logs:\n{report}")


def parse_object(raw: str) -> dict[str, Any] | None:
    if not raw.startswith("{"):
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = (parse_object(raw) for raw in path.read_text(errors="replace").splitlines())
    return [line for line in lines if line is not None]


# -- b. metrics add up -------------------------------------------------------------------------

#: name -> (script, final state, attempts as (provider, outcome), retries as (provider, reason),
#: fallbacks as (from, to, reason)); each job also enters CREATED and ROUTED once, and
#: DISPATCHED and STARTED once per attempt.
SCENARIOS: dict[
    str,
    tuple[
        dict[str, list[str]],
        str,
        list[tuple[str, str]],
        list[tuple[str, str]],
        list[tuple[str, str, str]],
    ],
] = {
    "ok": ({"sim-cheap": ["ok"]}, "COMPLETED", [("sim-cheap", "completed")], [], []),
    "rate_limited_then_ok": (
        {"sim-cheap": ["rate_limited", "ok"]},
        "COMPLETED",
        [("sim-cheap", "failed"), ("sim-cheap", "completed")],
        [("sim-cheap", "rate_limited")],
        [],
    ),
    "internal_then_fallback": (
        {"sim-cheap": ["provider_internal"], "sim-fast": ["ok"]},
        "COMPLETED",
        [("sim-cheap", "failed"), ("sim-cheap", "failed"), ("sim-fast", "completed")],
        [("sim-cheap", "provider_internal")],
        [("sim-cheap", "sim-fast", "provider_internal")],
    ),
    "hang_timeout_fallback": (
        {"sim-cheap": ["hang"], "sim-fast": ["ok"]},
        "COMPLETED",
        [("sim-cheap", "timeout"), ("sim-cheap", "timeout"), ("sim-fast", "completed")],
        [("sim-cheap", "timeout")],
        [("sim-cheap", "sim-fast", "timeout")],
    ),
    "all_fail": (
        {p: ["provider_internal"] for p in PROVIDERS},
        "FAILED",
        [("sim-cheap", "failed")] * 2 + [("sim-fast", "failed")] * 2,
        [("sim-cheap", "provider_internal"), ("sim-fast", "provider_internal")],
        [("sim-cheap", "sim-fast", "provider_internal")],
    ),
    "duplicate_answer": (
        {"sim-cheap": ["duplicate"]},
        "COMPLETED",
        [("sim-cheap", "completed")],
        [],
        [],
    ),
}
BATCH = {
    "ok": 3,
    "rate_limited_then_ok": 2,
    "internal_then_fallback": 2,
    "hang_timeout_fallback": 1,
    "all_fail": 2,
    "duplicate_answer": 1,
}


def scrape(url: str) -> tuple[Samples, set[str]]:
    """Every sample of a /metrics page by (sample name, labels), and the family names."""
    status, body = http_get(url + "/metrics")
    assert status == 200, (status, body[:200])
    samples: Samples = {}
    families: set[str] = set()
    for family in text_string_to_metric_families(body.decode()):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, families


def deltas(before: Samples, after: Samples, name: str, *keep: str) -> dict[Labels, float]:
    """Non-zero changes of one sample name, by the values of the labels in `keep`."""
    out: dict[Labels, float] = defaultdict(float)
    for key in set(before) | set(after):
        sample, labels = key
        if sample != name:
            continue
        change = after.get(key, 0.0) - before.get(key, 0.0)
        chosen = tuple((k, v) for k, v in labels if k in keep) if keep else labels
        out[chosen] += change
    return {labels: value for labels, value in out.items() if abs(value) > 1e-12}


def labelled(counts: Counter[tuple[str, ...]], names: tuple[str, ...]) -> dict[Labels, float]:
    return {tuple(sorted(zip(names, key, strict=True))): float(n) for key, n in counts.items() if n}


async def test_metrics_deltas_match_a_known_batch(obs: Stack) -> None:
    assert obs.cp is not None
    tenant = f"obs-metrics-{uuid.uuid4().hex[:8]}"
    jobs = [(f"{name}-{i}", name) for name, n in BATCH.items() for i in range(n)]
    intake = obs.topic("cp.intake")

    before, _ = scrape(obs.cp.url)
    await send(
        obs.bootstrap,
        intake,
        [(rid.encode(), to_json(request(tenant, rid, SCENARIOS[name][0]))) for rid, name in jobs],
    )
    poison_at = await send(
        obs.bootstrap,
        intake,
        [(b"p1", b"\x00 not json"), (b"p2", to_json({"request_id": "p2", "tenant_id": tenant}))],
    )
    finals = await finals_of(obs, tenant, len(jobs), timeout=90)
    await letters_at(obs, {f"p{i}": (intake, *at) for i, at in enumerate(poison_at)}, timeout=30)
    after, families = scrape(obs.cp.url)

    transitions: Counter[tuple[str, ...]] = Counter()
    attempts: Counter[tuple[str, ...]] = Counter()
    retries: Counter[tuple[str, ...]] = Counter()
    fallbacks: Counter[tuple[str, ...]] = Counter()
    attempt_latency: Counter[tuple[str, ...]] = Counter()
    job_latency: Counter[tuple[str, ...]] = Counter()
    for rid, name in jobs:
        _, state, tries, retried, fell_back = SCENARIOS[name]
        assert finals[rid]["state"] == state, (rid, finals[rid])
        assert finals[rid]["attempts"] == len(tries), (rid, finals[rid])
        transitions.update(
            {("CREATED",): 1, ("ROUTED",): 1, ("DISPATCHED",): len(tries), (state,): 1}
        )
        transitions[("STARTED",)] += len(tries)
        transitions[("RETRYING",)] += len(retried)
        attempts.update((provider, outcome) for provider, outcome in tries)
        attempt_latency.update((provider,) for provider, _ in tries)
        retries.update(retried)
        fallbacks.update(fell_back)
        job_latency[(state,)] += 1

    assert deltas(before, after, "cp_job_transitions_total") == labelled(transitions, ("state",))
    assert deltas(before, after, "cp_attempts_total") == labelled(attempts, ("provider", "outcome"))
    assert deltas(before, after, "cp_retries_total") == labelled(retries, ("provider", "reason"))
    assert deltas(before, after, "cp_fallbacks_total") == labelled(
        fallbacks, ("from_provider", "to_provider", "reason")
    )
    assert deltas(before, after, "cp_dead_letters_total") == {
        (("reason", "not_json"), ("topic", intake)): 1.0,
        (("reason", "schema"), ("topic", intake)): 1.0,
    }
    assert deltas(before, after, "cp_job_latency_seconds_count") == labelled(
        job_latency, ("state",)
    )
    assert deltas(before, after, "cp_attempt_latency_seconds_count") == labelled(
        attempt_latency, ("provider",)
    )
    assert deltas(before, after, "cp_job_overhead_seconds_count") == {(): float(len(jobs))}
    # Sums grow too: the hang attempts alone take the 5 s attempt timeout each.
    [overhead_sum] = deltas(before, after, "cp_job_overhead_seconds_sum").values()
    assert overhead_sum > 0
    assert sum(deltas(before, after, "cp_attempt_latency_seconds_sum").values()) >= 10

    in_flight = ("cp_jobs_in_flight", ())
    assert after[in_flight] == before[in_flight], (before[in_flight], after[in_flight])

    circuits = {labels: v for (name, labels), v in after.items() if name == "cp_circuit_state"}
    assert circuits, "no cp_circuit_state sample"
    assert (("provider", "sim-cheap"),) in circuits, circuits
    assert set(circuits.values()) <= {0.0, 1.0, 2.0}, circuits

    billed = sum(
        (
            Decimal(f["cost"]["total"]["amount"])
            for f in finals.values()
            if f["cost"]["total"] is not None
        ),
        Decimal(0),
    )
    assert billed > 0
    cost = sum(deltas(before, after, "cp_cost_total").values())
    assert abs(Decimal(repr(cost)) - billed) <= Decimal("1e-12"), (cost, billed)
    # Only completed attempts are billed here, so each job's cost lands on its winner's labels.
    by_target: dict[Labels, Decimal] = defaultdict(Decimal)
    for final in finals.values():
        total = final["cost"]["total"]
        if total is not None:
            labels: Labels = (
                ("currency", total["currency"]),
                ("model", final["model"]),
                ("provider", final["provider"]),
            )
            by_target[labels] += Decimal(total["amount"])
    cost_deltas = deltas(before, after, "cp_cost_total")
    assert set(cost_deltas) == set(by_target), (cost_deltas, by_target)
    for labels, amount in by_target.items():
        assert abs(Decimal(repr(cost_deltas[labels])) - amount) <= Decimal("1e-12"), labels

    faust = sorted(name for name in families if name.startswith("faust_"))
    assert faust, f"no faust_* family among {sorted(families)}"


# -- c. one trace across both workers -------------------------------------------------------------


def spans_of(stack: Stack, trace: str) -> list[dict[str, Any]]:
    """Finished spans of one trace, from both workers' log files."""
    found = []
    for path in log_files(stack).values():
        for line in json_lines(path):
            context = line.get("context")
            if (
                "name" in line
                and isinstance(context, dict)
                and context.get("trace_id") == f"0x{trace}"
            ):
                found.append(line)
    return found


REQUIRED_SPANS = Counter(
    {
        "intake": 1,
        "job.create": 1,
        "dispatch sim-cheap": 2,
        "attempt sim-cheap": 2,
        "chat thrift-nano-sim": 2,  # the provider call: "<gen_ai.operation.name> <model>"
        "dispatch sim-fast": 1,
        "attempt sim-fast": 1,
        "chat swift-mini-sim": 1,
        "job.tick": 1,  # the retry is dispatched when its backoff timer fires
        "result.ingest": 6,  # started + failed, started + failed, started + completed
        "job.result": 6,
    }
)


async def test_one_trace_links_every_stage(obs: Stack) -> None:
    trace = uuid.uuid4().hex
    parent = secrets.token_hex(8)
    tenant = f"obs-trace-{uuid.uuid4().hex[:8]}"
    job_id = job_id_for(tenant, "traced")
    outcomes = {"sim-cheap": ["rate_limited", "provider_internal"], "sim-fast": ["ok"]}
    await send(
        obs.bootstrap,
        obs.topic("cp.intake"),
        [(b"traced", to_json(request(tenant, "traced", outcomes)))],
        headers=[("traceparent", f"00-{trace}-{parent}-01".encode())],
    )
    [final] = (await finals_of(obs, tenant, 1, timeout=60)).values()
    assert (final["state"], final["provider"], final["attempts"]) == ("COMPLETED", "sim-fast", 3)

    def complete() -> bool:
        names = Counter(span["name"] for span in spans_of(obs, trace))
        return all(names[name] >= n for name, n in REQUIRED_SPANS.items())

    try:
        await wait_until(complete, timeout=30, what="every span of the traced job")
    except AssertionError:
        names = Counter(span["name"] for span in spans_of(obs, trace))
        raise AssertionError(f"spans of trace {trace}: {dict(names)}") from None

    spans = spans_of(obs, trace)
    ids = {span["context"]["span_id"] for span in spans}
    assert len(ids) == len(spans), "span ids repeat"
    broken = []
    for span in spans:
        own, up = span["context"]["span_id"], span.get("parent_id")
        if span["name"] == "intake":
            if up != f"0x{parent}":
                broken.append((span["name"], own, up, "not the producer's span"))
        elif up not in ids or up == own:
            broken.append((span["name"], own, up, "no such span in the trace"))
    assert not broken, f"spans whose parent is not in trace {trace}: {broken}"
    # The stage spans that carry a job id carry this job's.
    by_name = defaultdict(list)
    for span in spans:
        by_name[span["name"]].append(span)
    for name in ("intake", "job.create", "dispatch sim-cheap", "attempt sim-fast"):
        assert all(s["attributes"].get("cp.job_id") == job_id for s in by_name[name]), name
    # Stage by stage: each attempt hangs under its dispatch, each call under its attempt.
    by_id = {span["context"]["span_id"]: span for span in spans}
    for span in spans:
        name = span["name"]
        up = by_id.get(span.get("parent_id") or "", {}).get("name")
        if name.startswith("attempt "):
            assert up == "dispatch " + name.split(" ", 1)[1], (name, up)
        elif name.startswith("chat "):
            assert up == "attempt " + span["attributes"]["cp.provider"], (name, up)
        elif name == "result.ingest":
            assert up is not None and up.startswith("attempt "), (name, up)
        elif name == "job.result":
            assert up == "result.ingest", (name, up)
        elif name == "job.create":
            assert up == "intake", (name, up)

    # Every record of the job on the way carries the trace in a traceparent header.
    topics = {
        "cp.dispatch.sim-cheap": lambda values: len(values) >= 2,
        "cp.dispatch.sim-fast": lambda values: len(values) >= 1,
        "cp.results": lambda values: len(values) >= 6,
        "cp.events": lambda values: any(v.get("type") == "completed" for v in values),
        "cp.responses": lambda values: len(values) >= 1,
    }
    missing: dict[str, list[tuple[int, str | None]]] = {}
    for topic, ready in topics.items():
        async with TopicReader(obs.bootstrap, obs.topic(topic)) as reader:

            def records(r: TopicReader = reader) -> list[Any]:
                return [rec for rec in r.records if rec.key == job_id.encode()]

            def job_ready(
                _: list[Any],
                check: Callable[[list[Any]], bool] = ready,
                get: Callable[[], list[Any]] = records,
            ) -> bool:
                return check([orjson.loads(r.value) for r in get()])

            await reader.until(
                job_ready,
                timeout=30,
                what=f"records of job {job_id}",
            )
            for record in records():
                headers = dict(record.headers or ())
                value = headers.get("traceparent", b"").decode()
                if value.split("-")[1:2] != [trace]:
                    missing.setdefault(topic, []).append((record.offset, value or None))
    assert not missing, f"records without the job's trace id in a traceparent header: {missing}"


# -- c2. provider calls in the OpenTelemetry GenAI semantic conventions ---------------------------


async def test_provider_calls_carry_genai_semantic_conventions(obs: Stack) -> None:
    """Each provider call is a "chat <model>" CLIENT span with the gen_ai.* attributes, and the
    provider worker's GenAI duration and token-usage histograms count it."""
    assert obs.providers is not None
    trace = uuid.uuid4().hex
    tenant = f"obs-genai-{uuid.uuid4().hex[:8]}"
    job = request(
        tenant,
        "genai",
        {"sim-cheap": ["rate_limited", "ok"]},
        max_output_tokens=64,
        temperature=0.25,
        top_p=0.5,
    )
    before, _ = scrape(obs.providers.url)
    await send(
        obs.bootstrap,
        obs.topic("cp.intake"),
        [(b"genai", to_json(job))],
        headers=[("traceparent", f"00-{trace}-{secrets.token_hex(8)}-01".encode())],
    )
    [final] = (await finals_of(obs, tenant, 1, timeout=60)).values()
    assert (final["state"], final["provider"], final["attempts"]) == ("COMPLETED", "sim-cheap", 2)

    def calls() -> list[dict[str, Any]]:
        return [s for s in spans_of(obs, trace) if s["name"] == "chat thrift-nano-sim"]

    await wait_until(lambda: len(calls()) == 2, timeout=30, what="both provider-call spans")
    failed, answered = sorted(calls(), key=lambda s: s["start_time"])
    for span in (failed, answered):
        attributes = span["attributes"]
        assert span["kind"] == "SpanKind.CLIENT"
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.provider.name"] == attributes["gen_ai.system"] == "sim-cheap"
        assert attributes["gen_ai.request.model"] == "thrift-nano-sim"
        assert attributes["gen_ai.request.max_tokens"] == 64
        assert attributes["gen_ai.request.temperature"] == 0.25
        assert attributes["gen_ai.request.top_p"] == 0.5
    assert failed["attributes"]["error.type"] == "rate_limited"
    assert failed["status"]["status_code"] == "ERROR"
    assert "gen_ai.usage.input_tokens" not in failed["attributes"]
    answer = answered["attributes"]
    assert answer["gen_ai.response.model"] == "thrift-nano-sim"
    assert answer["gen_ai.usage.input_tokens"] == USAGE["input_tokens"]
    assert answer["gen_ai.usage.output_tokens"] == USAGE["output_tokens"]
    assert answer["gen_ai.response.finish_reasons"] == ["stop"]
    assert "error.type" not in answer
    assert answered["status"]["status_code"] == "UNSET"

    after, families = scrape(obs.providers.url)
    assert {"gen_ai_client_operation_duration_seconds", "gen_ai_client_token_usage"} <= families
    common = {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "sim-cheap",
        "gen_ai_request_model": "thrift-nano-sim",
    }

    def labels(**extra: str) -> Labels:
        return tuple(sorted({**common, **extra}.items()))

    durations = deltas(before, after, "gen_ai_client_operation_duration_seconds_count")
    assert durations[labels(gen_ai_response_model="", error_type="rate_limited")] == 1
    assert durations[labels(gen_ai_response_model="thrift-nano-sim", error_type="")] == 1
    tokens = deltas(before, after, "gen_ai_client_token_usage_sum")
    answered_labels = {"gen_ai_response_model": "thrift-nano-sim"}
    assert tokens[labels(**answered_labels, gen_ai_token_type="input")] == USAGE["input_tokens"]
    assert tokens[labels(**answered_labels, gen_ai_token_type="output")] == USAGE["output_tokens"]


# -- d. a real Prometheus scrapes the worker ------------------------------------------------------


def test_real_prometheus_scrapes_the_control_plane(obs: Stack, tmp_path: Path) -> None:
    if not PROMETHEUS.exists():
        pytest.skip(f"{PROMETHEUS} is not installed")
    assert obs.cp is not None
    # At least one job, so that the counter has series even when this test runs alone.
    tenant = f"obs-prom-{uuid.uuid4().hex[:8]}"
    asyncio.run(
        send(
            obs.bootstrap,
            obs.topic("cp.intake"),
            [(b"prom", to_json(request(tenant, "prom", {"sim-cheap": ["ok"]})))],
        )
    )
    asyncio.run(finals_of(obs, tenant, 1, timeout=60))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: control-plane\n"
        "    metrics_path: /metrics\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{obs.cp.web_port}']\n"
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    query = urllib.parse.urlencode({"query": "cp_job_transitions_total"})
    url = f"http://127.0.0.1:{port}/api/v1/query?{query}"
    result: list[dict[str, Any]] = []

    def scraped() -> bool:
        assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
        status, body = http_get(url, timeout=2)
        if status != 200:
            return False
        answer = orjson.loads(body)
        result[:] = answer.get("data", {}).get("result", [])
        return bool(result)

    try:
        wait_for(scraped, timeout=60, what="cp_job_transitions_total in Prometheus", interval=0.5)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()

    # The worker is idle now (earlier tests waited for their jobs), so Prometheus holds the
    # same value as the worker's own page.
    samples, _ = scrape(obs.cp.url)
    created = next(r for r in result if r["metric"].get("state") == "CREATED")
    assert created["metric"]["job"] == "control-plane"
    assert created["metric"]["__name__"] == "cp_job_transitions_total"
    value = float(created["value"][1])
    assert value >= 1
    assert value == samples[("cp_job_transitions_total", (("state", "CREATED"),))]
