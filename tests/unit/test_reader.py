"""A reader process (`api.reader`) against a stand-in worker: its hub socket and its web port.

No broker: the stand-in hub answers view requests from a dict and sends the frames a worker sends
(`api.readframes`), so each rule of the reader is checked on its own: it serves a view it was
given, asks again after the job changed, forwards what it cannot serve (marked `Via`), stops
serving when the worker goes quiet, and exits when the worker's connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from api.links import LinkSigner
from api.reader import LEASE_S, REPORT_S, VIA, Views
from api.readframes import MAX_FRAME, frame, read_frame
from streams.placement import partition_for
from streams.settings import Settings
from tests.support.workers import free_port

KEY, TENANT = "key-r", "tenant-r"


PARTITIONS = 8


def job_on(partition: int) -> str:
    """A job id that `streams.placement` puts on `partition` of PARTITIONS."""
    return next(
        job_id
        for n in range(10_000)
        if partition_for(job_id := f"job-p{n}", PARTITIONS) == partition
    )


def view_of(job_id: str, state: str) -> tuple[str, str, str]:
    """A status view split where the signed link goes, as the worker renders it."""
    head = orjson.dumps({"job_id": job_id, "state": state})[:-1] + b',"timeline_signed":'
    return TENANT, head.decode(), "}"


@dataclass
class Hub:
    """Stands in for the worker's side of the socket (`api.readhub`)."""

    views: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    #: The reader's last reported request counts.
    counts: dict[str, int] = field(default_factory=dict)

    async def serve(self, stream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.connected.set()
        while (items := await read_frame(stream)) is not None:
            if items[0] == "m":
                self.counts = items[1]
                continue
            self.asked.append(items[1])
            view = self.views.get(items[1])
            writer.write(frame("v", items[1], *(view or (None,))))

    def send(self, *items: object) -> None:
        for writer in self.writers:
            writer.write(frame(*items))


@dataclass
class Rig:
    hub: Hub
    url: str
    process: asyncio.subprocess.Process
    forwarded: list[str]
    beating: asyncio.Task[None]


async def _beat(hub: Hub, lease_s: float = 60.0) -> None:
    """Say alive every 0.2 s, with a membership lease ending `lease_s` from then."""
    while True:
        hub.send("a", time.monotonic() + lease_s)
        await asyncio.sleep(0.2)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    hub = Hub()
    server = await asyncio.start_unix_server(hub.serve, path=tmp_path / "read.sock")
    forwarded: list[str] = []

    async def worker_answer(request: web.Request) -> web.Response:
        forwarded.append(request.path_qs)
        return web.json_response({"from": "worker", "path": request.path_qs}, status=404)

    worker = web.Application()
    worker.router.add_route("*", "/{tail:.*}", worker_answer)
    runner = web.AppRunner(worker)
    await runner.setup()
    web_port, read_port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", web_port).start()
    env = {
        **os.environ,
        "CP_DATA_DIR": str(tmp_path),
        "CP_WEB_PORT": str(web_port),
        "CP_READ_PORT": str(read_port),
        "CP_API_KEYS": f"{KEY}={TENANT}",
        "CP_LOG_FORMAT": "console",
    }
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "api.reader", env=env)
    await asyncio.wait_for(hub.connected.wait(), 30)
    beating = asyncio.create_task(_beat(hub))
    url = f"http://127.0.0.1:{read_port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            try:
                async with http.get(url + "/jobs/x"):
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
    try:
        yield Rig(hub, url, process, forwarded, beating)
    finally:
        beating.cancel()
        if process.returncode is None:
            process.kill()
            await process.wait()
        for writer in hub.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        server.close()
        await server.wait_closed()
        await runner.cleanup()


async def read(url: str, key: str = KEY) -> tuple[int, bytes, str | None]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers={"Authorization": f"Bearer {key}"}) as response,
    ):
        return response.status, await response.read(), response.headers.get("Via")


async def test_serves_the_view_it_was_given_and_asks_again_after_a_change(rig: Rig) -> None:
    rig.hub.views["job-1"] = view_of("job-1", "STARTED")
    for _ in range(3):
        status, body, via = await read(rig.url + "/jobs/job-1")
        assert (status, via) == (200, None)
        assert orjson.loads(body)["state"] == "STARTED"
    assert rig.hub.asked == ["job-1"]  # asked once, then served from the view it keeps
    link = orjson.loads(body)["timeline_signed"]
    exp = int(link.split("exp=")[1].split("&")[0])
    signer = LinkSigner.from_settings(Settings(api_keys=f"{KEY}={TENANT}"))
    signer.verify("job-1", TENANT, str(exp), link.split("sig=")[1], exp - 1)

    rig.hub.views["job-1"] = view_of("job-1", "COMPLETED")
    rig.hub.send("d", ["job-1"])
    await asyncio.sleep(0.2)
    status, body, via = await read(rig.url + "/jobs/job-1")
    assert orjson.loads(body)["state"] == "COMPLETED"
    assert rig.hub.asked == ["job-1", "job-1"]
    assert rig.forwarded == []
    await asyncio.sleep(REPORT_S + 0.3)
    assert rig.hub.counts == {"asked": 2, "served": 2}  # reported for cp_reader_reads


async def test_a_reset_forgets_every_view(rig: Rig) -> None:
    rig.hub.views["job-2"] = view_of("job-2", "ROUTED")
    await read(rig.url + "/jobs/job-2")
    rig.hub.send("r")
    await asyncio.sleep(0.2)
    await read(rig.url + "/jobs/job-2")
    assert rig.hub.asked == ["job-2", "job-2"]


async def test_forwards_what_it_cannot_serve(rig: Rig) -> None:
    rig.hub.views["job-3"] = view_of("job-3", "COMPLETED")
    # not this worker's job, another tenant's, a long-poll, no key, another route
    for path, key in [
        ("/jobs/elsewhere", KEY),
        ("/jobs/job-3", "key-unknown"),
        ("/jobs/job-3?wait=5", KEY),
        ("/jobs/job-3/timeline", KEY),
    ]:
        status, body, via = await read(rig.url + path, key)
        if key == "key-unknown":
            assert status == 401 and via is None  # refused by the reader itself
            continue
        assert (status, via) == (404, VIA)
        assert orjson.loads(body) == {"from": "worker", "path": path}
    assert rig.forwarded == ["/jobs/elsewhere", "/jobs/job-3?wait=5", "/jobs/job-3/timeline"]
    await asyncio.sleep(REPORT_S + 0.3)
    assert rig.hub.counts == {"relayed": 3}  # the 401 is refused, not relayed


async def read_with(url: str, headers: dict[str, str]) -> tuple[int, bytes, str | None]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers={"Authorization": f"Bearer {KEY}", **headers}) as response,
    ):
        return response.status, await response.read(), response.headers.get("Via")


async def test_a_job_placed_on_another_worker_goes_to_its_read_port(rig: Rig) -> None:
    """Once, marked `Via`; a read already marked goes to the worker; a read port that refuses
    the connection (its worker stopped) is passed over for the worker."""
    seen: list[tuple[str, str | None]] = []

    async def peer_answer(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.get("Via")))
        return web.json_response({"from": "peer"})

    peer = web.Application()
    peer.router.add_get("/{tail:.*}", peer_answer)
    runner = web.AppRunner(peer)
    await runner.setup()
    peer_port, closed_port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", peer_port).start()
    try:
        there = job_on(3)
        gone = job_on(5)
        rig.hub.send(
            "o",
            PARTITIONS,
            {"3": f"http://127.0.0.1:{peer_port}", "5": f"http://127.0.0.1:{closed_port}"},
        )
        await asyncio.sleep(0.2)
        status, body, via = await read(f"{rig.url}/jobs/{there}")
        assert (status, orjson.loads(body), via) == (200, {"from": "peer"}, VIA)
        assert seen == [(f"/jobs/{there}", VIA)]
        assert rig.hub.asked == [] and rig.forwarded == []

        status, _, via = await read_with(f"{rig.url}/jobs/{there}", {"Via": "1.0 proxy, " + VIA})
        assert (status, via) == (404, VIA)  # the worker's answer, not the peer's
        assert rig.forwarded == [f"/jobs/{there}"]

        status, _, via = await read(f"{rig.url}/jobs/{gone}")
        assert (status, via) == (404, VIA)
        assert rig.forwarded == [f"/jobs/{there}", f"/jobs/{gone}"]
        assert len(seen) == 1
        await asyncio.sleep(REPORT_S + 0.3)
        assert rig.hub.counts == {"passed": 1, "relayed": 2}
    finally:
        await runner.cleanup()


async def test_a_quiet_worker_is_not_answered_for(rig: Rig) -> None:
    rig.hub.views["job-4"] = view_of("job-4", "STARTED")
    assert (await read(rig.url + "/jobs/job-4"))[2] is None
    rig.beating.cancel()  # the worker paused: no frames
    await asyncio.sleep(LEASE_S + 0.3)
    status, _, via = await read(rig.url + "/jobs/job-4")
    assert (status, via) == (404, VIA)
    assert rig.forwarded == ["/jobs/job-4"]


async def test_nothing_is_served_past_the_worker_lease(rig: Rig) -> None:
    """A worker that goes on talking but whose membership lease it last told of has ended (it
    ran again after a pause past its session timeout) is not answered for either."""
    rig.hub.views["job-5"] = view_of("job-5", "STARTED")
    assert (await read(rig.url + "/jobs/job-5"))[2] is None
    rig.beating.cancel()
    rig.beating = asyncio.create_task(_beat(rig.hub, lease_s=-1.0))
    await asyncio.sleep(0.5)
    status, _, via = await read(rig.url + "/jobs/job-5")
    assert (status, via) == (404, VIA)
    assert rig.forwarded == ["/jobs/job-5"]
    rig.beating.cancel()
    rig.beating = asyncio.create_task(_beat(rig.hub))  # confirmed again
    await asyncio.sleep(0.5)
    status, _, via = await read(rig.url + "/jobs/job-5")
    assert (status, via) == (200, None)


async def test_exits_when_the_worker_connection_ends(rig: Rig) -> None:
    for writer in rig.hub.writers:
        writer.close()
        await writer.wait_closed()
    assert await asyncio.wait_for(rig.process.wait(), 10) == 0


def test_views_follow_the_frames_in_order() -> None:
    views = Views(capacity=2)
    views.apply(["v", "a", TENANT, "{", "}"])
    views.apply(["d", ["a"]])
    assert views.entries == {}
    views.apply(["v", "a", TENANT, "{", "}"])
    views.apply(["v", "b", TENANT, "{", "}"])
    views.apply(["v", "c", TENANT, "{", "}"])
    assert list(views.entries) == ["b", "c"]  # the oldest left
    views.apply(["v", "d", None])
    assert "d" not in views.entries
    with pytest.raises(ValueError, match="unexpected frame"):
        views.apply(["x"])
    with pytest.raises(ValueError, match="unexpected frame"):
        views.apply(["a"])  # an alive frame says until when
    assert not views.fresh()
    views.apply(["a", time.monotonic() + 5])
    assert views.fresh()
    views.apply(["a", time.monotonic() - 1])
    assert not views.fresh()


async def test_frames_round_trip_and_refuse_garbage() -> None:
    stream = asyncio.StreamReader()
    stream.feed_data(frame("d", ["a", "b"]) + frame("a"))
    stream.feed_eof()
    assert await read_frame(stream) == ["d", ["a", "b"]]
    assert await read_frame(stream) == ["a"]
    assert await read_frame(stream) is None
    big = asyncio.StreamReader()
    big.feed_data((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ValueError, match="frame of"):
        await read_frame(big)
