"""bench/OpenLoop.java, the open-loop generator of `bench.reads`, against a server in this test.

It offers its rate on schedule, counts what is not a 200, and times a slow answer from when the
request was due, so that a server's stall is charged to it; `bench.reads.offered` reads its output.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from bench.reads import Reads, offered
from tests.support.workers import free_port

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="needs java")


@dataclass
class Server:
    url: str
    paths: list[str] = field(default_factory=list)
    status: int = 200
    stall_s: float = 0.0


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    port = free_port()
    state = Server(url=f"http://127.0.0.1:{port}")

    async def answer(request: web.Request) -> web.Response:
        state.paths.append(request.path)
        if state.stall_s:
            stall, state.stall_s = state.stall_s, 0.0
            await asyncio.sleep(stall)  # one stall: the requests due meanwhile wait
        return web.Response(status=state.status, body=b'{"state":"COMPLETED"}')

    app = web.Application()
    app.router.add_get("/jobs/{job_id}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield state
    await runner.cleanup()


async def offer(server: Server, rate: float) -> Reads:
    args = argparse.Namespace(offered=rate, seconds=1.0, connections=1)
    return await offered("test", server.url, pid=os.getpid(), ids=["a", "b"], args=args)


async def test_offers_the_rate_and_reads_back_its_percentiles(server: Server) -> None:
    reads = await offer(server, 200)
    assert 190 <= reads.rps <= 210
    assert 380 <= len(server.paths) <= 420  # a warm-up second, then the measured one
    assert set(server.paths) == {"/jobs/a", "/jobs/b"}
    assert reads.failed == 0
    assert set(reads.pct) == {50, 90, 99, 99.9}
    assert 0 < reads.pct[50] <= reads.pct[99] <= reads.pct[99.9] < 100
    assert reads.from_send.startswith("from send: p50 ")


async def test_answers_other_than_200_are_counted(server: Server) -> None:
    server.status = 503
    reads = await offer(server, 100)
    assert reads.failed == len(server.paths)


async def test_a_stall_is_charged_to_the_requests_due_meanwhile(server: Server) -> None:
    """One connection, and its first answer stalls 1.3 s: the first 300 ms of the measured second
    (the first second warms up) wait for the connection, and their latency counts from when they
    were due, not from their late send."""
    server.stall_s = 1.3
    reads = await offer(server, 100)
    assert reads.pct[99] > 200, reads.pct
    p99_from_send = float(reads.from_send.split("p99 ")[1].split(" ms")[0])
    assert p99_from_send < reads.pct[99]
