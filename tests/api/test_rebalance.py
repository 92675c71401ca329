"""GET /jobs/{id} through a rebalance: the same answer on every worker, or 503, never a wrong 404.

Requirement (API issue): "with two or more workers, a GET on any of them returns the same answer
(routed to the owner); during a rebalance the answer is `503` with `Retry-After`, never a wrong
`404`."

The module builds a stack of its own (its membership changes): one control-plane worker `cp-1`
holding every partition, with COMPLETED jobs. While pollers read every job continuously on cp-1
(and on cp-2 once it answers /healthz), a second worker `cp-2` joins the group (partitions move
to it), both become ready, then cp-2 leaves gracefully (partitions move back) and cp-1 becomes
ready again. Every answer collected during the churn must be a 200 with the unchanged status body
or a 503 problem with Retry-After. Connection errors to cp-2 while it starts or stops are not
answers: they are counted apart.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.api.conftest import ApiStack, bearer, create, job_request, wait_state
from tests.support.stack import Stack, new_stack
from tests.support.workers import Worker, free_port

pytestmark = pytest.mark.integration

JOBS = 24
PROBLEM_TYPE = "application/problem+json"
#: How long to keep polling once both workers are ready, and once cp-1 is ready again.
SPLIT_HOLD_S = 4.0
SETTLE_HOLD_S = 3.0
#: A GET that takes longer than this is recorded as a timeout (not an answer).
REQUEST_TIMEOUT_S = 10.0


@dataclass
class RebalanceStack:
    stack: Stack
    cp1: Worker
    cp2_port: int
    #: cp-1's read port (`CP_READ_PORT`): its readers must answer through the churn as cp-1 does.
    read1: str = ""

    @property
    def cp2_url(self) -> str:
        return f"http://127.0.0.1:{self.cp2_port}"

    @property
    def api(self) -> ApiStack:
        """The view the shared helpers (`create`, `wait_state`) take: they talk to cp-1."""
        return ApiStack(stack=self.stack, cp1=self.cp1.url, cp2=self.cp2_url)


@pytest.fixture(scope="module")
def rebal(
    kafka_bootstrap: str, run_id: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RebalanceStack]:
    root: Path = tmp_path_factory.mktemp("rebal-stack")
    stack = new_stack(kafka_bootstrap, run_id, "rebal", root)
    stack.env["CP_API_KEYS"] = "key-a=tenant-a"
    try:
        stack.start_providers()
        read_port = free_port()
        cp1 = stack.start_cp("cp-1", free_port(), env={"CP_READ_PORT": str(read_port)})
        yield RebalanceStack(
            stack=stack, cp1=cp1, cp2_port=free_port(), read1=f"http://127.0.0.1:{read_port}"
        )
    finally:
        stack.stop()


@dataclass
class Answer:
    at: float  # seconds since the churn began
    wall: str  # UTC time of the answer, to find it in the worker logs
    phase: str
    worker: str
    job_id: str
    status: int
    content_type: str
    retry_after: str | None
    body: Any


@dataclass
class Churn:
    """What the pollers saw, and when the membership changed (seconds since the churn began)."""

    t0: float = field(default_factory=time.monotonic)
    phase: str = "cp-1 alone"
    marks: list[tuple[float, str]] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    no_answer: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    cp2_up: bool = False
    cp2_done: bool = False
    done: bool = False

    def now(self) -> float:
        return time.monotonic() - self.t0

    def mark(self, phase: str) -> None:
        self.phase = phase
        wall = datetime.now(UTC).isoformat(timespec="milliseconds")
        self.marks.append((self.now(), f"{phase} [{wall}]"))


async def read(
    http: aiohttp.ClientSession, churn: Churn, worker: str, url: str, job_id: str
) -> None:
    phase = churn.phase
    try:
        async with http.get(f"{url}/jobs/{job_id}", headers=bearer("key-a")) as response:
            raw = await response.read()
            try:
                body: Any = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = raw.decode(errors="replace")
            if isinstance(body, dict) and isinstance(body.get("links"), dict):
                # A signed link carries its expiry: fresh on every answer, by design.
                body["links"].pop("timeline_signed", None)
            churn.answers.append(
                Answer(
                    at=churn.now(),
                    wall=datetime.now(UTC).isoformat(timespec="milliseconds"),
                    phase=phase,
                    worker=worker,
                    job_id=job_id,
                    status=response.status,
                    content_type=response.content_type,
                    retry_after=response.headers.get("Retry-After"),
                    body=body,
                )
            )
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        churn.no_answer[(worker, phase, exc.__class__.__name__)] += 1


async def poll(
    http: aiohttp.ClientSession,
    churn: Churn,
    worker: str,
    url: str,
    job_ids: list[str],
    active: Callable[[], bool],
) -> None:
    """Read every job on `url`, round after round, while `active()` holds."""
    while not churn.done and active():
        await asyncio.gather(*(read(http, churn, worker, url, job_id) for job_id in job_ids))
        await asyncio.sleep(0.05)


async def poll_cp2(http: aiohttp.ClientSession, churn: Churn, url: str, job_ids: list[str]) -> None:
    """Poll cp-2 from the moment it answers /healthz until it has stopped."""
    while not churn.done and not churn.cp2_up:
        try:
            async with http.get(url + "/healthz", timeout=aiohttp.ClientTimeout(total=1)) as r:
                churn.cp2_up = r.status == 200
        except (aiohttp.ClientConnectionError, TimeoutError):
            pass
        if not churn.cp2_up:
            await asyncio.sleep(0.1)
    if churn.cp2_up:
        churn.mark("cp-2 answers /healthz")
    await poll(http, churn, "cp-2", url, job_ids, lambda: not churn.cp2_done)


async def readyz(http: aiohttp.ClientSession, url: str) -> int:
    try:
        async with http.get(url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
            return r.status
    except (aiohttp.ClientConnectionError, TimeoutError):
        return 0


async def wait_ready(
    http: aiohttp.ClientSession, urls: list[str], *, timeout: float, stable_polls: int = 3
) -> None:
    """Wait until every url answers /readyz 200 `stable_polls` times in a row."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    streak = 0
    last: list[int] = []
    while loop.time() < deadline:
        last = [await readyz(http, url) for url in urls]
        streak = streak + 1 if all(status == 200 for status in last) else 0
        if streak >= stable_polls:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{urls} never all ready: /readyz answered {last}")


def describe(answer: Answer, churn: Churn) -> str:
    marks = ", ".join(f"{at:.2f}s {phase}" for at, phase in churn.marks)
    return (
        f"{answer.worker} GET /jobs/{answer.job_id} at {answer.at:.2f}s = {answer.wall} "
        f"({answer.phase}) -> "
        f"{answer.status} {answer.content_type} Retry-After={answer.retry_after} "
        f"body={answer.body!r}\n  timeline: {marks}"
    )


async def test_get_during_rebalance_is_200_or_503_never_404(
    rebal: RebalanceStack, record_property: Callable[[str, object], None]
) -> None:
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        api = rebal.api
        tag = uuid.uuid4().hex[:8]
        job_ids = list(
            await asyncio.gather(
                *(
                    create(http, api, job_request(f"rebal-{tag}-{i}", {"sim-cheap": ["ok"]}))
                    for i in range(JOBS)
                )
            )
        )
        bodies = await asyncio.gather(
            *(wait_state(http, api, job_id, {"COMPLETED"}) for job_id in job_ids)
        )
        for body in bodies:
            body["links"].pop("timeline_signed", None)  # fresh on every answer (its expiry)
        before = dict(zip(job_ids, bodies, strict=True))

        churn = Churn()
        churn.mark("cp-1 alone")
        pollers = [
            asyncio.create_task(poll(http, churn, "cp-1", rebal.cp1.url, job_ids, lambda: True)),
            asyncio.create_task(
                poll(http, churn, "cp-1 read port", rebal.read1, job_ids, lambda: True)
            ),
            asyncio.create_task(poll_cp2(http, churn, rebal.cp2_url, job_ids)),
        ]
        cp2: Worker | None = None
        try:
            await asyncio.sleep(0.5)
            churn.mark("cp-2 starting")
            cp2 = await asyncio.to_thread(rebal.stack.start_cp, "cp-2", rebal.cp2_port)
            churn.mark("cp-2 /readyz 200")
            await wait_ready(http, [rebal.cp1.url, cp2.url], timeout=60)
            churn.mark("both ready")
            await asyncio.sleep(SPLIT_HOLD_S)
            churn.mark("cp-2 stopping (SIGTERM)")
            code = await asyncio.to_thread(cp2.stop, 30)
            churn.cp2_done = True
            churn.mark(f"cp-2 exited ({code})")
            await wait_ready(http, [rebal.cp1.url], timeout=60)
            churn.mark("cp-1 ready again")
            await asyncio.sleep(SETTLE_HOLD_S)
            churn.mark("end")
        finally:
            churn.done = True
            await asyncio.gather(*pollers, return_exceptions=True)
            if cp2 is not None:
                await asyncio.to_thread(cp2.stop, 30)

    counts = Counter(a.status for a in churn.answers)
    by_worker = Counter((a.worker, a.status) for a in churn.answers)
    no_answer = sum(churn.no_answer.values())
    summary = (
        f"answers={len(churn.answers)} 200={counts[200]} 503={counts[503]} "
        f"other={sum(n for s, n in counts.items() if s not in (200, 503))} "
        f"by worker={dict(sorted(by_worker.items()))} no-answer={no_answer} "
        f"{dict(churn.no_answer)} runtime={time.monotonic() - started:.1f}s\n"
        f"timeline: " + ", ".join(f"{at:.2f}s {phase}" for at, phase in churn.marks)
    )
    print(summary)
    record_property("answers_200", counts[200])
    record_property("answers_503", counts[503])
    record_property("answers_by_worker", dict(by_worker))
    record_property("no_answer", no_answer)

    wrong = [a for a in churn.answers if a.status not in (200, 503)]
    groups: dict[tuple[str, str, int], list[float]] = {}
    for answer in wrong:
        groups.setdefault((answer.worker, answer.phase, answer.status), []).append(answer.at)
    grouped = "; ".join(
        f"{worker} {status} x{len(ats)} in [{min(ats):.2f}s, {max(ats):.2f}s] ({phase})"
        for (worker, phase, status), ats in sorted(groups.items())
    )
    for answer in wrong[:10]:
        print("WRONG ANSWER:", describe(answer, churn))
    assert not wrong, (
        f"{len(wrong)} answers neither 200 nor 503: {grouped}\nfirst: {describe(wrong[0], churn)}"
    )

    bad_503 = [
        a
        for a in churn.answers
        if a.status == 503 and (a.content_type != PROBLEM_TYPE or not a.retry_after)
    ]
    assert not bad_503, f"503 without problem+json/Retry-After: {describe(bad_503[0], churn)}"

    changed = [a for a in churn.answers if a.status == 200 and a.body != before[a.job_id]]
    for answer in changed[:5]:
        print("CHANGED BODY:", describe(answer, churn), "\n  before:", before[answer.job_id])
    assert not changed, f"200 with another body than before: {describe(changed[0], churn)}"
    assert all(a.body["state"] == "COMPLETED" for a in churn.answers if a.status == 200)

    assert churn.cp2_up, "cp-2 never answered /healthz"
    assert by_worker[("cp-2", 200)] > 0, f"cp-2 never served a 200 while in the group: {summary}"
    assert by_worker[("cp-1", 200)] > 0, summary
    assert by_worker[("cp-1 read port", 200)] > 0, summary
    # cp-1 and its readers are up throughout: every request to them gets an answer.
    silent = {k: n for k, n in churn.no_answer.items() if k[0] != "cp-2"}
    assert not silent, f"cp-1 did not answer: {silent}"


async def test_listing_during_rebalance_is_complete_or_503_never_a_gap(
    rebal: RebalanceStack,
) -> None:
    """`GET /jobs` on cp-1 while cp-2 joins and leaves: every 200 lists every job of the tenant
    (across both workers while they split the partitions); otherwise a 503 problem naming the
    missing partitions, with Retry-After."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        api = rebal.api
        tag = uuid.uuid4().hex[:8]
        job_ids = await asyncio.gather(
            *(
                create(http, api, job_request(f"rebal-list-{tag}-{i}", {"sim-cheap": ["ok"]}))
                for i in range(JOBS)
            )
        )
        await asyncio.gather(*(wait_state(http, api, job_id, {"COMPLETED"}) for job_id in job_ids))
        async with http.get(
            rebal.cp1.url + "/jobs", params={"limit": "200"}, headers=bearer("key-a")
        ) as r:
            assert r.status == 200
            expected = {item["job_id"] for item in (await r.json())["items"]}
        assert set(job_ids) <= expected and len(expected) < 200

        answers: list[tuple[str, int, Any, str | None]] = []
        done = False

        async def lister() -> None:
            while not done:
                for worker, url in (("cp-1", rebal.cp1.url), ("cp-2", rebal.cp2_url)):
                    try:
                        async with http.get(
                            url + "/jobs", params={"limit": "200"}, headers=bearer("key-a")
                        ) as r:
                            body = orjson.loads(await r.read())
                            answers.append((worker, r.status, body, r.headers.get("Retry-After")))
                    except (aiohttp.ClientConnectionError, TimeoutError):
                        pass  # cp-2 not up yet, or gone
                await asyncio.sleep(0.05)

        task = asyncio.create_task(lister())
        cp2: Worker | None = None
        try:
            cp2 = await asyncio.to_thread(rebal.stack.start_cp, "cp-2", rebal.cp2_port)
            await wait_ready(http, [rebal.cp1.url, cp2.url], timeout=60)
            await asyncio.sleep(SPLIT_HOLD_S)
            split = len(answers)
            await asyncio.to_thread(cp2.stop, 30)
            await wait_ready(http, [rebal.cp1.url], timeout=60)
            await asyncio.sleep(SETTLE_HOLD_S)
        finally:
            done = True
            await asyncio.gather(task, return_exceptions=True)
            if cp2 is not None:
                await asyncio.to_thread(cp2.stop, 30)

    statuses = Counter((worker, status) for worker, status, _, _ in answers)
    assert {status for _, status in statuses} <= {200, 503}, statuses
    for worker, status, body, retry_after in answers:
        if status == 200:
            assert {item["job_id"] for item in body["items"]} == expected, (worker, body)
        else:
            assert retry_after and body["type"].endswith("unavailable"), body
            assert body.get("missing_partitions") or "shutting down" in body["detail"], body
    assert statuses[("cp-1", 200)] > 0 and statuses[("cp-2", 200)] > 0, statuses
    assert any(status == 200 for _, status, _, _ in answers[:split]), statuses
