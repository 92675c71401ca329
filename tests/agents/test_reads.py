"""What reads see of the job core: kept status views, and a turn that lets the loop answer."""

from __future__ import annotations

import asyncio
import time

from aiokafka import TopicPartition

from domain.lifecycle import JobStatus
from streams.partition import ViewCache
from tests.agents.conftest import (
    TENANT,
    Driver,
    as_bytes,
    provider_result,
    request_body,
    request_id_on,
)


def test_the_view_cache_drops_the_least_recently_read_first() -> None:
    views = ViewCache(capacity=2)
    views.put("a", 1)
    views.put("b", 2)
    assert views.get("a") == 1  # a is now the most recent
    views.put("c", 3)
    assert (views.get("a"), views.get("b"), views.get("c")) == (1, None, 3)
    views.drop("a")
    assert views.get("a") is None


async def test_every_step_drops_the_jobs_kept_view(driver: Driver) -> None:
    job = await driver.create(request_id_on(3))
    part = driver.part(job.job_id)
    part.views.put(job.job_id, (TENANT, b"dispatched", b""))
    attempt = job.current
    assert attempt is not None
    driver.result(
        provider_result(
            job.job_id, attempt.attempt_id, attempt.provider, attempt.model, type="started"
        )
    )
    stored = driver.job(job.job_id)
    assert stored is not None and stored.status is JobStatus.STARTED
    assert part.views.get(job.job_id) is None, "a read after the step must render the new state"

    # A view of another job of the partition stays.
    other = await driver.create(request_id_on(3, prefix="other"))
    part.views.put(other.job_id, (TENANT, b"kept", b""))
    part.views.put(job.job_id, (TENANT, b"started", b""))
    driver.result(
        provider_result(
            job.job_id,
            attempt.attempt_id,
            attempt.provider,
            attempt.model,
            raw_usage={"input_tokens": 1, "output_tokens": 1},
        )
    )
    done = driver.job(job.job_id)
    assert done is not None and done.status is JobStatus.COMPLETED
    assert part.views.get(job.job_id) is None
    assert part.views.get(other.job_id) == (TENANT, b"kept", b"")


async def test_a_long_turn_lets_the_event_loop_run_between_slices(driver: Driver) -> None:
    """Before: a turn applied its whole batch without yielding, and reads waited it out."""
    intake = TopicPartition(driver.topic("cp.intake"), 0)
    records = [
        driver.record("cp.intake", 0, as_bytes(request_body(f"slice-{n}"))) for n in range(400)
    ]
    driver.core.turn_slice_s = 0.001
    ticks: list[float] = []
    stop = asyncio.Event()

    async def reader() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            await asyncio.sleep(0)

    task = asyncio.create_task(reader())
    await asyncio.sleep(0)
    started = time.perf_counter()
    await driver.core._turn({intake: records})
    ended = time.perf_counter()
    stop.set()
    await task
    during = [t for t in ticks if started < t < ended]
    assert len(during) >= 3, (len(during), ended - started)
    # Every record was applied: one create command per request.
    await driver.commit()
    commands = driver.topic("cp.commands")
    sent = [r for p in driver.producers.values() for r in p.sent if r.topic == commands]
    assert len(sent) == 400


async def test_a_long_poll_wakes_when_its_partition_leaves_the_worker(driver: Driver) -> None:
    """A long-poll waits for the final step; if the partition moves it must look again at once."""
    job = await driver.create(request_id_on(5))
    other = await driver.create(request_id_on(6))
    waiting = asyncio.create_task(driver.core.wait_final(job.job_id, 30.0))
    staying = asyncio.create_task(driver.core.wait_final(other.job_id, 30.0))
    await asyncio.sleep(0)
    await driver.core._drop(5)
    await asyncio.wait_for(waiting, 1.0)
    assert not staying.done(), "a long-poll of a partition still held keeps waiting"
    staying.cancel()
