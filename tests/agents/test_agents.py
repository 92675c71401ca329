"""The agents on faust's `test_context()`: intake, results and the job agent, with no broker.

Records are put on each agent's in-memory test channel as raw bytes (as the real topics deliver
them); what the agents send is captured by the `capture` fixture, the job table is the real one on
the memory store, and its changelog writes stay in the unstarted producer's buffer.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import streams.agents as agents

from domain.codec import decode_command, encode
from domain.commands import CancelJob, Command, CreateJob, RecordResult
from domain.decide import decide as real_decide
from domain.ids import idempotency_key, job_id_for
from domain.job import Job
from domain.lifecycle import JobStatus
from domain.messages import Dispatch, JobEvent, Output, ProviderResult
from streams.app import runtime, settings
from streams.tracing import trace_id, valid_traceparent
from tables.jobs import decode_job

if TYPE_CHECKING:  # only for annotations: importing conftest again would re-run it
    from tests.agents.conftest import Capture, ChangelogWrite

TENANT = "acme"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
COMMANDS = "cp.commands"
RESULTS = "cp.results"
EVENTS = "cp.events"
DLQ = "cp.dlq"


def request_body(request_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "tenant_id": TENANT,
        "messages": [{"role": "user", "content": "Say hello."}],
        **fields,
    }


def as_bytes(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body)


def stored_job(job_id: str) -> Job | None:
    return decode_job(agents.jobs.get(job_id))


def commands(capture: Capture) -> list[Command]:
    return [decode_command(sent.value) for sent in capture.to(COMMANDS)]


#: Offsets of the records put on test channels. A topic never reuses an offset, and intake
#: derives command ids from (topic, partition, offset), but each test_context() counts from 0:
#: give each context its own block of offsets instead, so two records never share one.
_OFFSET_BLOCKS = itertools.count(1)


@asynccontextmanager
async def running(agent: Any) -> AsyncIterator[Any]:
    """An agent on its test channel; `put` returns once the agent has processed the record."""
    async with agent.test_context() as tested:
        tested.sent_offset = next(_OFFSET_BLOCKS) * 1000
        yield tested


async def create_job(capture: Capture, request_id: str, **fields: Any) -> tuple[str, bytes]:
    """Run a request through intake and return its job_id and CreateJob command bytes."""
    async with running(agents.intake) as intake:
        await intake.put(as_bytes(request_body(request_id, **fields)), key=b"any")
    [sent] = capture.to(COMMANDS)
    capture.clear()
    return job_id_for(TENANT, request_id), sent.value


async def settle() -> None:
    """Let the delivery watchers of acknowledged sends run."""
    for _ in range(5):
        await asyncio.sleep(0)


# -- intake ---------------------------------------------------------------------------------------


async def test_intake_turns_a_request_into_a_create_command_keyed_by_job_id(
    capture: Capture, unique: str
) -> None:
    async with running(agents.intake) as intake:
        await intake.put(
            as_bytes(request_body(unique)),
            key=b"producer-key",
            headers=[("traceparent", TRACEPARENT.encode())],
        )

    assert capture.dead == []
    [sent] = capture.sent
    job_id = job_id_for(TENANT, unique)
    assert (sent.topic, sent.key) == (COMMANDS, job_id.encode())
    command = decode_command(sent.value)
    assert isinstance(command, CreateJob)
    assert (command.job_id, command.tenant_id, command.source) == (job_id, TENANT, "kafka")
    assert command.request.request_id == unique
    assert command.fingerprint == command.request.fingerprint()
    # The producer's trace continues: same trace id on the command and in its header.
    header = sent.header("traceparent")
    assert header is not None and valid_traceparent(header.decode())
    assert trace_id(command.trace) == TRACEPARENT.split("-")[1]
    assert header.decode() == command.trace.traceparent


async def test_intake_starts_a_trace_when_the_record_has_none(
    capture: Capture, unique: str
) -> None:
    async with running(agents.intake) as intake:
        await intake.put(as_bytes(request_body(unique)), key=None)

    [sent] = capture.sent
    header = sent.header("traceparent")
    assert header is not None and valid_traceparent(header.decode())
    command = decode_command(sent.value)
    assert isinstance(command, CreateJob)
    assert command.trace.traceparent == header.decode()


async def test_the_same_request_twice_gives_two_create_commands_for_one_job(
    capture: Capture, unique: str
) -> None:
    body = as_bytes(request_body(unique))
    async with running(agents.intake) as intake:
        await intake.put(body, key=b"a")
        await intake.put(body, key=b"b")

    assert capture.dead == []
    sent = capture.to(COMMANDS)
    assert len(sent) == len(capture.sent) == 2
    job_id = job_id_for(TENANT, unique)
    assert {s.key for s in sent} == {job_id.encode()}
    first, second = commands(capture)
    assert isinstance(first, CreateJob) and isinstance(second, CreateJob)
    assert first.job_id == second.job_id == job_id
    assert first.fingerprint == second.fingerprint
    # Distinct command ids (from the record's offset): the job agent dedups by job, not here.
    assert first.command_id != second.command_id


async def test_intake_dead_letters_garbage_as_not_json(capture: Capture) -> None:
    garbage = b"\x00\xffnot json at all"
    async with running(agents.intake) as intake:
        event = await intake.put(garbage, key=b"k1")

    assert capture.sent == []
    [(topic, key, record)] = capture.dead
    assert topic == DLQ
    assert record.reason == "not_json"
    assert (record.topic, record.partition) == ("cp.intake", 0)
    assert record.offset == event.message.offset
    assert key == b"cp.intake:0"
    assert record.key == "k1"
    assert base64.b64decode(record.payload_b64) == garbage
    assert record.payload_size == len(garbage)


async def test_intake_dead_letters_a_request_without_tenant_as_schema(
    capture: Capture, unique: str
) -> None:
    body = request_body(unique)
    del body["tenant_id"]
    async with running(agents.intake) as intake:
        await intake.put(as_bytes(body), key=None)

    assert capture.sent == []
    assert capture.reasons() == ["schema"]
    assert "tenant_id" in capture.dead[0][2].detail


async def test_intake_dead_letters_an_invalid_request_as_schema(
    capture: Capture, unique: str
) -> None:
    async with running(agents.intake) as intake:
        await intake.put(as_bytes(request_body(unique, messages=[])), key=None)
        await intake.put(as_bytes(request_body(unique, surprise=1)), key=None)
        await intake.put(b"[1, 2]", key=None)

    assert capture.sent == []
    assert capture.reasons() == ["schema", "schema", "schema"]


async def test_intake_dead_letters_an_oversize_record(capture: Capture, unique: str) -> None:
    padding = "x" * settings.max_request_bytes
    payload = as_bytes(request_body(unique, metadata={"padding": padding}))
    assert len(payload) > settings.max_request_bytes
    async with running(agents.intake) as intake:
        await intake.put(payload, key=None)

    assert capture.sent == []
    [(_, _, record)] = capture.dead
    assert record.reason == "oversize"
    assert record.payload_size == len(payload)


async def test_intake_turns_a_cancel_request_into_a_cancel_command(
    capture: Capture, unique: str
) -> None:
    cancel = {"type": "cancel", "tenant_id": TENANT, "request_id": unique, "reason": "changed mind"}
    async with running(agents.intake) as intake:
        await intake.put(as_bytes(cancel), key=None)

    assert capture.dead == []
    job_id = job_id_for(TENANT, unique)
    [sent] = capture.sent
    assert (sent.topic, sent.key) == (COMMANDS, job_id.encode())
    command = decode_command(sent.value)
    assert isinstance(command, CancelJob)
    assert (command.job_id, command.tenant_id, command.reason) == (job_id, TENANT, "changed mind")


async def test_intake_keeps_going_after_a_bad_record(capture: Capture, unique: str) -> None:
    async with running(agents.intake) as intake:
        await intake.put(b"{", key=None)
        await intake.put(as_bytes(request_body(unique)), key=None)

    assert capture.reasons() == ["not_json"]
    assert [s.key for s in capture.to(COMMANDS)] == [job_id_for(TENANT, unique).encode()]


# -- results --------------------------------------------------------------------------------------


def provider_result(job_id: str, attempt_id: str, provider: str, model: str, **fields: Any) -> Any:
    return ProviderResult(
        event_id=fields.pop("event_id", f"{attempt_id}:{fields.get('type', 'completed')}"),
        type=fields.pop("type", "completed"),
        job_id=job_id,
        attempt_id=attempt_id,
        provider=provider,
        model=model,
        occurred_at=datetime.now(UTC),
        **fields,
    )


async def test_results_rekeys_a_provider_result_as_a_record_result_command(
    capture: Capture, unique: str
) -> None:
    job_id = job_id_for(TENANT, unique)
    result = provider_result(
        job_id,
        f"{job_id}-a1",
        "sim-fast",
        "swift-mini-sim",
        type="started",
        event_id="ev-1",
        trace={"traceparent": TRACEPARENT},
    )
    async with running(agents.results) as results:
        await results.put(encode(result), key=b"whatever")

    assert capture.dead == []
    [sent] = capture.sent
    assert (sent.topic, sent.key) == (COMMANDS, job_id.encode())
    command = decode_command(sent.value)
    assert isinstance(command, RecordResult)
    # Named by the record's position: a re-sent answer is a new command, deduped by event id.
    assert command.command_id.startswith(f"result:{RESULTS}:")
    assert command.result.model_dump(exclude={"trace"}) == result.model_dump(exclude={"trace"})
    assert trace_id(command.result.trace) == TRACEPARENT.split("-")[1]
    assert sent.header("traceparent") is not None


async def test_results_dead_letters_garbage_and_keeps_going(capture: Capture, unique: str) -> None:
    job_id = job_id_for(TENANT, unique)
    good = provider_result(job_id, f"{job_id}-a1", "sim-fast", "swift-mini-sim")
    async with running(agents.results) as results:
        await results.put(b"garbage", key=None)
        await results.put(b'{"type": "completed"}', key=None)
        await results.put(encode(good), key=None)

    assert capture.reasons() == ["not_json", "schema"]
    assert {record.topic for _, _, record in capture.dead} == {"cp.results"}
    assert [s.key for s in capture.to(COMMANDS)] == [job_id.encode()]


# -- the job agent --------------------------------------------------------------------------------


async def test_create_job_stores_a_dispatched_job_and_publishes_its_outbox(
    capture: Capture, changelog: Callable[[], list[ChangelogWrite]], unique: str
) -> None:
    job_id, create = await create_job(capture, unique)
    async with running(agents.job_agent) as jobs:
        await jobs.put(create, key=job_id.encode())

    assert capture.dead == []
    job = stored_job(job_id)
    assert job is not None
    assert job.status is JobStatus.DISPATCHED
    assert job.current is not None
    provider = job.current.provider
    assert job.current.attempt_id == f"{job_id}-a1"

    # One dispatch to the chosen provider's queue, keyed by job_id, with the trace header.
    dispatches = [s for s in capture.sent if s.topic.startswith("cp.dispatch.")]
    assert [s.topic for s in dispatches] == [f"cp.dispatch.{provider}"]
    dispatch = Dispatch.model_validate_json(dispatches[0].value)
    assert dispatches[0].key == job_id.encode()
    assert dispatch.idempotency_key == idempotency_key(job_id, job.current.attempt_id)
    assert (dispatch.attempt_no, dispatch.provider, dispatch.tenant_id) == (1, provider, TENANT)
    assert dispatches[0].header("traceparent") is not None

    # The timeline: created, routed, dispatched, in seq order, keyed by job_id.
    events = [JobEvent.model_validate_json(s.value) for s in capture.to(EVENTS)]
    assert [(e.seq, e.type) for e in events] == [(1, "created"), (2, "routed"), (3, "dispatched")]
    assert {s.key for s in capture.to(EVENTS)} == {job_id.encode()}
    assert len(capture.sent) == 4

    # The outbox stays in the state until Kafka acknowledges; a timer is armed for the job.
    assert {e.entry_id for e in job.outbox} == {"e1", "e2", "e3", f"d-{job_id}-a1"}
    assert job_id in runtime.wake.due
    # The table write went to the job table's changelog, keyed by job_id.
    writes = changelog()
    assert [(w.topic, w.key) for w in writes] == [
        (settings.topic("{app_id}-jobs-changelog"), job_id.encode())
    ]
    assert decode_job(writes[0].value) == job


async def test_a_redelivered_create_changes_nothing_and_resends_the_pending_outbox(
    capture: Capture, changelog: Callable[[], list[ChangelogWrite]], unique: str
) -> None:
    job_id, create = await create_job(capture, unique)
    async with running(agents.job_agent) as jobs:
        await jobs.put(create, key=job_id.encode())
        stored = agents.jobs.get(job_id)
        first = [(s.topic, s.key, s.value) for s in capture.sent]
        changelog()
        capture.clear()

        await jobs.put(create, key=job_id.encode())

    assert capture.dead == []
    assert agents.jobs.get(job_id) == stored
    assert changelog() == []  # no write at all
    assert sorted((s.topic, s.key, s.value) for s in capture.sent) == sorted(first)


async def test_the_same_request_from_intake_twice_is_one_job(
    capture: Capture, changelog: Callable[[], list[ChangelogWrite]], unique: str
) -> None:
    body = as_bytes(request_body(unique))
    async with running(agents.intake) as intake:
        await intake.put(body, key=None)
        await intake.put(body, key=None)
    first, second = (s.value for s in capture.to(COMMANDS))
    job_id = job_id_for(TENANT, unique)
    capture.clear()

    async with running(agents.job_agent) as jobs:
        await jobs.put(first, key=job_id.encode())
        after_first = stored_job(job_id)
        await jobs.put(second, key=job_id.encode())

    job = stored_job(job_id)
    assert job is not None and after_first is not None
    assert capture.dead == []
    assert job.attempts == after_first.attempts and job.status is JobStatus.DISPATCHED
    dispatches = [s for s in capture.sent if s.topic.startswith("cp.dispatch.")]
    # The second create re-sends the still pending dispatch (same attempt), never a new attempt.
    assert len(dispatches) == 2
    assert {Dispatch.model_validate_json(s.value).attempt_id for s in dispatches} == {
        f"{job_id}-a1"
    }
    # ... and records the duplicate in the timeline.
    assert job.events[-1].type == "duplicate_ignored"
    assert JobEvent.model_validate_json(capture.to(EVENTS)[-1].value) == job.events[-1]


async def test_the_same_request_id_with_another_payload_is_a_conflict(
    capture: Capture, unique: str
) -> None:
    job_id, create = await create_job(capture, unique)
    _, other = await create_job(capture, unique, temperature=1.5)
    async with running(agents.job_agent) as jobs:
        await jobs.put(create, key=job_id.encode())
        before = stored_job(job_id)
        await jobs.put(other, key=job_id.encode())

    job = stored_job(job_id)
    assert job is not None and before is not None
    assert capture.reasons() == ["conflict"]
    assert job.request == before.request and job.attempts == before.attempts
    assert job.events[-1].type == "conflict"


async def test_acknowledged_sends_are_marked_published_on_the_next_step(
    capture: Capture, unique: str
) -> None:
    job_id, create = await create_job(capture, unique)
    async with running(agents.job_agent) as jobs:
        await jobs.put(create, key=job_id.encode())
        capture.acknowledge()
        await settle()
        assert set(runtime.delivered[job_id]) == {"e1", "e2", "e3", f"d-{job_id}-a1"}
        capture.clear()

        await jobs.put(create, key=job_id.encode())

    job = stored_job(job_id)
    assert job is not None
    assert job.outbox == []
    assert job.current is not None and job.current.published_at is not None
    assert capture.sent == [] and capture.dead == []
    assert job_id not in runtime.delivered


async def test_results_complete_a_job_end_to_end(capture: Capture, unique: str) -> None:
    job_id, create = await create_job(capture, unique)
    async with running(agents.job_agent) as jobs:
        await jobs.put(create, key=job_id.encode())
    job = stored_job(job_id)
    assert job is not None and job.current is not None
    attempt = job.current
    result = provider_result(
        job_id,
        attempt.attempt_id,
        attempt.provider,
        attempt.model,
        output=Output(text="Hello.", finish_reason="stop"),
        raw_usage={"input_tokens": 10, "output_tokens": 3},
    )
    capture.clear()
    async with running(agents.results) as results:
        await results.put(encode(result), key=None)
    [record] = capture.to(COMMANDS)
    capture.clear()

    async with running(agents.job_agent) as jobs:
        await jobs.put(record.value, key=record.key)
        await jobs.put(record.value, key=record.key)  # redelivered: a duplicate command

    assert capture.dead == []
    job = stored_job(job_id)
    assert job is not None
    assert job.status is JobStatus.COMPLETED
    assert job.final is not None and job.final.output == Output(text="Hello.", finish_reason="stop")
    responses = capture.to("cp.responses")
    assert len(responses) == 2  # published, then re-sent for the duplicate while pending
    assert {s.key for s in responses} == {job_id.encode()}
    assert orjson.loads(responses[0].value)["state"] == "COMPLETED"
    completed = [JobEvent.model_validate_json(s.value) for s in capture.to(EVENTS)]
    assert "completed" in {e.type for e in completed}
    assert attempt.provider in runtime.health.providers


async def test_a_result_for_an_unknown_job_is_dead_lettered(
    capture: Capture, changelog: Callable[[], list[ChangelogWrite]], unique: str
) -> None:
    job_id = job_id_for(TENANT, unique)
    command = RecordResult(
        command_id="result:ev-x",
        job_id=job_id,
        at=datetime.now(UTC),
        result=provider_result(job_id, f"{job_id}-a1", "sim-fast", "swift-mini-sim"),
    )
    async with running(agents.job_agent) as jobs:
        await jobs.put(encode(command), key=job_id.encode())

    assert capture.sent == []
    [(topic, _, record)] = capture.dead
    assert (topic, record.reason, record.topic) == (DLQ, "unknown_job", COMMANDS)
    assert job_id in record.detail
    assert agents.jobs.get(job_id) is None
    assert changelog() == []


async def test_a_bad_command_is_dead_lettered(capture: Capture) -> None:
    async with running(agents.job_agent) as jobs:
        await jobs.put(b"not json", key=b"job_x")
        await jobs.put(b'{"kind": "bogus", "job_id": "job_x"}', key=b"job_x")

    assert capture.sent == []
    assert capture.reasons() == ["not_json", "schema"]


async def test_a_corrupted_stored_job_is_dead_lettered(capture: Capture, unique: str) -> None:
    job_id, create = await create_job(capture, unique)
    agents.jobs.data[job_id] = b"{broken"  # straight into the store, as a bad changelog would
    async with running(agents.job_agent) as jobs:
        await jobs.put(create, key=job_id.encode())

    assert capture.sent == []
    assert capture.reasons() == ["state_corrupted"]


async def test_an_error_inside_a_step_is_dead_lettered_and_the_agent_goes_on(
    capture: Capture, monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    bad_id, bad = await create_job(capture, unique + "-bad")
    good_id, good = await create_job(capture, unique + "-good")

    def exploding_decide(job: Job | None, command: Command, ctx: Any) -> Any:
        if command.job_id == bad_id:
            raise RuntimeError("boom in decide")
        return real_decide(job, command, ctx)

    monkeypatch.setattr(agents, "decide", exploding_decide)
    async with running(agents.job_agent) as jobs:
        event = await jobs.put(bad, key=bad_id.encode())
        await jobs.put(good, key=good_id.encode())

    [(topic, key, record)] = capture.dead
    assert (topic, record.reason, record.topic) == (DLQ, "agent_error", COMMANDS)
    assert record.offset == event.message.offset
    assert "boom in decide" in record.detail
    assert base64.b64decode(record.payload_b64) == bad
    assert record.key == bad_id
    assert key == b"cp.commands:0"
    assert agents.jobs.get(bad_id) is None
    job = stored_job(good_id)
    assert job is not None and job.status is JobStatus.DISPATCHED
    assert {s.key for s in capture.sent} == {good_id.encode()}


async def test_a_cancel_from_intake_cancels_the_job_and_tells_the_provider(
    capture: Capture, unique: str
) -> None:
    job_id, create = await create_job(capture, unique)
    async with running(agents.job_agent) as jobs:
        await jobs.put(create, key=job_id.encode())
    job = stored_job(job_id)
    assert job is not None and job.current is not None
    provider = job.current.provider
    capture.clear()

    cancel = {"type": "cancel", "tenant_id": TENANT, "request_id": unique}
    async with running(agents.intake) as intake:
        await intake.put(as_bytes(cancel), key=None)
    [command] = capture.to(COMMANDS)
    capture.clear()
    async with running(agents.job_agent) as jobs:
        await jobs.put(command.value, key=command.key)

    assert capture.dead == []
    job = stored_job(job_id)
    assert job is not None and job.status is JobStatus.CANCELLED
    [provider_cancel] = [s for s in capture.sent if s.topic.startswith("cp.dispatch.")]
    assert provider_cancel.topic == f"cp.dispatch.{provider}"
    assert orjson.loads(provider_cancel.value)["type"] == "cancel"
    [response] = capture.to("cp.responses")
    assert orjson.loads(response.value)["state"] == "CANCELLED"


async def test_a_cancel_from_another_tenant_is_an_unknown_job(
    capture: Capture, unique: str
) -> None:
    job_id, create = await create_job(capture, unique)
    cancel = CancelJob(command_id="c-1", job_id=job_id, at=datetime.now(UTC), tenant_id="intruder")
    async with running(agents.job_agent) as jobs:
        await jobs.put(create, key=job_id.encode())
        capture.clear()
        await jobs.put(encode(cancel), key=job_id.encode())

    assert capture.reasons() == ["unknown_job"]
    job = stored_job(job_id)
    assert job is not None and job.status is JobStatus.DISPATCHED
