"""Idempotency on the real broker: duplicate requests, replayed results, late and unknown results.

Every test uses its own tenant on the shared session stack; cp.events and cp.responses are read
from the beginning and filtered by job_id. Events may be republished by the outbox, so a job's
timeline is deduplicated by (job_id, seq) before counting.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import subprocess
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from domain.codec import encode
from domain.ids import job_id_for
from domain.messages import Output, ProviderResult
from tests.support.stack import Stack, TopicReader, produce, to_json

pytestmark = pytest.mark.integration

USAGE = {"input_tokens": 100, "output_tokens": 50}
TERMINAL = {"completed", "failed", "cancelled", "expired"}


def request(
    tenant: str,
    request_id: str,
    outcomes: dict[str, list[str]],
    *,
    latency_ms: int = 5,
    metadata: dict[str, Any] | None = None,
    content: str | None = None,
) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "tenant_id": tenant,
        "messages": [{"role": "user", "content": content or f"question {request_id}"}],
        "preference": "cost",
        "metadata": metadata or {},
        "simulate": {"outcomes": outcomes, "latency_ms": latency_ms, "usage": USAGE},
    }


def tenant_for(name: str) -> str:
    return f"idem-{name}-{uuid.uuid4().hex[:8]}"


def timeline(reader: TopicReader, job_id: str) -> list[dict[str, Any]]:
    """A job's events deduplicated by seq, in seq order; a republished seq must be identical."""
    by_seq: dict[int, dict[str, Any]] = {}
    for value in reader.values():
        if value.get("job_id") != job_id:
            continue
        seen = by_seq.setdefault(value["seq"], value)
        assert seen == value, f"event {job_id}#{value['seq']} published twice, differently"
    return [by_seq[seq] for seq in sorted(by_seq)]


def types(reader: TopicReader, job_id: str) -> list[str]:
    return [event["type"] for event in timeline(reader, job_id)]


def responses_for(reader: TopicReader, job_id: str) -> list[dict[str, Any]]:
    return [v for v in reader.values() if v.get("job_id") == job_id]


async def read_to_end(reader: TopicReader, quiet_polls: int = 3) -> None:
    """Poll until several polls in a row bring nothing new (the reader caught up)."""
    quiet = 0
    while quiet < quiet_polls:
        quiet = quiet + 1 if not await reader.poll(timeout_ms=300) else 0


async def final_response(stack: Stack, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """Wait for a job's final response; check every (re)published copy says the same."""
    async with TopicReader(stack.bootstrap, stack.topic("cp.responses")) as reader:
        await reader.until(
            lambda _: bool(responses_for(reader, job_id)),
            timeout=timeout,
            what=f"the final response of {job_id}",
        )
        await read_to_end(reader)
        records = responses_for(reader, job_id)
    first = records[0]
    for record in records[1:]:
        assert (record["state"], record["provider"], record["attempts"]) == (
            first["state"],
            first["provider"],
            first["attempts"],
        ), f"{job_id}: final responses disagree: {records}"
    return first


async def produce_one(stack: Stack, topic: str, value: bytes, key: bytes | None) -> None:
    await produce(stack.bootstrap, stack.topic(topic), [value], key=lambda _: key)


# -- 1. duplicate requests ------------------------------------------------------------------------


async def test_intake_duplicates_give_one_job(stack: Stack) -> None:
    tenant = tenant_for("dup")
    job_id = job_id_for(tenant, "r1")
    body = to_json(request(tenant, "r1", {"sim-cheap": ["ok"]}))
    await produce(stack.bootstrap, stack.topic("cp.intake"), [body, body, body])

    async with TopicReader(stack.bootstrap, stack.topic("cp.events")) as events:
        await events.until(
            lambda _: (
                types(events, job_id).count("duplicate_ignored") >= 2
                and "completed" in types(events, job_id)
            ),
            timeout=60,
            what=f"{job_id} to complete with two duplicate_ignored events",
        )
        await read_to_end(events)
        kinds = Counter(types(events, job_id))
        jobs_of_tenant = {v["job_id"] for v in events.values() if v.get("tenant_id") == tenant}
        duplicates = [e for e in timeline(events, job_id) if e["type"] == "duplicate_ignored"]
    assert jobs_of_tenant == {job_id}
    assert kinds["created"] == 1, kinds
    assert kinds["duplicate_ignored"] == 2, kinds
    assert kinds["completed"] == 1, kinds
    assert all(e["data"].get("input") == "request" for e in duplicates), duplicates

    final = await final_response(stack, job_id)
    assert (final["state"], final["attempts"], final["provider"]) == ("COMPLETED", 1, "sim-cheap")
    async with TopicReader(stack.bootstrap, stack.topic("cp.responses")) as reader:
        await read_to_end(reader)
        assert {v["job_id"] for v in reader.values() if v.get("tenant_id") == tenant} == {job_id}


# -- 2. same request_id, another payload ----------------------------------------------------------


async def test_same_request_id_with_another_payload_is_a_conflict(stack: Stack) -> None:
    tenant = tenant_for("conflict")
    job_id = job_id_for(tenant, "r1")
    first = request(tenant, "r1", {"sim-cheap": ["ok"]}, metadata={"payload": "first"})
    second = request(
        tenant,
        "r1",
        {"sim-cheap": ["ok"]},
        metadata={"payload": "second"},
        content="a different question",
    )
    await produce_one(stack, "cp.intake", to_json(first), None)
    async with TopicReader(stack.bootstrap, stack.topic("cp.events")) as events:
        # The first payload is accepted before the second one is even sent.
        await events.until(
            lambda _: "created" in types(events, job_id),
            timeout=60,
            what=f"{job_id} to be created",
        )
        await produce_one(stack, "cp.intake", to_json(second), None)
        await events.until(
            lambda _: "conflict" in types(events, job_id) and "completed" in types(events, job_id),
            timeout=60,
            what=f"a conflict event and the completion of {job_id}",
        )
        await read_to_end(events)
        kinds = Counter(types(events, job_id))
    assert kinds["created"] == 1, kinds
    assert kinds["conflict"] == 1, kinds
    assert kinds["completed"] == 1, kinds

    async with TopicReader(stack.bootstrap, stack.topic("cp.dlq")) as dlq:
        await dlq.until(
            lambda _: any(_is_letter(v, "conflict", job_id) for v in dlq.values()),
            timeout=30,
            what=f"a conflict dead letter for {job_id}",
        )
        letters = [v for v in dlq.values() if _is_letter(v, "conflict", job_id)]
    assert len(letters) == 1, letters
    command = orjson.loads(_payload(letters[0]))
    assert command["request"]["metadata"] == {"payload": "second"}

    final = await final_response(stack, job_id)
    assert final["state"] == "COMPLETED"
    assert final["metadata"] == {"payload": "first"}, "the job must keep the first payload"


def _is_letter(letter: dict[str, Any], reason: str, job_id: str) -> bool:
    return letter.get("reason") == reason and letter.get("key") == job_id


def _payload(letter: dict[str, Any]) -> bytes:
    return base64.b64decode(letter["payload_b64"])


# -- 3. duplicated and replayed results -----------------------------------------------------------


async def test_replayed_and_duplicated_results_give_one_completion(stack: Stack) -> None:
    tenant = tenant_for("replay")
    job_id = job_id_for(tenant, "r1")
    await produce_one(
        stack, "cp.intake", to_json(request(tenant, "r1", {"sim-cheap": ["ok"]})), None
    )
    before = await final_response(stack, job_id)
    assert before["state"] == "COMPLETED"

    async with TopicReader(stack.bootstrap, stack.topic("cp.results")) as results:
        await results.until(
            lambda _: any(_completed_of(r, job_id) for r in results.records),
            timeout=30,
            what=f"the completed result of {job_id}",
        )
        originals = [r for r in results.records if _completed_of(r, job_id)]
    replayed_ids = {orjson.loads(r.value)["event_id"] for r in originals}
    copy = orjson.loads(originals[0].value)
    copy["event_id"] = f"{copy['event_id']}:copy-{uuid.uuid4().hex[:6]}"
    # Replay the records byte for byte, then a hand-made copy with a new event_id; all keyed by
    # job_id, so the copy's event proves the replays were applied before it.
    await produce(
        stack.bootstrap,
        stack.topic("cp.results"),
        [*(r.value for r in originals), to_json(copy)],
        key=lambda _: job_id.encode(),
    )

    async with TopicReader(stack.bootstrap, stack.topic("cp.events")) as events:
        await events.until(
            lambda _: any(
                e["data"].get("event_id") == copy["event_id"] for e in timeline(events, job_id)
            ),
            timeout=30,
            what=f"the copied result of {job_id} in its timeline",
        )
        await read_to_end(events)
        steps = timeline(events, job_id)
    kinds = Counter(e["type"] for e in steps)
    ignored = {
        e["data"].get("event_id"): e["type"]
        for e in steps
        if e["type"] in ("duplicate_ignored", "late_result")
    }
    assert kinds["completed"] == 1, kinds
    assert ignored.get(copy["event_id"]) == "late_result", steps

    after = await final_response(stack, job_id)
    assert (after["state"], after["provider"], after["attempts"]) == (
        before["state"],
        before["provider"],
        before["attempts"],
    )
    # Each replayed record is an input the job saw again: it belongs in the timeline.
    missing = sorted(replayed_ids - set(ignored))
    assert not missing, (
        f"replayed result records {missing} of {job_id} left no duplicate_ignored/late_result "
        f"event in the timeline; timeline: {[(e['seq'], e['type']) for e in steps]}"
    )


def _completed_of(record: Any, job_id: str) -> bool:
    try:
        value = orjson.loads(record.value)
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(value, dict) and value.get("job_id") == job_id and value["type"] == "completed"
    )


# -- 4. a late result for a superseded attempt ----------------------------------------------------


async def test_late_result_for_a_superseded_attempt_changes_nothing(stack: Stack) -> None:
    tenant = tenant_for("late")
    job_id = job_id_for(tenant, "r1")
    # sim-cheap fails twice (retry, then fallback), sim-fast answers: three attempts of 2 s each,
    # so the late result for a1 lands while a2 is still running.
    body = request(
        tenant,
        "r1",
        {"sim-cheap": ["provider_internal"], "sim-fast": ["ok"]},
        latency_ms=2000,
    )
    await produce_one(stack, "cp.intake", to_json(body), None)
    a1, a2, a3 = (f"{job_id}-a{n}" for n in (1, 2, 3))

    async with TopicReader(stack.bootstrap, stack.topic("cp.events")) as events:
        await events.until(
            lambda _: any(
                e["type"] == "dispatched" and e["attempt_id"] == a2
                for e in timeline(events, job_id)
            ),
            timeout=60,
            what=f"the second attempt of {job_id}",
        )
        first = next(
            e
            for e in timeline(events, job_id)
            if e["type"] == "dispatched" and e["attempt_id"] == a1
        )
        late = ProviderResult(
            type="completed",
            event_id=f"{job_id}:{a1}:completed:late-{uuid.uuid4().hex[:6]}",
            job_id=job_id,
            attempt_id=a1,
            provider=first["data"]["provider"],
            model=first["data"]["model"],
            occurred_at=datetime.now(UTC),
            output=Output(text="a late answer", finish_reason="stop"),
            raw_usage=dict(USAGE),
            usage_shape="canonical",
            latency_ms=10,
        )
        await produce_one(stack, "cp.results", encode(late), job_id.encode())
        await events.until(
            lambda _: (
                "completed" in types(events, job_id) and "late_result" in types(events, job_id)
            ),
            timeout=60,
            what=f"{job_id} to complete with a late_result event",
        )
        await read_to_end(events)
        steps = timeline(events, job_id)

    late_events = [e for e in steps if e["type"] == "late_result"]
    assert len(late_events) == 1, steps
    assert late_events[0]["attempt_id"] == a1
    assert late_events[0]["data"]["event_id"] == late.event_id
    assert late_events[0]["state"] not in {"COMPLETED", "FAILED", "CANCELLED", "EXPIRED"}, (
        "the late result should have arrived while the job was still running",
        late_events[0],
    )
    completed = [e for e in steps if e["type"] == "completed"]
    assert len(completed) == 1, steps
    assert completed[0]["attempt_id"] == a3
    assert completed[0]["seq"] > late_events[0]["seq"]

    final = await final_response(stack, job_id)
    assert (final["state"], final["attempts"], final["provider"]) == ("COMPLETED", 3, "sim-fast")
    assert final["output"]["text"] != "a late answer"


# -- 5. a result for a job that does not exist ----------------------------------------------------


async def test_result_for_an_unknown_job_is_dead_lettered(stack: Stack) -> None:
    job_id = "job_unknown" + uuid.uuid4().hex[:12]
    result = ProviderResult(
        type="completed",
        event_id=f"{job_id}:a1:completed",
        job_id=job_id,
        attempt_id=f"{job_id}-a1",
        provider="sim-cheap",
        model="sim-cheap-1",
        occurred_at=datetime.now(UTC),
        output=Output(text="an answer nobody asked for"),
    )
    await produce_one(stack, "cp.results", encode(result), job_id.encode())
    async with TopicReader(stack.bootstrap, stack.topic("cp.dlq")) as dlq:
        await dlq.until(
            lambda _: any(_is_letter(v, "unknown_job", job_id) for v in dlq.values()),
            timeout=30,
            what=f"an unknown_job dead letter for {job_id}",
        )
        letter = next(v for v in dlq.values() if _is_letter(v, "unknown_job", job_id))
    payload = orjson.loads(_payload(letter))
    if letter["topic"] == stack.topic("cp.commands"):
        payload = payload["result"]  # re-keyed: it landed on another partition than its job's
    assert ProviderResult.model_validate(payload) == result
    async with TopicReader(stack.bootstrap, stack.topic("cp.responses")) as reader:
        await read_to_end(reader)
        assert not responses_for(reader, job_id)


# -- 6. input keyed by another partitioner --------------------------------------------------------


async def test_requests_produced_by_kcat_are_rekeyed_and_complete(stack: Stack) -> None:
    kcat = shutil.which("kcat")
    if kcat is None:
        pytest.skip("kcat is not on PATH: cannot produce with librdkafka's default partitioner")
    tenant = tenant_for("kcat")
    ids = [f"k{i}" for i in range(6)]
    lines = b"\n".join(to_json(request(tenant, rid, {"sim-cheap": ["ok"]})) for rid in ids)
    process = await asyncio.to_thread(
        subprocess.run,
        [kcat, "-P", "-b", stack.bootstrap, "-t", stack.topic("cp.intake"), "-k", "somekey"],
        input=lines + b"\n",
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert process.returncode == 0, process.stderr.decode(errors="replace")
    expected = {job_id_for(tenant, rid) for rid in ids}
    async with TopicReader(stack.bootstrap, stack.topic("cp.responses")) as reader:
        await reader.until(
            lambda _: expected <= {v.get("job_id") for v in reader.values()},
            timeout=60,
            what=f"final responses for the {len(ids)} requests produced by kcat",
        )
        finals = {v["job_id"]: v for v in reader.values() if v.get("job_id") in expected}
    assert {f["state"] for f in finals.values()} == {"COMPLETED"}, finals
