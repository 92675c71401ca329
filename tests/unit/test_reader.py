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

    async def worker_answer(request: web.Request) -> web.StreamResponse:
        forwarded.append(request.path_qs)
        if request.path == "/echo":
            body = (await request.read()).decode()
            return web.json_response({"method": request.method, "body": body}, status=201)
        if request.path == "/stream":  # an answer of unknown length, written as it comes
            response = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await response.prepare(request)
            for part in (b"one,", b"two,", b"three"):
                await response.write(part)
                await asyncio.sleep(0.01)
            await response.write_eof()
            return response
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
    """Once, marked `Via`, on a kept-alive connection (one the peer closed while idle is
    replaced); a read already marked goes to the worker; a read port that refuses the
    connection (its worker stopped) is passed over for the worker."""
    seen: list[tuple[str, str | None]] = []
    sockets: list[object] = []

    async def peer_answer(request: web.Request) -> web.StreamResponse:
        seen.append((request.path, request.headers.get("Via")))
        sockets.append(request.transport.get_extra_info("peername") if request.transport else None)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)  # chunked: the reader answers with the whole length
        for part in (b'{"from":', b'"peer"}'):
            await response.write(part)
        await response.write_eof()
        return response

    peer = web.Application()
    peer.router.add_get("/{tail:.*}", peer_answer)
    runner = web.AppRunner(peer, keepalive_timeout=0.3)
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
        assert (await read(f"{rig.url}/jobs/{there}"))[0] == 200
        assert sockets[1] == sockets[0]  # the same connection, kept alive
        await asyncio.sleep(0.8)  # the peer closes it, idle
        assert (await read(f"{rig.url}/jobs/{there}"))[:2] == (200, b'{"from":"peer"}')
        assert sockets[2] != sockets[0] and len(seen) == 3
        seen.clear()

        status, _, via = await read_with(f"{rig.url}/jobs/{there}", {"Via": "1.0 proxy, " + VIA})
        assert (status, via) == (404, VIA)  # the worker's answer, not the peer's
        assert rig.forwarded == [f"/jobs/{there}"]

        status, _, via = await read(f"{rig.url}/jobs/{gone}")
        assert (status, via) == (404, VIA)
        assert rig.forwarded == [f"/jobs/{there}", f"/jobs/{gone}"]
        assert seen == []  # neither went to the peer
        await asyncio.sleep(REPORT_S + 0.3)
        assert rig.hub.counts == {"passed": 3, "relayed": 2}
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


# -- HTTP on the read port (api.readhttp) --------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def answer_from(stream: asyncio.StreamReader, *, head: bool = False) -> Answer:
    """One HTTP/1.1 answer off a raw connection: by length, chunked, or up to the close."""
    lines = (await stream.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {
        name.lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:] if line)
    }
    if head or status < 200 or status in (204, 304):
        return Answer(status, headers, b"")
    if "content-length" in headers:
        return Answer(status, headers, await stream.readexactly(int(headers["content-length"])))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await stream.readline()).strip(), 16):
            body += (await stream.readexactly(size + 2))[:-2]
        await stream.readline()
        return Answer(status, headers, body)
    return Answer(status, headers, await stream.read())


async def raw(rig: Rig, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = rig.url.removeprefix("http://").split(":")
    stream, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    return stream, writer


def get(path: str, *extra: str, version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}", "Host: reader", f"Authorization: Bearer {KEY}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_pipelined_reads_are_answered_in_the_order_they_came(rig: Rig) -> None:
    """A served read behind a relayed one waits for it: answers leave in request order."""
    rig.hub.views["job-6"] = view_of("job-6", "STARTED")
    await read(rig.url + "/jobs/job-6")  # held from now on
    stream, writer = await raw(
        rig, get("/jobs/job-6") + get("/jobs/elsewhere") + get("/jobs/job-6") + get("/echo")
    )
    try:
        answers = [await answer_from(stream) for _ in range(4)]
    finally:
        writer.close()
    assert [a.status for a in answers] == [200, 404, 200, 201]
    assert orjson.loads(answers[0].body)["state"] == "STARTED"
    assert orjson.loads(answers[1].body)["path"] == "/jobs/elsewhere"
    assert answers[1].headers["via"] == VIA and "via" not in answers[2].headers
    assert all("date" in a.headers for a in answers)
    assert rig.forwarded == ["/jobs/elsewhere", "/echo"]


async def test_bodies_are_relayed_whole_and_answers_streamed_as_they_come(rig: Rig) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(rig.url + "/echo", data=b"x" * 100_000) as response,
    ):
        assert response.status == 201
        assert await response.json() == {"method": "POST", "body": "x" * 100_000}

    stream, writer = await raw(rig, get("/stream"))  # HTTP/1.1: chunked, and kept alive
    answer = await answer_from(stream)
    assert answer.headers["transfer-encoding"] == "chunked"
    assert answer.body == b"one,two,three"
    writer.write(get("/stream", "Connection: close"))
    assert (await answer_from(stream)).body == b"one,two,three"
    assert await stream.read() == b""  # closed as asked
    writer.close()

    stream, writer = await raw(rig, get("/stream", version="1.0"))  # HTTP/1.0: up to the close
    answer = await answer_from(stream)
    assert "transfer-encoding" not in answer.headers and answer.headers["connection"] == "close"
    assert answer.body == b"one,two,three"
    writer.close()

    stream, writer = await raw(rig, get("/jobs/elsewhere").replace(b"GET", b"HEAD", 1))
    answer = await answer_from(stream, head=True)
    assert answer.status == 404 and int(answer.headers["content-length"]) > 0
    writer.write(get("/echo"))
    assert (await answer_from(stream)).status == 201  # no body was sent for the HEAD
    writer.close()


async def test_what_is_not_a_read_it_can_take_gets_a_clear_answer(rig: Rig) -> None:
    """Bytes that are not HTTP: 400 and a close. A body over the request limit: 413 before it
    is sent. `Expect: 100-continue`: a 100, then the answer. An upgrade: answered, then closed."""
    stream, writer = await raw(rig, b"\x16\x03\x01 not http\r\n\r\n")
    answer = await answer_from(stream)
    assert answer.status == 400 and answer.headers["content-type"] == "application/problem+json"
    assert orjson.loads(answer.body)["type"].endswith("/bad-request")
    assert await stream.read() == b""
    writer.close()

    too_big = get("/echo").replace(b"GET", b"POST", 1)[:-2] + b"Content-Length: 5000000\r\n\r\n"
    stream, writer = await raw(rig, too_big)
    answer = await answer_from(stream)
    assert answer.status == 413 and orjson.loads(answer.body)["type"].endswith("/request-too-large")
    assert await stream.read() == b""
    writer.close()

    head = get("/echo", "Expect: 100-continue", "Content-Length: 5").replace(b"GET", b"PUT", 1)
    stream, writer = await raw(rig, head)
    assert (await answer_from(stream)).status == 100
    writer.write(b"hello")
    answer = await answer_from(stream)
    assert (answer.status, orjson.loads(answer.body)) == (201, {"method": "PUT", "body": "hello"})
    writer.close()

    stream, writer = await raw(rig, get("/echo", "Connection: Upgrade", "Upgrade: websocket"))
    assert (await answer_from(stream)).status == 201
    assert await stream.read() == b""
    writer.close()
    assert rig.process.returncode is None


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
