"""HTTP/1.1 on the read port: httptools parses, and a read the reader can serve from a view it
holds is answered in the parser callback that completed it, with no task, request object or
header map of a web framework.

aiohttp's server (its low-level `web.Server`, on uvloop) cost ~60 µs of CPU per request when
requests arrive one at a time at 5,000/s; a protocol on httptools costs ~17 (bench/results.md,
notes on the "Reads" runs of 2026-12-04 11:30-11:34). The read port exists to answer that one
read cheaply; everything else it is sent is relayed to a worker (`api.reader`), which this
module lets a handler do in order:

- a request the handler cannot answer at once (`Handler.answer_now` returns None) goes to a task
  of its connection, and so does every request pipelined behind it: answers leave in the order
  their requests came; a connection stops reading while `PIPELINE_DEPTH` requests wait;
- a request body is kept whole up to `max_body` bytes (bigger: 413 and the connection closes);
- `Expect: 100-continue` is answered when nothing else is being answered on the connection;
- an answer of unknown length is sent chunked (HTTP/1.1) or delimited by closing (HTTP/1.0);
- bytes that do not parse as HTTP/1.x get a 400, after the answers already owed, and a close;
  so does an `Upgrade` (the request is answered as if it had not asked, then the connection
  closes: the read port speaks nothing else).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol, cast

import httptools

from api.problems import PROBLEM_TYPE, Problem, too_large

log = logging.getLogger(__name__)

#: Requests a connection may have waiting behind the one being answered before it stops reading.
PIPELINE_DEPTH = 16
#: How long a stopping server lets answers under way finish before it closes their connections.
STOP_GRACE_S = 5.0
#: A connection owed nothing that has sent nothing for this long is closed (aiohttp's keep-alive
#: timeout, which the read port had before), checked every IDLE_SWEEP_S.
IDLE_S = 75.0
IDLE_SWEEP_S = 5.0

Headers = Iterable[tuple[str, str]]


@dataclass(slots=True)
class Request:
    method: str
    #: The request target as sent: path and query, still percent-encoded.
    target: str
    path: str
    query: str
    #: Names lower-cased; values as sent (bytes that are not UTF-8 as surrogates).
    headers: list[tuple[str, str]]
    body: bytes
    version: str
    keep_alive: bool

    def header(self, name: str) -> str | None:
        """The first value of header `name` (lower-case), or None."""
        return _first(self.headers, name)


def _first(headers: list[tuple[str, str]], name: str) -> str | None:
    """The first value of header `name` in lower-cased `headers`, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


class Handler(Protocol):
    def answer_now(self, request: Request) -> bytes | None:
        """The whole answer (`encode`), when it needs no waiting; else None."""

    async def answer(self, request: Request, reply: Reply) -> None:
        """Answer through `reply`; an exception after `reply.start` closes the connection."""


def reason_of(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class _Date:
    """The `Date` header's value, formatted once a second."""

    second = -1
    value = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.value = second, formatdate(second, usegmt=True)
        return cls.value


def _head(
    request: Request, status: int, reason: str | None, headers: Headers, framing: str
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason or reason_of(status)}", f"Date: {_Date.now()}", framing]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if not request.keep_alive:
        lines.append("Connection: close")
    elif request.version == "1.0":
        lines.append("Connection: keep-alive")
    return ("\r\n".join(line for line in lines if line) + "\r\n\r\n").encode(
        "utf-8", "surrogateescape"
    )


def _no_content(status: int) -> bool:
    """A status whose answers have no body and no length (1xx, 204, 304)."""
    return status in (204, 304) or status < 200


def _bodiless(request: Request, status: int) -> bool:
    return request.method == "HEAD" or _no_content(status)


def encode(request: Request, status: int, headers: Headers, body: bytes) -> bytes:
    """A whole answer to `request`: status line, `Date`, `Content-Length`, `headers`, body."""
    framing = "" if _no_content(status) else f"Content-Length: {len(body)}"
    head = _head(request, status, None, headers, framing)
    return head if _bodiless(request, status) else head + body


def encode_problem(request: Request, problem: Problem) -> bytes:
    headers = [("Content-Type", PROBLEM_TYPE), *problem.headers.items()]
    return encode(request, problem.status, headers, problem.document())


class Reply:
    """How `Handler.answer` answers one request: `send` a whole answer, or `start`, `write`
    and `end` one streamed as it comes."""

    __slots__ = ("_chunked", "_connection", "_head_only", "request", "started")

    def __init__(self, connection: Connection, request: Request) -> None:
        self._connection = connection
        self.request = request
        self.started = False
        self._chunked = False
        self._head_only = False

    def send(self, status: int, headers: Headers, body: bytes) -> None:
        self.started = True
        self._connection.write(encode(self.request, status, headers, body))

    def send_encoded(self, answer: bytes) -> None:
        """A whole answer already encoded (`encode`)."""
        self.started = True
        self._connection.write(answer)

    def send_problem(self, problem: Problem) -> None:
        self.started = True
        self._connection.write(encode_problem(self.request, problem))

    def start(self, status: int, reason: str | None, headers: Headers, length: int | None) -> None:
        """Send the status line and headers; the body follows by `write` (`length` bytes, or
        chunked when None)."""
        self.started = True
        self._head_only = _bodiless(self.request, status)
        if _no_content(status):
            framing = ""
        elif length is not None:
            framing = f"Content-Length: {length}"
        elif self.request.method == "HEAD":
            framing = ""
        elif self.request.version == "1.1":
            framing, self._chunked = "Transfer-Encoding: chunked", True
        else:
            framing, self.request.keep_alive = "", False  # HTTP/1.0: the close ends the body
        self._connection.write(_head(self.request, status, reason, headers, framing))

    async def write(self, chunk: bytes) -> None:
        if self._head_only or not chunk:
            return
        if self._chunked:
            self._connection.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            self._connection.write(chunk)
        await self._connection.drain()

    def end(self) -> None:
        if self._chunked:
            self._connection.write(b"0\r\n\r\n")


class Connection(asyncio.Protocol):
    """One client connection: parse, answer in order, keep alive or close."""

    def __init__(self, server: ReadServer) -> None:
        self.server = server
        self.handler = server.handler
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        #: What waits to be answered, in order: a request, or a refusal to send before closing.
        self.queue: deque[Request | bytes] = deque()
        self.task: asyncio.Task[None] | None = None
        self.reading = True
        self.closed = False
        #: When the client last sent anything (CLOCK_MONOTONIC).
        self.active = time.monotonic()
        #: Stop reading and close once what is owed is answered (a refusal, or an upgrade).
        self.finishing = False
        self._writable: asyncio.Future[None] | None = None
        self._url = bytearray()
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()
        self._too_large = False

    # -- transport ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.task is not None:
            self.task.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def write(self, data: bytes) -> None:
        """Send `data`, unless the connection is closing: nothing follows an answer that
        closes it (a request pipelined behind `Connection: close` is a parse error to llhttp,
        whose 400 must not go out after it either)."""
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("the client closed the connection")
        if self._writable is not None:
            await self._writable

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def _pause(self) -> None:
        if self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()

    def _resume(self) -> None:
        if not self.reading and not self.finishing and self.transport is not None:
            self.reading = True
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.active = time.monotonic()
        if self.finishing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._finish(None)  # the request was queued as if it had not asked to upgrade
        except httptools.HttpParserError as exc:
            if self._too_large:
                problem = too_large(self.server.max_body)
            else:
                problem = Problem(400, "bad-request", "Bad request", f"not HTTP/1.x: {exc}")
            self._finish(problem)

    def _finish(self, problem: Problem | None) -> None:
        """Read no more; answer what is owed (then `problem`, if any) and close."""
        self.finishing = True
        self._pause()
        if problem is not None:
            request = Request("GET", "", "", "", [], b"", "1.1", keep_alive=False)
            self.queue.append(encode_problem(request, problem))
        self._next()

    # -- parser callbacks --------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url.clear()
        self._headers = []
        self._body.clear()
        self._too_large = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append(
            (name.decode("latin-1").lower(), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        length = _first(self._headers, "content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body:
            self._too_large = True
            raise ValueError("body over the limit")  # stops the parser: 413, then close
        expect = _first(self._headers, "expect") or ""
        if expect.lower() == "100-continue" and not self.queue and self.task is None:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if len(self._body) + len(body) > self.server.max_body:
            self._too_large = True
            raise ValueError("body over the limit")
        self._body += body

    def on_message_complete(self) -> None:
        target = self._url.decode("latin-1")
        path, _, query = target.partition("?")
        request = Request(
            method=self.parser.get_method().decode("latin-1"),
            target=target,
            path=path,
            query=query,
            headers=self._headers,
            body=bytes(self._body),
            version=self.parser.get_http_version(),
            keep_alive=self.parser.should_keep_alive(),
        )
        if not self.queue and self.task is None:
            answer = self._answer_now(request)
            if answer is not None:
                self.write(answer)
                if not request.keep_alive:
                    self._finish(None)
                return
        self.queue.append(request)
        if len(self.queue) >= PIPELINE_DEPTH:
            self._pause()
        self._next()

    # -- answering ---------------------------------------------------------------------------------

    def _answer_now(self, request: Request) -> bytes | None:
        try:
            return self.handler.answer_now(request)
        except Exception:
            log.exception("read failed", extra={"event": "reader.error", "path": request.path})
            return encode_problem(request, _internal())

    def _next(self) -> None:
        if self.task is None and not self.closed:
            if self.queue:
                self.task = asyncio.get_running_loop().create_task(self._drain())
            elif self.finishing:
                self.close()

    async def _drain(self) -> None:
        try:
            while self.queue and not self.closed:
                item = self.queue.popleft()
                if len(self.queue) < PIPELINE_DEPTH // 2:
                    self._resume()
                if isinstance(item, bytes):  # a refusal: the last thing sent
                    self.write(item)
                    self.close()
                    return
                answer = self._answer_now(item)
                if answer is not None:
                    self.write(answer)
                else:
                    reply = Reply(self, item)
                    try:
                        await self.handler.answer(item, reply)
                    except Exception:
                        log.exception(
                            "read failed", extra={"event": "reader.error", "path": item.path}
                        )
                        if reply.started:  # an answer cut short: only a close can say so
                            self.close()
                            return
                        reply.send_problem(_internal())
                    if not reply.started:  # a handler that answered nothing
                        reply.send_problem(_internal())
                if not item.keep_alive:
                    self.close()
                    return
        finally:
            self.task = None
        if self.finishing and not self.closed:
            self.close()


def _internal() -> Problem:
    return Problem(500, "internal", "Internal error", "the reader failed")


class ReadServer:
    """Listens on the read port (`SO_REUSEPORT`: every reader of a worker binds it)."""

    def __init__(self, handler: Handler, *, max_body: int, idle_s: float = IDLE_S) -> None:
        self.handler = handler
        self.max_body = max_body
        self.idle_s = idle_s
        self.connections: set[Connection] = set()
        self.server: asyncio.Server | None = None
        self.sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Connection(self), host, port, reuse_port=True
        )
        self.sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close the connections owed nothing that have been quiet for `idle_s`."""
        while True:
            await asyncio.sleep(min(IDLE_SWEEP_S, self.idle_s))
            quiet = time.monotonic() - self.idle_s
            for connection in list(self.connections):
                if connection.task is None and not connection.queue and connection.active < quiet:
                    connection.close()

    async def stop(self) -> None:
        """Stop listening; let answers under way finish (up to `STOP_GRACE_S`); close the rest."""
        if self.sweeper is not None:
            self.sweeper.cancel()
        if self.server is not None:
            self.server.close()
        for connection in list(self.connections):
            if connection.task is None:
                connection.close()
        busy = [c.task for c in self.connections if c.task is not None]
        if busy:
            await asyncio.wait(busy, timeout=STOP_GRACE_S)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.wait_closed()


# -- passing a read to another worker's read port -------------------------------------------------


class PeerRefused(ConnectionError):
    """The peer's read port could not be reached (its worker stopped, or it is not up yet)."""


@dataclass(slots=True)
class PeerAnswer:
    status: int
    reason: str
    #: Names as sent; `Content-Length` and `Transfer-Encoding` left out (the body is whole).
    headers: list[tuple[str, str]]
    body: bytes


class _PeerConnection(asyncio.Protocol):
    """One keep-alive connection to a peer's read port, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[PeerAnswer] | None = None
        self.closed = False
        self.received = False
        self._reason = bytearray()
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionResetError("the peer closed the connection"))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            self.close()

    def on_message_begin(self) -> None:
        self._reason.clear()
        self._headers = []
        self._body.clear()

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        text = name.decode("latin-1")
        if text.lower() not in ("content-length", "transfer-encoding"):
            self._headers.append((text, value.decode("utf-8", "surrogateescape")))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        answer = PeerAnswer(
            self.parser.get_status_code(),
            self._reason.decode("latin-1"),
            self._headers,
            bytes(self._body),
        )
        if not self.parser.should_keep_alive():
            self.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(answer)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, data: bytes, timeout_s: float) -> PeerAnswer:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.received = False
        self.transport.write(data)
        try:
            return await asyncio.wait_for(self.waiter, timeout_s)
        except BaseException:
            self.close()  # what comes later on it would answer the wrong request
            raise
        finally:
            self.waiter = None


class PeerPool:
    """Keep-alive connections to other workers' read ports, for the reads a reader passes on.

    aiohttp's client cost ~100 µs of CPU per request here; a passed read is one small GET with
    a whole answer, which a pooled connection and httptools' response parser answer for a
    fraction of that. A pooled connection the peer closed while idle is dropped, and a request
    that finds it closed before any answer came is sent once more on a new one (a GET).
    """

    #: Idle connections kept per peer.
    KEEP = 64
    CONNECT_TIMEOUT_S = 2.0

    def __init__(self) -> None:
        self.idle: dict[tuple[str, int], list[_PeerConnection]] = {}

    async def get(
        self, host: str, port: int, target: str, headers: Headers, timeout_s: float
    ) -> PeerAnswer:
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}"]
        lines.extend(f"{name}: {value}" for name, value in headers)
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        pooled = self.idle.setdefault((host, port), [])
        while pooled:
            connection = pooled.pop()
            if connection.closed:
                continue
            try:
                answer = await connection.exchange(data, timeout_s)
            except ConnectionResetError:
                if connection.received:
                    raise
                continue  # closed by the peer while idle: try the next, or a new one
            self._release(pooled, connection)
            return answer
        connection = await self._connect(host, port)
        answer = await connection.exchange(data, timeout_s)
        self._release(pooled, connection)
        return answer

    def _release(self, pooled: list[_PeerConnection], connection: _PeerConnection) -> None:
        if not connection.closed and len(pooled) < self.KEEP:
            pooled.append(connection)
        elif not connection.closed:
            connection.close()

    async def _connect(self, host: str, port: int) -> _PeerConnection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(_PeerConnection, host, port), self.CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            raise PeerRefused(f"{host}:{port}: {exc}") from exc
        return connection

    def close(self) -> None:
        for pooled in self.idle.values():
            for connection in pooled:
                connection.close()
        self.idle.clear()
