"""A session deletes the topics it created: the local broker does not pile up partitions."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.integration.conftest import create_topics
from tests.support.broker import delete_topics_starting, forget_run
from tests.support.workers import wait_for

pytestmark = pytest.mark.integration


def topics(bootstrap: str) -> set[str]:
    async def run() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    return asyncio.run(run())


def test_only_the_runs_topics_are_deleted(kafka_bootstrap: str, run_id: str) -> None:
    mine = [f"{run_id}x.cleanup.a", f"{run_id}x-app-changelog"]
    other = f"{run_id}y.cleanup.kept"
    create_topics(kafka_bootstrap, [*mine, other], partitions=1)
    # The broker's metadata lists a new topic a moment after it was created.
    wait_for(lambda: set(mine) | {other} <= topics(kafka_bootstrap), timeout=30, what="new topics")

    forget_run(kafka_bootstrap, f"{run_id}x")

    wait_for(
        lambda: not set(mine) & topics(kafka_bootstrap), timeout=30, what="the run's topics gone"
    )
    assert other in topics(kafka_bootstrap)
    assert asyncio.run(delete_topics_starting(kafka_bootstrap, f"{run_id}y.")) == [other]


def test_forgetting_a_run_on_a_broker_that_is_gone_does_not_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    forget_run("127.0.0.1:1", "t-none", timeout_s=5)
    assert "could not delete the topics of run t-none" in caplog.text
