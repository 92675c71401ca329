"""The job core queues a job's completion webhook in its final step's transaction."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from domain.commands import RecordWebhook
from domain.lifecycle import JobStatus
from domain.messages import JobEvent, Output, WebhookDelivery
from streams.settings import Settings
from streams.txn import Record
from tests.agents.conftest import ROOT, Driver, provider_result, request_body, request_id_on

URL = "https://hooks.example.com/jobs"


@pytest.fixture
def settings() -> Settings:
    return Settings(
        app_id="agents",
        topic_prefix="agents-tier.",
        topics_file=ROOT / "topics.yaml",
        catalogue_file=ROOT / "config" / "catalogue.yaml",
        policy_file=ROOT / "config" / "policy.yaml",
        webhook_allowed_hosts="*.example.com",
    )


async def finish(driver: Driver, request_id: str, **fields: Any) -> list[Record]:
    job = await driver.create(request_id, **fields)
    attempt = job.current
    assert attempt is not None
    driver.result(
        provider_result(
            job.job_id,
            attempt.attempt_id,
            attempt.provider,
            attempt.model,
            output=Output(text="Hello.", finish_reason="stop"),
        )
    )
    return await driver.commit()


async def test_a_finishing_job_with_a_callback_queues_one_delivery_in_its_transaction(
    driver: Driver,
) -> None:
    produced = await finish(driver, request_id_on(3), callback_url=URL)
    [record] = driver.sent_to(produced, "cp.webhooks")
    [response] = driver.sent_to(produced, "cp.responses")
    delivery = WebhookDelivery.model_validate_json(record.value or b"")
    job = driver.job(delivery.job_id)
    assert job is not None and job.status is JobStatus.COMPLETED
    assert record.key == job.job_id.encode()
    assert delivery.delivery_id == f"whd_{job.job_id}"
    assert delivery.callback_url == URL and delivery.tenant_id == job.tenant_id
    assert delivery.response == job.final
    assert response.value == delivery.response.model_dump_json().encode()
    # One commit of the partition's transaction carried both.
    producer = driver.producers[driver.partition_of(job.job_id)]
    assert producer.calls.count("commit") == 2 and producer.calls[-1] == "commit"
    assert job.outbox == []

    # An attempt reported by the sender becomes a timeline event of the finished job.
    driver.command(
        RecordWebhook(
            command_id="webhook:1",
            job_id=job.job_id,
            at=datetime.now(UTC),
            delivery_id=delivery.delivery_id,
            attempt=1,
            outcome="delivered",
            status_code=200,
            latency_ms=4,
        )
    )
    [event] = [JobEvent.model_validate_json(r.value or b"") for r in driver.pending("cp.events")]
    assert (event.type, event.data["status_code"]) == ("webhook_delivered", 200)
    assert driver.dead() == []


async def test_a_finishing_job_without_a_callback_queues_none(driver: Driver) -> None:
    produced = await finish(driver, request_id_on(5))
    assert driver.sent_to(produced, "cp.webhooks") == []
    assert len(driver.sent_to(produced, "cp.responses")) == 1


async def test_a_callback_the_allow_list_refuses_is_dead_lettered_at_intake(
    driver: Driver,
) -> None:
    driver.intake(request_body("r-bad", callback_url="https://internal.corp/x"))
    [letter] = driver.dead()
    assert letter.reason == "callback_url_refused"
    assert "CP_WEBHOOK_ALLOWED_HOSTS" in letter.detail
    assert driver.pending("cp.commands") == []
