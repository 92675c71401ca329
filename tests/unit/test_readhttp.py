"""`api.readhttp` on its own (the reader's use of it is tested in test_reader.py).

`PeerPool`, how a reader passes a read to another worker's read port, against raw asyncio
servers that answer, close or break on cue, so each rule is checked on its own: a connection is
kept alive and reused, one the peer closed before answering is replaced (the read is a GET: sent
again), a peer that cannot be reached or breaks an answer says so, and a chunked answer comes
back whole. `ReadServer`: a connection quiet past the idle timeout is closed, one owed an
answer is not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from api.readhttp import PeerPool, PeerRefused, ReadServer, Reply, Request, encode
from tests.support.workers import free_port

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Peer: yes\r\n\r\n"
    b'5\r\n{"ok"\r\n6\r\n:true}\r\n0\r\n\r\n'
)

#: (connection number, request number on it) -> (the bytes to answer with, close after them).
Script = Callable[[int, int], tuple[bytes, bool]]


@asynccontextmanager
async def peer(script: Script) -> AsyncIterator[tuple[int, list[str]]]:
    """A peer read port that answers each request as `script` says; yields its port and the
    request lines it read, as "<connection>:<request line>"."""
    seen: list[str] = []
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number, requests = connections, 0
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                requests += 1
                seen.append(f"{number}:{head.split(b' HTTP/')[0].decode()}")
                answer, close = script(number, requests)
                writer.write(answer)
                await writer.drain()
                if close:
                    break
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    port = free_port()
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    try:
        yield port, seen
    finally:
        server.close()
        await server.wait_closed()


async def test_a_connection_is_kept_alive_and_reused() -> None:
    pool = PeerPool()
    async with peer(lambda c, r: (OK, False)) as (port, seen):
        for _ in range(3):
            answer = await pool.get("127.0.0.1", port, "/jobs/a", [("via", "1.1 x")], 5)
            assert (answer.status, answer.reason, answer.body) == (200, "OK", b'{"ok":true}')
            assert ("Content-Type", "application/json") in answer.headers
        assert seen == ["1:GET /jobs/a"] * 3
    pool.close()


async def test_a_connection_the_peer_closed_before_answering_is_replaced() -> None:
    """The peer drops its kept-alive connection as the second request arrives (it timed out
    idle just then): that read goes again, on a new connection, and is answered."""
    pool = PeerPool()
    async with peer(lambda c, r: (b"", True) if (c, r) == (1, 2) else (OK, False)) as (port, seen):
        assert (await pool.get("127.0.0.1", port, "/jobs/a", [], 5)).status == 200
        assert (await pool.get("127.0.0.1", port, "/jobs/b", [], 5)).status == 200
        assert seen == ["1:GET /jobs/a", "1:GET /jobs/b", "2:GET /jobs/b"]
    pool.close()


async def test_a_peer_out_of_reach_or_breaking_its_answer_says_so() -> None:
    pool = PeerPool()
    with pytest.raises(PeerRefused):
        await pool.get("127.0.0.1", free_port(), "/jobs/a", [], 5)
    async with peer(lambda c, r: (OK[:40], True)) as (port, _):  # half an answer, then the close
        with pytest.raises(ConnectionResetError):
            await pool.get("127.0.0.1", port, "/jobs/a", [], 5)
    async with peer(lambda c, r: (b"", False)) as (port, _):  # reads, never answers
        with pytest.raises(TimeoutError):
            await pool.get("127.0.0.1", port, "/jobs/a", [], 0.2)
    assert all(not pooled for pooled in pool.idle.values())  # nothing broken is kept
    pool.close()


async def test_a_chunked_answer_comes_back_whole() -> None:
    pool = PeerPool()
    async with peer(lambda c, r: (CHUNKED, False)) as (port, _):
        answer = await pool.get("127.0.0.1", port, "/jobs/a", [], 5)
        assert answer.body == b'{"ok":true}'
        assert answer.headers == [("X-Peer", "yes")]  # framing is the relay's to set
    pool.close()


class Slow:
    """Answers `/now` at once and `/slow` once `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    def answer_now(self, request: Request) -> bytes | None:
        if request.path == "/big":  # more than a socket buffer holds: the close waits for it
            return encode(request, 200, [], b"b" * 8_000_000 + b"now")
        return encode(request, 200, [], b"now") if request.path == "/now" else None

    async def answer(self, request: Request, reply: Reply) -> None:
        await self.release.wait()
        reply.send(200, [], b"slow")


async def test_a_quiet_connection_is_closed_and_one_owed_an_answer_is_not() -> None:
    handler = Slow()
    server = ReadServer(handler, max_body=1000, idle_s=0.3)
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        quiet = await asyncio.open_connection("127.0.0.1", port)
        waiting = await asyncio.open_connection("127.0.0.1", port)
        busy = await asyncio.open_connection("127.0.0.1", port)
        waiting[1].write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(8):  # a request every 0.15 s keeps a connection open
            busy[1].write(b"GET /now HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await busy[0].readuntil(b"now")).startswith(b"HTTP/1.1 200 OK\r\n")
            await asyncio.sleep(0.15)
        assert await asyncio.wait_for(quiet[0].read(), 1) == b""  # closed by the server
        handler.release.set()  # owed an answer for 1.2 s: still open, and answered
        assert (await waiting[0].readuntil(b"slow")).startswith(b"HTTP/1.1 200 OK\r\n")
        for _, writer in (quiet, waiting, busy):
            writer.close()
    finally:
        await server.stop()


@pytest.mark.parametrize("path", ["/now", "/big"])
async def test_nothing_is_answered_after_a_request_that_closes_the_connection(path: str) -> None:
    """Requests pipelined behind `Connection: close` get no answer, nor the 400 llhttp's parse
    error of them would make: the connection ends with the answer that closes it, also while
    that answer is still being sent (`/big`)."""
    server = ReadServer(Slow(), max_body=1000)
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            + b"GET /now HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        await asyncio.sleep(0.2)  # the server has read both before the client reads
        received = await asyncio.wait_for(reader.read(), 10)
        assert received.count(b"HTTP/1.1 ") == 1 and received.endswith(b"now")
        writer.close()
    finally:
        await server.stop()
