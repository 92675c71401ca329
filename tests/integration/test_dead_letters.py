"""Poison records on cp.intake and cp.results become dead letters, and the pipeline keeps going.

Each dead letter must say why (`reason`, from domain.codec's DecodeError or the job agent) and
where the record came from (topic, partition, offset, key), with the original bytes in base64.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from domain.codec import encode
from domain.ids import job_id_for
from domain.messages import Output, ProviderResult
from tests.support.stack import Stack, TopicReader, to_json

pytestmark = pytest.mark.integration

#: Over the worker's CP_MAX_REQUEST_BYTES default (900 000), under the topic's 1 MiB record limit.
OVERSIZE = 950_000


def job_request(tenant: str | None, request_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": request_id,
        "messages": [{"role": "user", "content": f"question {request_id}"}],
        "preference": "cost",
        "simulate": {"outcomes": {"sim-cheap": ["ok"]}, "latency_ms": 5},
    }
    if tenant is not None:
        body["tenant_id"] = tenant
    return body


def poison(tenant: str) -> dict[str, tuple[bytes | None, str]]:
    """name -> (record value, expected dead-letter reason), sent to both input topics."""
    return {
        "garbage": (b"\x00\xff\xfe{not json at all", "not_json"),
        "wrong-schema": (b'{"hello": 1}', "schema"),
        "not-an-object": (b"[1, 2, 3]", "schema"),
        "no-tenant": (to_json(job_request(None, f"{tenant}-no-tenant")), "schema"),
        "oversize": (b'{"pad": "' + b"x" * OVERSIZE + b'"}', "oversize"),
        "null": (None, "empty"),
    }


async def send(
    bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]
) -> list[tuple[int, int]]:
    """Produce (key, value) records in order; return each one's (partition, offset)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_request_size=1024 * 1024
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, key=key, value=value) for key, value in records]
        return [(meta.partition, meta.offset) for meta in [await f for f in futures]]
    finally:
        await producer.stop()


def decoded(letter: dict[str, Any]) -> bytes:
    return base64.b64decode(letter["payload_b64"], validate=True)


@pytest.mark.parametrize("topic", ["cp.intake", "cp.results"])
async def test_poison_records_are_dead_lettered_and_later_jobs_complete(
    stack: Stack, topic: str
) -> None:
    tenant = f"dlq-{topic.split('.')[1]}-{uuid.uuid4().hex[:8]}"
    cases = poison(tenant)
    keys = {name: f"{tenant}:{name}".encode() for name in cases}
    origin = stack.topic(topic)
    positions = await send(
        stack.bootstrap, origin, [(keys[name], value) for name, (value, _) in cases.items()]
    )
    where = dict(zip(cases, positions, strict=True))

    unknown: ProviderResult | None = None
    if topic == "cp.results":
        job_id = "job_nosuchjob" + uuid.uuid4().hex[:12]
        unknown = ProviderResult(
            type="completed",
            event_id=f"{job_id}:{job_id}-a1:completed",
            job_id=job_id,
            attempt_id=f"{job_id}-a1",
            provider="sim-cheap",
            model="sim-cheap-1",
            occurred_at=datetime.now(UTC),
            output=Output(text="nobody asked"),
        )
        await send(stack.bootstrap, origin, [(job_id.encode(), encode(unknown))])

    # Jobs sent after the poison, on the very partitions the poison went to (same keys).
    good = [f"after-{name}" for name in cases]
    await send(
        stack.bootstrap,
        stack.topic("cp.intake"),
        [(keys[name], to_json(job_request(tenant, f"after-{name}"))) for name in cases],
    )

    def letter_for(letters: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
        partition, offset = where[name]
        return next(
            (
                v
                for v in letters
                if (v.get("topic"), v.get("partition"), v.get("offset"))
                == (origin, partition, offset)
            ),
            None,
        )

    def unknown_letter(letters: list[dict[str, Any]]) -> dict[str, Any] | None:
        assert unknown is not None
        return next(
            (
                v
                for v in letters
                if v.get("reason") == "unknown_job" and v.get("key") == unknown.job_id
            ),
            None,
        )

    async with TopicReader(stack.bootstrap, stack.topic("cp.dlq")) as dlq:
        await dlq.until(
            lambda _: (
                all(letter_for(dlq.values(), name) for name in cases)
                and (unknown is None or unknown_letter(dlq.values()) is not None)
            ),
            timeout=60,
            what=f"a dead letter for each poison record on {origin}",
        )
        letters = dlq.values()

    wrong = {}
    for name, (value, reason) in cases.items():
        letter = letter_for(letters, name)
        assert letter is not None
        original = value or b""
        if (letter["reason"], letter["key"], decoded(letter), letter["payload_size"]) != (
            reason,
            keys[name].decode(),
            original,
            len(original),
        ):
            wrong[name] = {k: v for k, v in letter.items() if k != "payload_b64"}
        matching = [
            v
            for v in letters
            if (v.get("topic"), v.get("partition"), v.get("offset")) == (origin, *where[name])
        ]
        assert len(matching) == 1, f"{name}: {len(matching)} dead letters for one record"
    assert not wrong, f"dead letters with an unexpected reason, key or payload: {wrong}"

    if unknown is not None:
        letter = unknown_letter(letters)
        assert letter is not None
        # Keyed by job_id, the result lands on its job's partition and the job core applies it
        # where it is: the letter points at the result record itself and carries it unchanged.
        assert letter["topic"] == origin, letter["topic"]
        assert isinstance(letter["partition"], int)
        assert isinstance(letter["offset"], int)
        assert ProviderResult.model_validate(orjson.loads(decoded(letter))) == unknown

    expected = {job_id_for(tenant, rid) for rid in good}
    async with TopicReader(stack.bootstrap, stack.topic("cp.responses")) as responses:
        await responses.until(
            lambda _: expected <= {v.get("job_id") for v in responses.values()},
            timeout=60,
            what=f"final responses for the {len(good)} jobs sent after the poison",
        )
        finals = {v["job_id"]: v["state"] for v in responses.values() if v["job_id"] in expected}
    assert set(finals.values()) == {"COMPLETED"}, finals
