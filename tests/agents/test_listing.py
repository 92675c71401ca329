"""The job core keeps each partition's listing index; a restore rebuilds it from row headers."""

from __future__ import annotations

from datetime import timedelta

from domain.lifecycle import JobStatus
from domain.messages import Output
from streams.partition import Partition, page_of
from tables.jobs import ROW, encode_row
from tables.listing import Filter, micros, states_for
from tests.agents.conftest import TENANT, Driver, provider_result, request_id_on

CHANGELOG = "{app_id}-jobs-changelog"


async def _complete(driver: Driver, job_id: str) -> None:
    job = driver.job(job_id)
    assert job is not None and job.current is not None
    attempt = job.current
    driver.result(
        provider_result(
            job_id,
            attempt.attempt_id,
            attempt.provider,
            attempt.model,
            output=Output(text="Hello.", finish_reason="stop"),
            raw_usage={"input_tokens": 10, "output_tokens": 3},
        )
    )
    await driver.commit()


async def test_the_core_indexes_jobs_as_they_change_and_forgets_retired_ones(
    driver: Driver,
) -> None:
    number = 2
    first = await driver.create(request_id_on(number, prefix="first"))
    second = await driver.create(request_id_on(number, prefix="second"))
    part = driver.core.parts[number]
    assert part.index.page(TENANT, Filter(), None, 10)[0] == [
        (micros(second.created_at), second.job_id),
        (micros(first.created_at), first.job_id),
    ]
    await _complete(driver, first.job_id)
    done = Filter(states=states_for("terminal"))
    assert [p[1] for p in part.index.page(TENANT, done, None, 10)[0]] == [first.job_id]

    items, more, missing = page_of(
        driver.core.parts, range(8), tenant=TENANT, where=Filter(), before=None, limit=1
    )
    assert (more, missing) == (True, [])
    [(position, summary)] = items
    assert position[1] == second.job_id
    assert summary["request_id"] == second.request_id and summary["state"] == "DISPATCHED"
    assert summary["links"]["self"] == f"/jobs/{second.job_id}"
    items, more, _ = page_of(
        driver.core.parts, range(8), tenant=TENANT, where=Filter(), before=position, limit=5
    )
    [(_, finished)] = items
    assert not more
    assert finished["job_id"] == first.job_id and finished["state"] == "COMPLETED"
    assert finished["terminal"] is True and finished["provider"] and finished["model"]
    assert finished["created_at"].endswith("Z")

    # Another tenant sees nothing; a partition not held here is named, never skipped.
    assert (
        page_of(driver.core.parts, [number], tenant="other", where=Filter(), before=None, limit=5)[
            0
        ]
        == []
    )
    assert page_of({}, [number], tenant=TENANT, where=Filter(), before=None, limit=5)[2] == [number]

    done_job = driver.job(first.job_id)
    assert done_job is not None
    driver.core._fire_timers(done_job.updated_at + driver.core.retention + timedelta(seconds=1))
    await driver.commit()
    assert [p[1] for p in part.index.page(TENANT, Filter(), None, 10)[0]] == [second.job_id]


async def test_a_restored_partition_has_the_same_index_without_decoding_a_job(
    driver: Driver,
) -> None:
    number = 5
    live = await driver.create(request_id_on(number, prefix="live"))
    finished = await driver.create(request_id_on(number, prefix="finished"))
    await _complete(driver, finished.job_id)
    held = driver.core.parts[number]

    restored = Partition(number)
    for record in driver.committed:
        if record.topic == driver.topic(CHANGELOG) and record.partition == number:
            assert record.key is not None
            restored.apply_changelog([(record.key, record.value, record.headers)])

    assert restored.index.listed == held.index.listed
    assert restored.index.by_tenant == held.index.by_tenant
    assert restored.jobs == {}  # built from headers alone
    assert held.index.listed[finished.job_id][2] == JobStatus.COMPLETED.value
    assert held.index.listed[live.job_id][2] == JobStatus.DISPATCHED.value


async def test_a_row_without_listing_headers_is_indexed_from_its_json(driver: Driver) -> None:
    job = await driver.create("old-row")
    part = Partition(0)
    part.apply_changelog([(f"{ROW}:{job.job_id}".encode(), encode_row(job), [])])
    assert part.index.listed == {job.job_id: (TENANT, micros(job.created_at), job.status.value)}
    part.apply_changelog([(f"{ROW}:{job.job_id}".encode(), None, [])])
    assert part.index.listed == {}
