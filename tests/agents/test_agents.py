"""The agent tier: the job core's steps, one record at a time, with no broker.

Each test drives a real `JobCore` (real settings, catalogue, policy, `domain.decide`) through its
synchronous step methods: records go in through `JobCore._consume` as a consumer would hand them
over, and what a step did is read from the records it queued in its partition's transaction
(`Driver.pending`), the rows it left for the changelog (`Transaction.rows`) and the partition's
state. `Driver.commit` runs the core's own flush and commit against recording fake producers.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

import streams.core
from domain.codec import decode_command, encode
from domain.commands import CancelJob, Command, CreateJob, MarkPublished, RecordResult, Tick
from domain.decide import decide as real_decide
from domain.ids import idempotency_key, job_id_for
from domain.job import Job
from domain.lifecycle import AttemptStatus, JobStatus
from domain.messages import (
    Dispatch,
    FinalResponse,
    HealthRecord,
    JobEvent,
    JobRequest,
    Output,
    ProviderCancel,
    RawProviderError,
)
from streams.core import MAX_RECORD_BYTES, RESULTS_GATE_MAX, RESULTS_GATE_RECHECK, CoreNotReady
from streams.pacing import FetchPacer
from streams.partition import Partition
from streams.settings import MAX_GATHER_MS
from streams.topology import MissingDispatchTopics
from streams.tracing import trace_id, valid_traceparent
from streams.txn import Record
from tables.exceptions import StateCorrupted
from tables.jobs import (
    OFFSET,
    REQUEST,
    RETIRED,
    ROW,
    RetiredJob,
    decode_row,
    encode_request,
    encode_retired,
    encode_row,
    header_time,
    key,
    row_headers,
)
from tests.agents.conftest import (
    TENANT,
    TRACEPARENT,
    Driver,
    as_bytes,
    header,
    provider_result,
    request_body,
    request_id_on,
)

INTAKE = "cp.intake"
COMMANDS = "cp.commands"
RESULTS = "cp.results"
EVENTS = "cp.events"
RESPONSES = "cp.responses"
DLQ = "cp.dlq"
HEALTH = "cp.health"
CHANGELOG = "{app_id}-jobs-changelog"


def events(records: list[Record]) -> list[JobEvent]:
    return [JobEvent.model_validate_json(r.value or b"") for r in records]


def near_ms(restored: datetime | None, exact: datetime | None) -> bool:
    """A time read back from a changelog header: `exact`, rounded up to the millisecond."""
    if restored is None or exact is None:
        return restored is exact
    return timedelta(0) <= restored - exact < timedelta(milliseconds=1)


def metric(driver: Driver, name: str, **labels: str) -> float:
    return driver.core.metrics.registry.get_sample_value(name, labels) or 0.0


def complete(driver: Driver, job: Job, **fields: Any) -> Job:
    """Apply a `completed` result of the job's current attempt on the job's own partition."""
    attempt = job.current
    assert attempt is not None
    driver.result(
        provider_result(
            job.job_id,
            attempt.attempt_id,
            attempt.provider,
            attempt.model,
            output=Output(text="Hello.", finish_reason="stop"),
            raw_usage={"input_tokens": 10, "output_tokens": 3},
            **fields,
        )
    )
    done = driver.job(job.job_id)
    assert done is not None and done.status is JobStatus.COMPLETED
    return done


# -- intake ---------------------------------------------------------------------------------------


async def test_intake_turns_a_request_into_a_create_command_rekeyed_onto_the_jobs_partition(
    driver: Driver,
) -> None:
    request_id = request_id_on(5)
    record = driver.intake(
        request_body(request_id),
        partition=2,
        key=b"producer-key",
        headers=[("traceparent", TRACEPARENT.encode())],
    )

    job_id = job_id_for(TENANT, request_id)
    assert driver.dead() == []
    # Queued in the intake partition's transaction, for partition 5 of cp.commands.
    [sent] = driver.core.txns[2].records
    assert driver.pending() == [sent]
    assert (sent.topic, sent.key, sent.partition) == (
        driver.topic(COMMANDS),
        job_id.encode(),
        5,
    )
    command = decode_command(sent.value)
    assert isinstance(command, CreateJob)
    assert (command.job_id, command.tenant_id, command.source) == (job_id, TENANT, "kafka")
    assert command.command_id == f"intake:{record.topic}:2:{record.offset}"
    assert command.request.request_id == request_id
    assert command.fingerprint == command.request.fingerprint()
    # The producer's trace continues: same trace id on the command and in its header.
    traceparent = header(sent, "traceparent")
    assert traceparent is not None and valid_traceparent(traceparent.decode())
    assert trace_id(command.trace) == TRACEPARENT.split("-")[1]
    assert traceparent.decode() == command.trace.traceparent
    # The intake offset commits with the command; intake itself creates no job.
    assert driver.core.txns[2].offsets == {TopicPartition(record.topic, 2): record.offset + 1}
    assert all(not p.jobs and not p.stored(ROW) for p in driver.core.parts.values())
    assert all(not txn.rows for txn in driver.core.txns.values())


async def test_intake_starts_a_trace_when_the_record_has_none(driver: Driver) -> None:
    driver.intake(request_body("r-1"))

    [sent] = driver.pending()
    traceparent = header(sent, "traceparent")
    assert traceparent is not None and valid_traceparent(traceparent.decode())
    command = decode_command(sent.value)
    assert isinstance(command, CreateJob)
    assert command.trace.traceparent == traceparent.decode()


async def test_the_same_request_twice_gives_two_create_commands_for_one_job(
    driver: Driver,
) -> None:
    body = as_bytes(request_body("r-1"))
    driver.consume(INTAKE, 0, body, body, key=b"a")

    assert driver.dead() == []
    job_id = job_id_for(TENANT, "r-1")
    sent = driver.pending()
    assert [s.topic for s in sent] == [driver.topic(COMMANDS)] * 2
    assert {(s.key, s.partition) for s in sent} == {(job_id.encode(), driver.partition_of(job_id))}
    first, second = driver.pending_commands()
    assert isinstance(first, CreateJob) and isinstance(second, CreateJob)
    assert first.job_id == second.job_id == job_id
    assert first.fingerprint == second.fingerprint
    # Distinct command ids (from the record's offset): the job step dedups by job, not here.
    assert first.command_id != second.command_id


async def test_intake_dead_letters_garbage_as_not_json_and_goes_on(driver: Driver) -> None:
    garbage = b"\x00\xffnot json at all"
    bad, good = driver.consume(INTAKE, 3, garbage, as_bytes(request_body("r-1")), key=b"k1")

    [letter] = driver.dead()
    assert letter.reason == "not_json"
    assert (letter.topic, letter.partition, letter.offset) == (driver.topic(INTAKE), 3, bad.offset)
    assert letter.key == "k1"
    assert base64.b64decode(letter.payload_b64) == garbage
    assert letter.payload_size == len(garbage)
    [dlq] = driver.pending(DLQ)
    assert dlq.key == f"{driver.topic(INTAKE)}:3".encode()
    assert metric(driver, "cp_dead_letters_total", reason="not_json", topic=bad.topic) == 1
    # The next record of the batch is taken as usual, and the offset moves past both.
    assert [c.job_id for c in driver.pending_commands()] == [job_id_for(TENANT, "r-1")]
    assert driver.core.txns[3].offsets == {TopicPartition(bad.topic, 3): good.offset + 1}


async def test_intake_dead_letters_a_request_without_tenant_as_schema(driver: Driver) -> None:
    driver.intake(request_body("r-1", tenant=None))

    assert driver.pending_commands() == []
    [letter] = driver.dead()
    assert letter.reason == "schema"
    assert "tenant_id" in letter.detail


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param(as_bytes(request_body("r-1", messages=[])), "schema", id="no-messages"),
        pytest.param(as_bytes(request_body("r-1", surprise=1)), "schema", id="unknown-field"),
        pytest.param(b"[1, 2]", "schema", id="not-an-object"),
        pytest.param(
            as_bytes({"type": "cancel", "tenant_id": TENANT}), "schema", id="cancel-no-target"
        ),
        pytest.param(None, "empty", id="tombstone"),
    ],
)
async def test_intake_dead_letters_an_invalid_request(
    driver: Driver, value: bytes | None, reason: str
) -> None:
    driver.intake(value)

    assert driver.pending_commands() == []
    assert driver.reasons() == [reason]


async def test_intake_dead_letters_an_oversize_record(driver: Driver) -> None:
    padding = "x" * driver.settings.max_request_bytes
    payload = as_bytes(request_body("r-1", metadata={"padding": padding}))
    assert len(payload) > driver.settings.max_request_bytes
    driver.intake(payload)

    assert driver.pending_commands() == []
    [letter] = driver.dead()
    assert letter.reason == "oversize"
    assert letter.payload_size == len(payload)


@pytest.mark.parametrize("by", ["request_id", "job_id"])
async def test_intake_turns_a_cancel_request_into_a_cancel_command(driver: Driver, by: str) -> None:
    job_id = job_id_for(TENANT, "r-1")
    target = {"request_id": "r-1"} if by == "request_id" else {"job_id": job_id}
    driver.intake({"type": "cancel", "tenant_id": TENANT, "reason": "changed mind", **target})

    assert driver.dead() == []
    [sent] = driver.pending()
    assert (sent.topic, sent.key, sent.partition) == (
        driver.topic(COMMANDS),
        job_id.encode(),
        driver.partition_of(job_id),
    )
    command = decode_command(sent.value)
    assert isinstance(command, CancelJob)
    assert (command.job_id, command.tenant_id, command.reason) == (job_id, TENANT, "changed mind")


# -- results --------------------------------------------------------------------------------------


async def test_a_result_on_the_jobs_own_partition_is_applied_directly(driver: Driver) -> None:
    job = await driver.create("r-1")
    attempt = job.current
    assert attempt is not None
    started = provider_result(
        job.job_id, attempt.attempt_id, attempt.provider, attempt.model, type="started"
    )
    record = driver.result(started)

    number = driver.partition_of(job.job_id)
    assert driver.pending_commands() == [] and driver.dead() == []
    stored = driver.job(job.job_id)
    assert stored is not None and stored.status is JobStatus.STARTED
    assert stored.current is not None and stored.current.status is AttemptStatus.STARTED
    assert [e.type for e in events(driver.pending(EVENTS))] == ["started"]
    assert driver.core.txns[number].rows == {job.job_id: stored}
    # The attempt-timeout gate knows how far cp.results is read on this partition.
    assert driver.core.results_read[number] == record.offset
    assert driver.core.txns[number].offsets == {
        TopicPartition(record.topic, number): record.offset + 1
    }


async def test_a_result_on_another_partition_is_rekeyed_as_a_record_result_command(
    driver: Driver,
) -> None:
    job_id = job_id_for(TENANT, request_id_on(6))
    result = provider_result(
        job_id,
        f"{job_id}-a1",
        "sim-fast",
        "swift-mini-sim",
        type="started",
        event_id="ev-1",
        trace={"traceparent": TRACEPARENT},
    )
    record = driver.result(result, partition=1)

    assert driver.dead() == []
    [sent] = driver.core.txns[1].records
    assert driver.pending() == [sent]
    assert (sent.topic, sent.key, sent.partition) == (driver.topic(COMMANDS), job_id.encode(), 6)
    command = decode_command(sent.value)
    assert isinstance(command, RecordResult)
    # Named by the record's position: a re-sent answer is a new command, deduped by event id.
    assert command.command_id == f"result:{record.topic}:1:{record.offset}"
    assert command.result.model_dump(exclude={"trace"}) == result.model_dump(exclude={"trace"})
    assert trace_id(command.result.trace) == TRACEPARENT.split("-")[1]
    assert header(sent, "traceparent") is not None
    # Nothing was applied here: partition 6 applies it when the command comes round.
    assert driver.core.parts[6].jobs == {} and driver.core.parts[1].jobs == {}


async def test_a_result_over_the_result_limit_is_dead_lettered_not_rekeyed(driver: Driver) -> None:
    job_id = job_id_for(TENANT, request_id_on(6))
    text = "y" * driver.settings.max_result_bytes
    result = provider_result(job_id, f"{job_id}-a1", "sim-fast", "m", output=Output(text=text))
    driver.result(result, partition=1)

    assert driver.pending_commands() == []
    assert driver.reasons() == ["oversize"]


async def test_a_command_too_big_to_rekey_is_dead_lettered_instead_of_failing_the_commit(
    driver: Driver,
) -> None:
    """Before: the re-keyed record failed the transaction, again on every retry."""
    job = await driver.create("r-1")
    assert job.current is not None
    answer = provider_result(
        job.job_id,
        job.current.attempt_id,
        "sim-fast",
        "m",
        output=Output(text="z" * (MAX_RECORD_BYTES + 10)),
    )
    command = RecordResult(command_id="big", job_id=job.job_id, at=datetime.now(UTC), result=answer)
    other = (driver.partition_of(job.job_id) + 1) % 8
    record = driver.command(command, partition=other)

    assert driver.pending_commands() == []
    [letter] = driver.dead()
    assert (letter.reason, letter.partition, letter.offset) == ("oversize", other, record.offset)
    assert driver.core.txns[other].offsets == {
        TopicPartition(driver.topic(COMMANDS), other): record.offset + 1
    }
    await driver.commit()


async def test_a_step_whose_records_would_not_fit_fails_its_job_as_internal(
    driver: Driver,
) -> None:
    job = await driver.create("r-1")
    assert job.current is not None
    answer = provider_result(
        job.job_id,
        job.current.attempt_id,
        job.current.provider,
        job.current.model,
        output=Output(text="z" * (MAX_RECORD_BYTES + 10)),
    )
    driver.command(
        RecordResult(command_id="big", job_id=job.job_id, at=datetime.now(UTC), result=answer)
    )

    assert driver.dead() == []
    failed = driver.job(job.job_id)
    assert failed is not None and failed.status is JobStatus.FAILED
    assert failed.final is not None and failed.final.error is not None
    assert failed.final.error.code == "internal"
    assert "RecordTooLarge" in failed.final.error.message
    assert all(len(r.value or b"") < MAX_RECORD_BYTES for r in driver.pending())
    assert len(driver.pending(RESPONSES)) == 1


async def test_results_dead_letters_garbage_and_keeps_going(driver: Driver) -> None:
    job_id = job_id_for(TENANT, request_id_on(6))
    good = provider_result(job_id, f"{job_id}-a1", "sim-fast", "swift-mini-sim")
    driver.consume(RESULTS, 1, b"garbage", b'{"type": "completed"}', encode(good))

    assert driver.reasons() == ["not_json", "schema"]
    assert {letter.topic for letter in driver.dead()} == {driver.topic(RESULTS)}
    assert [s.key for s in driver.pending(COMMANDS)] == [job_id.encode()]


# -- the job step ---------------------------------------------------------------------------------


async def test_create_job_stores_a_dispatched_job_and_queues_its_dispatch_and_events(
    driver: Driver,
) -> None:
    create = await driver.admit("r-1")
    driver.redeliver(create)

    job_id = job_id_for(TENANT, "r-1")
    number = driver.partition_of(job_id)
    assert create.partition == number
    assert driver.dead() == []
    job = driver.job(job_id)
    assert job is not None and job.status is JobStatus.DISPATCHED
    assert job.current is not None
    provider = job.current.provider
    assert job.current.attempt_id == f"{job_id}-a1"
    # Everything the step queued is in its own partition's transaction.
    txn = driver.core.txns[number]
    assert driver.pending() == txn.records

    # One dispatch to the chosen provider's queue, keyed by job_id, with the trace header.
    [dispatch_record] = driver.dispatches()
    assert dispatch_record.topic == driver.topic(f"cp.dispatch.{provider}")
    assert dispatch_record.key == job_id.encode()
    assert header(dispatch_record, "traceparent") is not None
    dispatch = Dispatch.model_validate_json(dispatch_record.value or b"")
    assert dispatch.idempotency_key == idempotency_key(job_id, job.current.attempt_id)
    assert (dispatch.attempt_no, dispatch.provider, dispatch.tenant_id) == (1, provider, TENANT)

    # The timeline: created, routed, dispatched, in seq order, keyed by job_id.
    timeline = driver.pending(EVENTS)
    assert [(e.seq, e.type) for e in events(timeline)] == [
        (1, "created"),
        (2, "routed"),
        (3, "dispatched"),
    ]
    assert {r.key for r in timeline} == {job_id.encode()}
    # The request goes to the changelog once, now; the row when the transaction flushes.
    [request] = driver.pending(CHANGELOG)
    assert (request.key, request.partition) == (key(REQUEST, job_id), number)
    assert request.value == encode_request(job.request)
    assert txn.rows == {job_id: job}
    assert len(txn.records) == 5

    # The effects commit with the step: nothing stays in the outbox; a timer is armed.
    assert job.outbox == []
    assert job.current.published_at is not None
    assert driver.core.parts[number].wake.due == {job_id: job.current.expires_at}
    assert job.next_wake() == job.current.expires_at
    assert metric(driver, "cp_job_transitions_total", state="DISPATCHED") == 1


async def test_a_commit_writes_the_rows_effects_and_input_offsets_in_one_transaction(
    driver: Driver,
) -> None:
    create = await driver.admit("r-1")
    consumed = driver.redeliver(create)
    job_id = job_id_for(TENANT, "r-1")
    number = driver.partition_of(job_id)
    queued = list(driver.core.txns[number].records)
    job = driver.job(job_id)
    assert job is not None
    # Steps only queue: the partition's producer has not been touched yet.
    producer = driver.producers[number]
    assert producer.calls == []
    committed = metric(driver, "cp_transactions_total", outcome="committed")

    produced = await driver.commit()

    assert producer.calls == ["begin"] + ["send"] * 7 + ["commit"]
    assert metric(driver, "cp_transactions_total", outcome="committed") == committed + 1
    *effects, row, offset = produced
    assert effects == queued
    assert (row.topic, row.key, row.partition) == (
        driver.topic(CHANGELOG),
        key(ROW, job_id),
        number,
    )
    assert decode_row(row.value or b"", job.request) == job
    assert near_ms(header_time(row.headers, "wake"), job.next_wake())
    assert header_time(row.headers, "retire") is None
    # The input offset commits in the same transaction, on the partition's changelog.
    assert (offset.topic, offset.key, offset.value, offset.partition) == (
        driver.topic(CHANGELOG),
        key(OFFSET, consumed.topic),
        str(consumed.offset + 1).encode(),
        number,
    )
    txn = driver.core.txns[number]
    assert not txn.pending and txn.rows == {} and txn.records == []


async def test_a_redelivered_create_changes_nothing(driver: Driver) -> None:
    create = await driver.admit("r-1")
    driver.redeliver(create)
    await driver.commit()
    job_id = job_id_for(TENANT, "r-1")
    before = driver.job(job_id)

    record = driver.redeliver(create)

    assert driver.pending() == []  # no effect, no changelog write, no dead letter
    txn = driver.txn(job_id)
    assert txn.rows == {}
    assert driver.job(job_id) is before
    assert txn.offsets == {TopicPartition(record.topic, record.partition): record.offset + 1}


async def test_the_same_request_from_intake_twice_is_one_job(driver: Driver) -> None:
    body = as_bytes(request_body("r-1"))
    driver.consume(INTAKE, 0, body, body)
    first, second = driver.sent_to(await driver.commit(), COMMANDS)

    driver.redeliver(first)
    after_first = driver.job(job_id_for(TENANT, "r-1"))
    driver.redeliver(second)

    job = driver.job(job_id_for(TENANT, "r-1"))
    assert job is not None and after_first is not None
    assert driver.dead() == []
    assert job.attempts == after_first.attempts and job.status is JobStatus.DISPATCHED
    # One dispatch (the first create's): the second is recorded in the timeline, nothing more.
    assert len(driver.dispatches()) == 1
    assert job.events[-1].type == "duplicate_ignored"
    assert events(driver.pending(EVENTS))[-1] == job.events[-1]


async def test_the_same_request_id_with_another_payload_is_a_conflict(driver: Driver) -> None:
    before = await driver.create("r-1")
    other = await driver.admit("r-1", temperature=1.5)

    consumed = driver.redeliver(other)

    [letter] = driver.dead()
    assert (letter.reason, letter.topic, letter.offset) == (
        "conflict",
        driver.topic(COMMANDS),
        consumed.offset,
    )
    job = driver.job(before.job_id)
    assert job is not None
    assert job.request == before.request and job.attempts == before.attempts
    assert job.events[-1].type == "conflict"
    assert driver.dispatches() == []


async def test_results_complete_a_job_end_to_end(driver: Driver) -> None:
    job = await driver.create(request_id_on(4))
    attempt = job.current
    assert attempt is not None
    result = provider_result(
        job.job_id,
        attempt.attempt_id,
        attempt.provider,
        attempt.model,
        output=Output(text="Hello.", finish_reason="stop"),
        raw_usage={"input_tokens": 10, "output_tokens": 3},
    )
    driver.result(result, partition=0)  # the provider keyed it elsewhere: re-keyed to partition 4
    [command] = driver.sent_to(await driver.commit(), COMMANDS)
    assert command.partition == 4

    driver.redeliver(command)

    assert driver.dead() == []
    done = driver.job(job.job_id)
    assert done is not None and done.status is JobStatus.COMPLETED
    assert done.final is not None
    assert done.final.output == Output(text="Hello.", finish_reason="stop")
    [response] = driver.pending(RESPONSES)
    assert response.key == job.job_id.encode()
    final = FinalResponse.model_validate_json(response.value or b"")
    assert (final.state, final.output) == ("COMPLETED", done.final.output)
    assert "completed" in {e.type for e in events(driver.pending(EVENTS))}
    # The outcome goes to cp.health in the step's transaction; every worker's feed folds it.
    [outcome] = [HealthRecord.model_validate_json(r.value or b"") for r in driver.pending(HEALTH)]
    assert (outcome.provider, outcome.ok, outcome.job_id) == (attempt.provider, True, job.job_id)
    assert driver.pending(HEALTH)[0].key == attempt.provider.encode()
    assert driver.core.runtime.health.providers == {}  # folded from the topic, not locally
    # Final: long-polls wake at the commit, no timer is left, retirement is scheduled.
    part = driver.core.parts[4]
    assert driver.core.txns[4].finished == [job.job_id]
    assert job.job_id not in part.wake.due
    assert part.retire.due == {job.job_id: done.updated_at + driver.core.retention}

    queued = len(driver.pending())
    driver.redeliver(command)  # redelivered: a duplicate command changes nothing
    assert len(driver.pending()) == queued
    assert driver.job(job.job_id) == done

    produced = await driver.commit()
    [row] = [r for r in produced if r.key == key(ROW, job.job_id)]
    assert near_ms(header_time(row.headers, "retire"), done.updated_at + driver.core.retention)
    assert header_time(row.headers, "wake") is None
    # A finished job is kept encoded, decoded again on each read.
    assert part.jobs == {} and part.stored(ROW) == {job.job_id: row.value}
    assert driver.job(job.job_id) == done


@pytest.mark.parametrize("via", [COMMANDS, RESULTS])
async def test_a_result_for_an_unknown_job_is_dead_lettered(driver: Driver, via: str) -> None:
    job_id = job_id_for(TENANT, "r-1")
    result = provider_result(job_id, f"{job_id}-a1", "sim-fast", "swift-mini-sim")
    if via == COMMANDS:
        command = RecordResult(
            command_id="result:ev-x", job_id=job_id, at=datetime.now(UTC), result=result
        )
        record = driver.command(command)
    else:
        record = driver.result(result)

    [letter] = driver.dead()
    assert (letter.reason, letter.topic, letter.offset) == (
        "unknown_job",
        driver.topic(via),
        record.offset,
    )
    assert job_id in letter.detail
    assert driver.pending() == driver.pending(DLQ)
    assert driver.job(job_id) is None
    assert driver.txn(job_id).rows == {}


async def test_a_bad_command_is_dead_lettered(driver: Driver) -> None:
    driver.consume(COMMANDS, 0, b"not json", b'{"kind": "bogus", "job_id": "job_x"}', key=b"job_x")

    assert driver.pending() == driver.pending(DLQ)
    assert driver.reasons() == ["not_json", "schema"]


async def test_a_row_leaves_out_what_its_events_repeat_and_old_rows_still_read(
    driver: Driver,
) -> None:
    job = complete(driver, await driver.create("r-1"))
    stored = orjson.loads(encode_row(job))
    assert stored["events"] and all(
        not {"job_id", "tenant_id", "schema_version"} & set(event) for event in stored["events"]
    )
    assert decode_row(encode_row(job), job.request) == job
    # A row written before events were trimmed carries them whole: it reads the same.
    whole = orjson.loads(job.model_dump_json(exclude={"request", "decisions"}))
    assert decode_row(orjson.dumps(whole), job.request) == job


@pytest.mark.parametrize(
    ("stored_request", "detail"),
    [
        pytest.param(True, "stored job cannot be decoded", id="garbage-row"),
        pytest.param(False, "has a row but no stored request", id="no-request"),
    ],
)
async def test_a_corrupted_stored_row_is_dead_lettered(
    driver: Driver, stored_request: bool, detail: str
) -> None:
    create = await driver.admit("r-1")
    command = decode_command(create.value)
    assert isinstance(command, CreateJob)
    part = driver.part(command.job_id)
    part.store.put(key(ROW, command.job_id), b"{broken")  # as a bad changelog record would
    if stored_request:
        part.store.put(key(REQUEST, command.job_id), encode_request(command.request))

    driver.redeliver(create)

    assert driver.pending() == driver.pending(DLQ)
    [letter] = driver.dead()
    assert letter.reason == "state_corrupted"
    assert detail in letter.detail
    assert part.stored(ROW) == {command.job_id: b"{broken"}
    assert driver.txn(command.job_id).rows == {}


async def test_a_create_that_cannot_be_applied_fails_its_job_as_internal_and_the_core_goes_on(
    driver: Driver,
) -> None:
    bad_rid, good_rid = request_id_on(3, prefix="bad"), request_id_on(3, prefix="good")
    bad = await driver.admit(bad_rid, metadata={"cp_fault": "decide", "team": "search"})
    good = await driver.admit(good_rid)
    bad_id, good_id = job_id_for(TENANT, bad_rid), job_id_for(TENANT, good_rid)
    records = [driver.record(COMMANDS, 3, r.value, key=r.key) for r in (bad, good)]
    driver.core._consume(TopicPartition(driver.topic(COMMANDS), 3), records)

    # Before: the command was dead-lettered and the job never existed (a 202 then 404 forever).
    assert driver.dead() == []
    failed = driver.job(bad_id)
    assert failed is not None and failed.status is JobStatus.FAILED
    assert failed.final is not None and failed.final.error is not None
    assert failed.final.error.code == "internal"
    assert "InjectedFault" in failed.final.error.message
    assert (failed.final.error.retryable, failed.final.error.fallback) == (False, False)
    assert failed.final.metadata["team"] == "search"
    assert [e.type for e in failed.events] == ["created", "failed"]
    assert driver.dispatches() == [r for r in driver.dispatches() if r.key == good_id.encode()]
    [response] = [r for r in driver.pending(RESPONSES) if r.key == bad_id.encode()]
    final = FinalResponse.model_validate_json(response.value or b"")
    assert (final.state, final.error and final.error.code) == ("FAILED", "internal")
    assert driver.part(bad_id).wake.due.get(bad_id) is None
    assert driver.part(bad_id).retire.due.get(bad_id) is not None
    job = driver.job(good_id)
    assert job is not None and job.status is JobStatus.DISPATCHED
    assert driver.core.txns[3].offsets == {
        TopicPartition(driver.topic(COMMANDS), 3): records[1].offset + 1
    }
    # The same command again (redelivered) changes nothing.
    driver.redeliver(Record(bad.topic, bad.key, bad.value, bad.headers, 3))
    assert driver.job(bad_id) == failed


async def test_a_command_that_cannot_be_applied_to_a_live_job_fails_it_and_drops_its_attempt(
    driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = await driver.create("r-1")
    attempt = job.current
    assert attempt is not None

    def exploding(job: Job | None, command: Command, ctx: Any) -> Any:
        if isinstance(command, Tick):
            raise OverflowError("boom in a tick")
        return real_decide(job, command, ctx)

    monkeypatch.setattr(streams.core, "decide", exploding)
    driver.consumer.highwaters[driver.partition_of(job.job_id)] = 0
    driver.core._fire_timers(attempt.expires_at)

    failed = driver.job(job.job_id)
    assert failed is not None and failed.status is JobStatus.FAILED
    assert failed.final is not None and failed.final.error is not None
    assert failed.final.error.code == "internal"
    assert failed.attempts[0].status is AttemptStatus.CANCELLED
    [drop] = driver.dispatches()
    assert ProviderCancel.model_validate_json(drop.value or b"").attempt_id == attempt.attempt_id
    # Before: the tick raised, was retried on every timer turn and the job never ended.
    assert driver.part(job.job_id).wake.due.get(job.job_id) is None
    assert len(driver.pending(RESPONSES)) == 1


async def test_a_fault_after_the_state_is_written_keeps_the_jobs_timer(driver: Driver) -> None:
    job = await driver.create("r-1", metadata={"cp_fault": "after_write"})

    assert job.status is JobStatus.DISPATCHED
    assert driver.dead() == []
    assert driver.part(job.job_id).wake.due[job.job_id] == job.next_wake()
    assert job.current is not None
    driver.consumer.highwaters[driver.partition_of(job.job_id)] = 0
    driver.core._fire_timers(job.current.expires_at)
    retrying = driver.job(job.job_id)
    assert retrying is not None and retrying.status is JobStatus.RETRYING


async def test_a_cancel_from_intake_cancels_the_job_and_tells_the_provider(
    driver: Driver,
) -> None:
    job = await driver.create("r-1")
    assert job.current is not None
    provider = job.current.provider

    driver.intake({"type": "cancel", "tenant_id": TENANT, "request_id": "r-1"})
    [command] = driver.sent_to(await driver.commit(), COMMANDS)
    driver.redeliver(command)

    assert driver.dead() == []
    cancelled = driver.job(job.job_id)
    assert cancelled is not None and cancelled.status is JobStatus.CANCELLED
    [provider_cancel] = driver.dispatches()
    assert provider_cancel.topic == driver.topic(f"cp.dispatch.{provider}")
    message = ProviderCancel.model_validate_json(provider_cancel.value or b"")
    assert message.attempt_id == job.current.attempt_id
    [response] = driver.pending(RESPONSES)
    assert FinalResponse.model_validate_json(response.value or b"").state == "CANCELLED"


async def test_a_cancel_from_another_tenant_is_an_unknown_job(driver: Driver) -> None:
    job = await driver.create("r-1")
    cancel = CancelJob(
        command_id="c-1", job_id=job.job_id, at=datetime.now(UTC), tenant_id="intruder"
    )

    driver.command(cancel)

    assert driver.reasons() == ["unknown_job"]
    assert driver.pending() == driver.pending(DLQ)
    assert driver.job(job.job_id) == job


async def test_a_command_on_another_partition_is_rekeyed_to_its_jobs_partition(
    driver: Driver,
) -> None:
    job_id = job_id_for(TENANT, request_id_on(2))
    cancel = CancelJob(command_id="c-1", job_id=job_id, at=datetime.now(UTC), tenant_id=TENANT)
    driver.consume(COMMANDS, 7, encode(cancel), key=b"elsewhere", headers=[("x-h", b"1")])

    assert driver.dead() == []
    [sent] = driver.core.txns[7].records
    assert (sent.topic, sent.key, sent.partition) == (driver.topic(COMMANDS), job_id.encode(), 2)
    assert sent.value == encode(cancel)
    assert sent.headers == [("x-h", b"1")]


async def test_published_marks_of_the_outbox_design_are_ignored(driver: Driver) -> None:
    job = await driver.create("r-1")
    mark = MarkPublished(
        command_id="m-1", job_id=job.job_id, at=datetime.now(UTC), entry_ids=["e1"]
    )

    record = driver.command(mark)

    assert driver.pending() == []
    assert driver.job(job.job_id) is job
    assert driver.txn(job.job_id).offsets == {
        TopicPartition(record.topic, record.partition): record.offset + 1
    }


async def test_records_of_a_partition_not_held_here_are_left_alone(
    make_driver: Callable[..., Driver],
) -> None:
    driver = make_driver(partitions=[0])
    request_id = request_id_on(1)
    driver.consume(INTAKE, 1, as_bytes(request_body(request_id)))
    driver.consume(COMMANDS, 1, b"not json")

    assert set(driver.core.txns) == {0}
    assert driver.pending() == [] and driver.core.txns[0].offsets == {}
    with pytest.raises(CoreNotReady):
        driver.core.job(job_id_for(TENANT, request_id))


async def test_nothing_is_answered_for_past_the_membership_lease(driver: Driver) -> None:
    """Past the lease a job held here is neither served nor read, and `/readyz` says why."""
    job = await driver.create("r-lease")
    core = driver.core
    assert core.serves(job.job_id) and core.job(job.job_id) is not None
    assert core.ready() == (True, "ready")

    core.lease.until = time.monotonic() - 3.0  # lapsed 3 s ago
    assert not core.serves(job.job_id)
    with pytest.raises(CoreNotReady):
        core.job(job.job_id)
    assert core.retired(job.job_id) is None
    ready, why = core.ready()
    unconfirmed = 3.0 + core.lease.length
    assert not ready
    assert why.startswith(f"group membership not confirmed for {unconfirmed:.0f}.")

    core.lease.until = float("-inf")  # no assignment applied and confirmed yet
    assert core.ready() == (
        False,
        "group membership not confirmed yet: its partitions may have moved to another worker",
    )


async def test_wait_final_returns_when_the_final_step_commits(driver: Driver) -> None:
    job = await driver.create("r-1")
    waiter = asyncio.ensure_future(driver.core.wait_final(job.job_id, 5))
    await asyncio.sleep(0)
    complete(driver, job)
    await asyncio.sleep(0)
    assert not waiter.done()  # decided, not committed yet

    await driver.commit()

    await asyncio.wait_for(waiter, 1)
    assert job.job_id not in driver.core.waiters


# -- timers ---------------------------------------------------------------------------------------


async def test_an_attempt_timeout_fails_the_attempt_and_retries_it(driver: Driver) -> None:
    job = await driver.create("r-1")
    attempt = job.current
    assert attempt is not None
    number = driver.partition_of(job.job_id)
    driver.consumer.highwaters[number] = 0  # cp.results read to its end

    driver.core._fire_timers(attempt.expires_at - timedelta(milliseconds=1))
    assert driver.pending() == []

    driver.core._fire_timers(attempt.expires_at)

    retrying = driver.job(job.job_id)
    assert retrying is not None and retrying.status is JobStatus.RETRYING
    assert retrying.attempts[0].status is AttemptStatus.TIMED_OUT
    assert retrying.retry_at is not None
    [drop] = driver.dispatches()
    assert ProviderCancel.model_validate_json(drop.value or b"").attempt_id == attempt.attempt_id
    assert driver.part(job.job_id).wake.due == {job.job_id: retrying.retry_at}
    assert driver.dead() == []

    driver.core._fire_timers(retrying.retry_at)

    again = driver.job(job.job_id)
    assert again is not None and again.status is JobStatus.DISPATCHED
    assert [a.attempt_id for a in again.attempts] == [attempt.attempt_id, f"{job.job_id}-a2"]


async def test_an_attempt_timeout_waits_for_results_not_read_yet(driver: Driver) -> None:
    job = await driver.create("r-1")
    attempt = job.current
    assert attempt is not None
    number = driver.partition_of(job.job_id)
    driver.consumer.highwaters[number] = 5  # answers on cp.results this core has not read

    due = attempt.expires_at
    driver.core._fire_timers(due)

    assert driver.pending() == []
    assert driver.job(job.job_id) == job
    assert driver.part(job.job_id).wake.due == {job.job_id: due + RESULTS_GATE_RECHECK}

    # Held at most RESULTS_GATE_MAX: then the timeout wins anyway.
    driver.core._fire_timers(due + RESULTS_GATE_MAX + RESULTS_GATE_RECHECK)

    timed_out = driver.job(job.job_id)
    assert timed_out is not None and timed_out.status is JobStatus.RETRYING
    assert job.job_id not in driver.core.gated_since


async def test_a_deadline_expires_the_job_even_with_results_not_read_yet(driver: Driver) -> None:
    job = await driver.create("r-1", deadline_ms=1000)
    assert job.deadline_at is not None and job.current is not None
    assert driver.part(job.job_id).wake.due == {job.job_id: job.deadline_at}
    driver.consumer.highwaters[driver.partition_of(job.job_id)] = 5

    driver.core._fire_timers(job.deadline_at)

    expired = driver.job(job.job_id)
    assert expired is not None and expired.status is JobStatus.EXPIRED
    [drop] = driver.dispatches()
    assert (
        ProviderCancel.model_validate_json(drop.value or b"").attempt_id == job.current.attempt_id
    )
    [response] = driver.pending(RESPONSES)
    assert FinalResponse.model_validate_json(response.value or b"").state == "EXPIRED"
    assert driver.txn(job.job_id).finished == [job.job_id]


# -- retention ------------------------------------------------------------------------------------


async def retired_job(driver: Driver, request_id: str = "r-1") -> tuple[Job, datetime]:
    """Create, complete and retire a job, committing each stage; return it and when it retired."""
    done = complete(driver, await driver.create(request_id))
    await driver.commit()
    retire_at = done.updated_at + driver.core.retention
    driver.core._fire_timers(retire_at)
    await driver.commit()
    return done, retire_at


async def test_a_finished_job_is_retired_after_its_retention(driver: Driver) -> None:
    done = complete(driver, await driver.create("r-1"))
    await driver.commit()
    job_id = done.job_id
    number = driver.partition_of(job_id)
    retire_at = done.updated_at + driver.core.retention

    driver.core._fire_timers(retire_at - timedelta(seconds=1))
    assert driver.pending() == []
    assert driver.job(job_id) == done

    driver.core._fire_timers(retire_at)

    purge_at = retire_at + driver.core.idempotency
    changelog = driver.pending(CHANGELOG)
    assert driver.pending() == changelog
    assert [(r.key, r.value, r.partition) for r in changelog[:2]] == [
        (key(ROW, job_id), None, number),
        (key(REQUEST, job_id), None, number),
    ]
    retired = changelog[2]
    assert (retired.key, retired.partition) == (key(RETIRED, job_id), number)
    assert near_ms(header_time(retired.headers, "retire"), purge_at)
    expected = RetiredJob(
        job_id=job_id,
        tenant_id=TENANT,
        request_id="r-1",
        fingerprint=done.fingerprint,
        state="COMPLETED",
        finished_at=done.final.finished_at if done.final else done.updated_at,
        retired_at=retire_at,
    )
    assert RetiredJob.model_validate_json(retired.value or b"") == expected
    # Reads: the job is gone from the hot store, its retired record answers instead.
    assert driver.job(job_id) is None
    assert driver.core.retired(job_id) == expected
    part = driver.core.parts[number]
    assert (part.jobs, part.requests, part.stored(ROW), part.stored(REQUEST)) == ({}, {}, {}, {})
    assert part.purge.due == {job_id: purge_at}
    assert metric(driver, "cp_jobs_retired_total") == 1


async def test_a_retired_record_is_purged_after_the_idempotency_window(driver: Driver) -> None:
    done, retire_at = await retired_job(driver)
    purge_at = retire_at + driver.core.idempotency

    driver.core._fire_timers(purge_at - timedelta(seconds=1))
    assert driver.pending() == []

    driver.core._fire_timers(purge_at)

    [tombstone] = driver.pending()
    assert (tombstone.topic, tombstone.key, tombstone.value) == (
        driver.topic(CHANGELOG),
        key(RETIRED, done.job_id),
        None,
    )
    assert driver.core.retired(done.job_id) is None
    assert driver.part(done.job_id).purge.due == {}


async def test_retiring_a_job_before_its_row_is_flushed_drops_the_row_write(
    driver: Driver,
) -> None:
    done = complete(driver, await driver.create("r-1"))
    txn = driver.txn(done.job_id)
    assert txn.rows == {done.job_id: done}

    driver.core._fire_timers(done.updated_at + driver.core.retention)

    assert txn.rows == {}
    produced = await driver.commit()
    rows = [r for r in produced if r.key == key(ROW, done.job_id)]
    assert [r.value for r in rows] == [None]


async def test_a_create_for_a_retired_job_with_the_same_payload_creates_nothing(
    driver: Driver,
) -> None:
    done, _ = await retired_job(driver)
    again = await driver.admit("r-1")

    driver.redeliver(again)

    assert driver.pending() == []
    assert driver.job(done.job_id) is None
    retired = driver.core.retired(done.job_id)
    assert retired is not None and retired.state == "COMPLETED"


async def test_a_create_for_a_retired_job_with_another_payload_is_a_conflict(
    driver: Driver,
) -> None:
    done, _ = await retired_job(driver)
    other = await driver.admit("r-1", temperature=1.5)

    consumed = driver.redeliver(other)

    [letter] = driver.dead()
    assert (letter.reason, letter.offset) == ("conflict", consumed.offset)
    assert done.job_id in letter.detail
    assert driver.pending() == driver.pending(DLQ)
    assert driver.job(done.job_id) is None


# -- restore --------------------------------------------------------------------------------------


async def test_apply_changelog_rebuilds_jobs_requests_retired_and_timers(driver: Driver) -> None:
    live = await driver.create("live")
    finished = complete(driver, await driver.create("finished"))
    gone = RetiredJob(
        job_id=job_id_for(TENANT, "gone"),
        tenant_id=TENANT,
        request_id="gone",
        fingerprint="f" * 64,
        state="FAILED",
        finished_at=finished.updated_at,
        retired_at=finished.updated_at,
    )
    retire_at = finished.updated_at + driver.core.retention
    purge_at = gone.retired_at + driver.core.idempotency
    part = Partition(3)

    for job, wake, retire in ((live, live.next_wake(), None), (finished, None, retire_at)):
        part.apply_changelog([(key(REQUEST, job.job_id), encode_request(job.request), [])])
        part.apply_changelog([(key(ROW, job.job_id), encode_row(job), row_headers(wake, retire))])
    part.apply_changelog(
        [(key(RETIRED, gone.job_id), encode_retired(gone), row_headers(None, purge_at))]
    )

    assert (part.restored, len(part.stored(ROW))) == (5, 2)
    assert part.jobs == {}  # rows stay encoded until a step or a read needs them
    assert part.job(live.job_id) == live
    assert part.job(finished.job_id) == finished
    assert set(part.jobs) == {live.job_id}  # live jobs stay decoded, finished ones do not
    assert isinstance(part.requests[live.job_id], JobRequest)
    assert set(part.wake.due) == {live.job_id}
    assert near_ms(part.wake.due[live.job_id], live.next_wake())
    assert set(part.retire.due) == {finished.job_id}
    assert near_ms(part.retire.due[finished.job_id], retire_at)
    assert part.retired_job(gone.job_id) == gone
    assert near_ms(part.purge.due[gone.job_id], purge_at)

    # Tombstones take each kind out again, timers included.
    part.apply_changelog([(key(ROW, live.job_id), None, [])])
    part.apply_changelog([(key(ROW, finished.job_id), None, [])])
    part.apply_changelog([(key(REQUEST, live.job_id), None, [])])
    part.apply_changelog([(key(RETIRED, gone.job_id), None, [])])
    assert part.job(live.job_id) is None and part.job(finished.job_id) is None
    assert set(part.stored(REQUEST)) == {finished.job_id} and part.requests == {}
    assert part.retired_job(gone.job_id) is None
    assert (part.wake.due, part.retire.due, part.purge.due) == ({}, {}, {})
    assert part.restored == 9


@pytest.mark.parametrize("raw", [b"x:job_1", b"j:", b"job_1"])
async def test_apply_changelog_refuses_a_key_it_does_not_know(raw: bytes) -> None:
    with pytest.raises(StateCorrupted):
        Partition(0).apply_changelog([(raw, b"{}", [])])


async def test_a_partition_restored_from_what_the_core_committed_holds_the_same_state(
    driver: Driver,
) -> None:
    number = 5
    gone, _ = await retired_job(driver, request_id_on(number, prefix="gone"))
    live = await driver.create(request_id_on(number, prefix="live"))
    finished = complete(driver, await driver.create(request_id_on(number, prefix="finished")))
    await driver.commit()
    held = driver.core.parts[number]

    restored = Partition(number)
    for record in driver.committed:
        if record.topic == driver.topic(CHANGELOG) and record.partition == number:
            assert record.key is not None
            restored.apply_changelog([(record.key, record.value, record.headers)])

    assert set(restored.stored(ROW)) == {live.job_id, finished.job_id}
    assert set(held.jobs) | set(held.stored(ROW)) == {live.job_id, finished.job_id}
    for job in (live, finished):
        assert restored.job(job.job_id) == held.job(job.job_id)
    assert restored.job(gone.job_id) is None
    assert restored.retired_job(gone.job_id) == held.retired_job(gone.job_id)
    for restored_index, held_index in (
        (restored.wake, held.wake),
        (restored.retire, held.retire),
        (restored.purge, held.purge),
    ):
        assert set(restored_index.due) == set(held_index.due)
        for job_id, when in held_index.due.items():
            assert near_ms(restored_index.due[job_id], when)


# -- defects found in the core, proven absent ------------------------------------------------------


async def test_a_step_that_fails_half_way_commits_none_of_its_effects(
    driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    create = await driver.admit("r-1")

    def failing_mark(job: Job | None, command: Command, ctx: Any) -> Any:
        if isinstance(command, MarkPublished):
            raise RuntimeError("boom after publish")
        return real_decide(job, command, ctx)

    monkeypatch.setattr(streams.core, "decide", failing_mark)
    driver.redeliver(create)

    assert driver.reasons() == ["agent_error"]
    assert driver.job(job_id_for(TENANT, "r-1")) is None
    assert driver.pending() == driver.pending(DLQ)


async def test_a_restored_timer_that_fires_early_is_not_lost(driver: Driver) -> None:
    request = JobRequest.model_validate(request_body("r-1"))
    job_id = job_id_for(TENANT, "r-1")
    at = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)  # not on a millisecond
    create = CreateJob(
        command_id="c-1",
        job_id=job_id,
        at=at,
        tenant_id=TENANT,
        fingerprint=request.fingerprint(),
        request=request,
    )
    driver.command(create)
    await driver.commit()
    job = driver.job(job_id)
    assert job is not None and job.current is not None
    number = driver.partition_of(job_id)
    # The partition moves to another worker, which restores it from the changelog.
    restored = Partition(number)
    for record in driver.committed:
        if record.topic == driver.topic(CHANGELOG) and record.key is not None:
            restored.apply_changelog([(record.key, record.value, record.headers)])
    driver.core.parts[number] = restored
    driver.consumer.highwaters[number] = 0
    timeout_at = job.current.expires_at
    assert restored.wake.due[job_id] >= timeout_at  # rounded up: never before its time
    # A timer looked at before its time (a rounded or stepped clock) looks again when it is due.
    restored.wake.set(job_id, timeout_at - timedelta(milliseconds=1))
    driver.core._fire_timers(timeout_at - timedelta(microseconds=500))
    driver.core._fire_timers(timeout_at + timedelta(seconds=1))

    timed_out = driver.job(job_id)
    assert timed_out is not None
    assert timed_out.status is JobStatus.RETRYING


def job_on(partition: int) -> str:
    return job_id_for(TENANT, request_id_on(partition, prefix="other"))


async def test_a_transaction_never_commits_after_its_twin_failed(driver: Driver) -> None:
    create = await driver.admit("r-1")
    job_id = job_id_for(TENANT, "r-1")
    number = driver.partition_of(job_id)
    core = driver.core
    producer = driver.producers[number]
    producer.fail_commits = 1
    driver.redeliver(create)  # the job is created in the open transaction
    first = core.txns[number]
    await core._flush(number, first)
    core._start_commit(number, first)  # ... which commits while its twin takes new steps
    assert core.txns[number] is not first
    cancel = CancelJob(command_id="c-1", job_id=job_id, at=datetime.now(UTC), tenant_id=TENANT)
    driver.command(cancel)
    assert core.txns[number].pending
    # Another partition flushes first in the next turn: the failed commit ends meanwhile.
    other = next(n for n in sorted(core.txns) if n != number)
    driver.command(
        CancelJob(command_id="c-2", job_id=job_on(other), at=datetime.now(UTC), tenant_id=TENANT)
    )

    await core._turn({})
    await driver.commit()

    # The cancel was applied on top of a creation that never committed: it must not commit
    # either. The partition is dropped and rebuilt from what did commit.
    assert producer.calls.count("commit") == 1
    assert number not in core.parts and number not in core.txns
    assert driver.consumer.rejoins == 1
    assert metric(driver, "cp_transactions_total", outcome="failed") == 1


async def test_a_twin_sends_nothing_until_the_commit_ahead_of_it_ended(driver: Driver) -> None:
    """The changelog keeps the order the steps were applied in, across the twin producers.

    Seen on a real broker: a producer whose batch waited (CONCURRENT_TRANSACTIONS on the
    partitions it added) let its twin's newer row land first; a restore replayed the older row
    last, revived a completed job and it completed a second time.
    """
    job = await driver.create("r-1")
    number = driver.partition_of(job.job_id)
    core = driver.core
    producer = driver.producers[number]
    release = asyncio.Event()
    producer.hold_commits = release
    attempt = job.current
    assert attempt is not None
    driver.result(
        provider_result(
            job.job_id, attempt.attempt_id, attempt.provider, attempt.model, type="started"
        )
    )
    first = core.txns[number]
    await core._flush(number, first)
    core._start_commit(number, first)
    for _ in range(100):  # the commit is under way and the broker has not answered
        if producer.calls[-1] == "commit":
            break
        await asyncio.sleep(0)
    assert producer.calls[-1] == "commit"
    calls = len(producer.calls)
    started = driver.job(job.job_id)
    assert started is not None
    complete(driver, started)  # the next step goes to the twin ...
    await core._turn({})
    assert producer.calls[calls:] == []  # ... which holds it back while the commit is open
    assert core.txns[number].records

    release.set()
    await driver.commit()
    rows = [
        decode_row(r.value or b"", job.request)
        for r in producer.sent
        if r.topic == driver.topic(CHANGELOG) and r.key == key(ROW, job.job_id)
    ]
    assert [row.status for row in rows][-2:] == [JobStatus.STARTED, JobStatus.COMPLETED]
    assert producer.calls[calls] == "begin"  # the twin began only after the commit ended


async def test_a_flush_cut_short_is_aborted_not_committed(driver: Driver) -> None:
    """Before: a stop cancelled the loop mid-send and then committed what had gone (a step's
    row without its effects, or effects without the row)."""
    create = await driver.admit("r-1")
    job_id = job_id_for(TENANT, "r-1")
    number = driver.partition_of(job_id)
    driver.redeliver(create)
    producer = driver.producers[number]
    txn = driver.core.txns[number]
    queued = len(txn.records) + 1  # and the row, queued by the flush
    assert queued > 2
    calls = len(producer.calls)
    flush = asyncio.ensure_future(driver.core._flush(number, txn))
    await asyncio.sleep(0)  # the first send went; the others wait their turn
    flush.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flush
    assert 0 < producer.calls[calls:].count("send") < queued

    await driver.core._commit_all()

    assert "commit" not in producer.calls[calls:]
    assert "abort" in producer.calls[calls:]
    assert number not in driver.core.parts  # rebuilt from the changelog when it comes back
    assert driver.consumer.rejoins == 1


async def test_stop_lets_the_turn_in_hand_finish_before_committing(driver: Driver) -> None:
    create = await driver.admit("r-1")
    job_id = job_id_for(TENANT, "r-1")
    number = driver.partition_of(job_id)
    producer = driver.producers[number]
    release = asyncio.Event()

    async def turn() -> None:
        driver.redeliver(create)
        await release.wait()  # the loop is mid-turn (a send that has not returned yet)
        await driver.core._flush(number, driver.core.txns[number])

    driver.core.task = asyncio.ensure_future(turn())
    stopping = asyncio.ensure_future(driver.core.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()
    release.set()
    await stopping

    assert "commit" in producer.calls and "abort" not in producer.calls
    committed_rows = [r for r in producer.sent if r.key == key(ROW, job_id)]
    assert committed_rows, "the step applied before the stop was committed with its row"


# -- dispatches that cannot be sent ---------------------------------------------------------------


def dispatch_topic_names(driver: Driver) -> set[str]:
    return set(driver.core.dispatch_topics.values())


async def test_a_dispatch_that_cannot_be_sent_fails_its_attempt_at_once_and_never_loops(
    driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider not routed to any more, without its dispatch topic, and an older job's retry
    still meant for it: the retry's attempt fails at once (dispatch_failed), the job falls back,
    nothing is sent to the missing topic, and nothing is logged again afterwards."""
    job = await driver.create("r-1")
    first = job.current
    assert first is not None
    driver.result(
        provider_result(
            job.job_id,
            first.attempt_id,
            first.provider,
            first.model,
            type="failed",
            error=RawProviderError(kind="simulated", code="rate_limited"),
        )
    )
    await driver.commit()
    retrying = driver.job(job.job_id)
    assert retrying is not None and retrying.retry_at is not None
    next_target = retrying.plan[0]
    gone = driver.topic(f"cp.dispatch.{first.provider}")
    driver.core.undeliverable[first.provider] = f"its dispatch topic {gone} does not exist"

    caplog.set_level(logging.WARNING, logger="streams.core")
    driver.core._fire_timers(retrying.retry_at)
    produced = await driver.commit()

    after = driver.job(job.job_id)
    assert after is not None and after.status is JobStatus.DISPATCHED
    failed = after.attempts[1]
    assert failed.provider == first.provider
    assert failed.status is AttemptStatus.FAILED
    assert failed.error is not None and failed.error.code.value == "dispatch_failed"
    assert gone in failed.error.message
    assert failed.cost is not None and failed.cost.amount == 0
    assert after.attempts[2].target == next_target
    [sent] = driver.dispatches(produced)
    assert sent.topic == driver.topic(f"cp.dispatch.{next_target.provider}")
    assert not [r for r in produced if r.topic == gone]
    kinds = [e.type for e in events(driver.sent_to(produced, EVENTS))]
    assert kinds == ["dispatched", "attempt_failed", "fallback", "dispatched"]
    assert after.outbox == []
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "dispatch cannot be sent: the attempt failed at once"
    ]

    # Later turns send and log nothing more about it: no loop.
    caplog.clear()
    driver.core._fire_timers(datetime.now(UTC))
    assert driver.dispatches(await driver.commit()) == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_job_whose_every_dispatch_is_unsendable_fails_with_a_final_response(
    driver: Driver,
) -> None:
    for provider in list(driver.core.dispatch_topics):
        driver.core.undeliverable[provider] = "no topic"
    job = await driver.create("r-1")
    assert job.status is JobStatus.FAILED
    assert all(a.error and a.error.code.value == "dispatch_failed" for a in job.attempts)
    [response] = driver.sent_to(driver.committed, RESPONSES)
    final = FinalResponse.model_validate_json(response.value or b"")
    assert final.outcome is not None and final.outcome.reason == "targets_exhausted"
    assert driver.dispatches(driver.committed) == []


async def test_a_provider_outside_the_catalogue_is_unsendable_too(driver: Driver) -> None:
    job = await driver.create("r-1")
    assert job.current is not None
    provider = job.current.provider
    del driver.core.dispatch_topics[provider]
    driver.core._fire_timers(job.current.expires_at)  # a provider cancel for it: dropped
    produced = await driver.commit()
    assert not [r for r in produced if r.topic.endswith(f"cp.dispatch.{provider}")]
    after = driver.job(job.job_id)
    assert after is not None and after.outbox == []


async def test_the_core_refuses_to_start_when_a_routable_provider_has_no_topic(
    driver: Driver,
) -> None:
    existing = dispatch_topic_names(driver) - {driver.topic("cp.dispatch.sim-fast")}
    with pytest.raises(MissingDispatchTopics) as raised:
        driver.core.check_dispatch_topics(existing)
    message = str(raised.value)
    assert "sim-fast" in message and driver.topic("cp.dispatch.sim-fast") in message
    assert "make topics" in message
    assert raised.value.missing == {"sim-fast": driver.topic("cp.dispatch.sim-fast")}


async def test_a_provider_not_routed_to_may_lack_its_topic(driver: Driver) -> None:
    existing = {t for p, t in driver.core.dispatch_topics.items() if p.startswith("sim-")}
    driver.core.check_dispatch_topics(existing)
    assert set(driver.core.undeliverable) == {"openai", "anthropic"}
    assert "make topics" in driver.core.undeliverable["openai"]


async def test_with_gathering_per_worker_the_window_follows_the_group(driver: Driver) -> None:
    """CP_FETCH_GATHER_PER_WORKER: the base window times the workers of the last assignment,
    at most 1,000 ms; without it the window stays the base one."""
    core = driver.core
    base = core.settings.fetch_gather_ms
    core.pacer = FetchPacer(driver.consumer, idle_wait_ms=100, gather_ms=base)
    core.assignor.owners = {0: "http://a", 1: "http://b", 2: "http://b", 3: "http://c"}
    core._pace_to_group()
    assert core.pacer.gather_ms == base  # off by default
    core.settings = core.settings.model_copy(update={"fetch_gather_per_worker": True})
    core._pace_to_group()
    assert core.pacer.gather_ms == base * 3
    core.assignor.owners = {n: f"http://w{n}" for n in range(40)}
    core._pace_to_group()
    assert core.pacer.gather_ms == MAX_GATHER_MS
    core.assignor.owners = {}
    core._pace_to_group()
    assert core.pacer.gather_ms == base  # no assignment yet: one worker


async def test_no_step_is_applied_between_a_revocation_and_the_next_assignment(
    driver: Driver,
) -> None:
    """What was applied commits at the revocation; a timer step after it would be read over
    HTTP and then aborted with its partition if the partition moved (zombie-reads caught one)."""
    job = await driver.create("r-revoked")
    attempt = job.current
    assert attempt is not None
    driver.consumer.highwaters[driver.partition_of(job.job_id)] = 0
    await driver.core.on_revoked()
    assert driver.core.revoked
    driver.core._fire_timers(attempt.expires_at)
    await driver.core._turn({})
    held = driver.job(job.job_id)
    assert held is not None and held.status is JobStatus.DISPATCHED, "a timer fired mid-rebalance"
    driver.core.revoked = False  # as on_assigned leaves it
    driver.core._fire_timers(attempt.expires_at)
    retrying = driver.job(job.job_id)
    assert retrying is not None and retrying.status is JobStatus.RETRYING
