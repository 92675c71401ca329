"""A reader process: `GET /jobs/{id}` of its worker's jobs on the read port (`CP_READ_PORT`).

Started by its worker (`api.readhub`), never by hand. It answers a read from the job's status view,
asked of the worker once per state of the job and kept until the worker says the job changed, so a
read costs the worker nothing and does not wait for the job core's steps. A read of a job whose
partition another worker owns goes straight to that worker's read port when it has one (once: a
read relayed by a reader is never passed on again). Everything else is forwarded to the worker
and answered as the worker answers it: another tenant's job or a missing one, `?wait=`
long-polls, and every other route. So is every
read while the worker has not been heard from for `LEASE_S` (stopped, paused, or gone), or past
the end of the worker's membership lease that it last told of (`streams.lease`): the reader never
answers from what it last knew of a worker that may have lost its partitions meanwhile.

It exits when its worker's connection ends; the worker starts it again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import httptools
import orjson
import uvloop
from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector
from yarl import URL

from api.auth import KeyRing, tenant_of
from api.links import LinkSigner
from api.problems import Problem, unavailable
from api.readframes import frame, read_frame
from api.readhttp import PeerPool, PeerRefused, ReadServer, Reply, Request, encode, encode_problem
from streams.logs import configure_logging
from streams.placement import partition_for
from streams.settings import Settings, get_settings, local_url

log = logging.getLogger(__name__)

#: Serve views only while the worker was heard from this recently (it says so every 0.5 s).
LEASE_S = 2.0
#: How long a read waits for the worker's answer to a view request before forwarding.
ASK_TIMEOUT_S = 1.0
#: How often the reader reports its request counts to the worker.
REPORT_S = 1.0
CONNECT_WITHIN_S = 60.0
FORWARD_TIMEOUT_S = 65.0
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"}
_NOT_RELAYED = _HOP | {"date", "server"}

View = tuple[str, bytes, bytes]
#: Marks an answer the reader relayed from its worker (RFC 9110 `Via`); one it served has none.
VIA = "1.1 cp-reader"
JSON = (("Content-Type", "application/json"),)


class Views:
    """The status views this reader holds, kept current by its worker's frames."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: dict[str, View] = {}
        self.asked: dict[str, asyncio.Future[View | None]] = {}
        self.heard = float("-inf")
        #: CLOCK_MONOTONIC end of the worker's membership lease, as it last said.
        self.until = float("-inf")
        #: The job partition count, and the read port of each partition another worker owns.
        self.partitions = 0
        self.elsewhere: dict[int, URL] = {}
        self.writer: asyncio.StreamWriter | None = None
        #: Requests by outcome since this reader started, reported to the worker (`report`).
        self.counts: Counter[str] = Counter()

    def fresh(self) -> bool:
        now = time.monotonic()
        return now - self.heard < LEASE_S and now < self.until

    def apply(self, items: list[Any]) -> None:
        """One frame from the worker (`api.readframes`)."""
        self.heard = time.monotonic()
        kind = items[0]
        if kind == "d":
            for job_id in items[1]:
                self.entries.pop(job_id, None)
        elif kind == "r":
            self.entries.clear()
        elif kind == "v":
            job_id, tenant = items[1], items[2]
            view = None if tenant is None else (tenant, items[3].encode(), items[4].encode())
            if view is not None:
                # Kept as the frame is read: a change after this view comes in a later frame.
                self.entries[job_id] = view
                if len(self.entries) > self.capacity:
                    del self.entries[next(iter(self.entries))]
            waiting = self.asked.pop(job_id, None)
            if waiting is not None and not waiting.done():
                waiting.set_result(view)
        elif kind == "a" and len(items) == 2 and isinstance(items[1], float | int):
            self.until = float(items[1])
        elif kind == "o" and len(items) == 3:
            self.partitions = int(items[1])
            self.elsewhere = {int(p): URL(url) for p, url in items[2].items()}
        else:
            raise ValueError(f"unexpected frame from the worker: {items!r:.200}")

    async def ask(self, job_id: str) -> View | None:
        """The job's view from the worker, or None when it cannot answer for the job now."""
        waiting = self.asked.get(job_id)
        if waiting is None:
            if self.writer is None:
                return None
            waiting = asyncio.get_running_loop().create_future()
            self.asked[job_id] = waiting
            self.writer.write(frame("v", job_id))
        try:
            return await asyncio.wait_for(asyncio.shield(waiting), ASK_TIMEOUT_S)
        except TimeoutError:
            if self.asked.get(job_id) is waiting:
                del self.asked[job_id]
            return None

    async def report(self) -> None:
        """Send the totals to the worker once a second when they moved (`cp_reader_reads`)."""
        sent: dict[str, int] = {}
        while True:
            await asyncio.sleep(REPORT_S)
            if self.writer is not None and self.counts != sent:
                sent = dict(self.counts)
                self.writer.write(frame("m", sent))

    async def listen(self, stream: asyncio.StreamReader) -> None:
        while (items := await read_frame(stream)) is not None:
            self.apply(items)


class Reader:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keyring = KeyRing.from_settings(settings)
        self.signer = LinkSigner.from_settings(settings)
        self.views = Views(max(1024, settings.status_views))
        #: job_id -> (exp, signed link as JSON): a job read again within the second that fixes
        #: its link's expiry reuses the signature (signing was ~14% of a read's CPU).
        self.links: dict[str, tuple[int, bytes]] = {}
        self.worker = URL(local_url(settings.web_host, settings.web_port))
        self.http: ClientSession | None = None
        self.peers = PeerPool()

    def viewable(self, request: Request) -> str | None:
        """The job id of a read this reader may answer from a view: `GET /jobs/{id}`, no
        query, while the worker's lease holds."""
        path = request.path
        if (
            request.method == "GET"
            and path.startswith("/jobs/")
            and len(path) > 6
            and "/" not in path[6:]
            and "%" not in path  # an escaped id: the worker decodes it
            and not request.query
            and self.views.fresh()
        ):
            return path[6:]
        return None

    def answer_now(self, request: Request) -> bytes | None:
        """A read of a view this reader holds, answered in the parser's callback; None for
        anything that waits (a view to ask for, a relay)."""
        job_id = self.viewable(request)
        if job_id is None:
            return None
        try:
            tenant = tenant_of(self.keyring, request.header("authorization"))
        except Problem as problem:
            return encode_problem(request, problem)
        view = self.views.entries.get(job_id)
        if view is None or view[0] != tenant:
            return None
        return self.served(request, job_id, view, "served")

    async def answer(self, request: Request, reply: Reply) -> None:
        try:
            job_id = self.viewable(request)
            if job_id is None:
                await self.forward(request, reply)
            else:
                await self.job_status(request, reply, job_id)
        except Problem as problem:
            if reply.started:
                raise
            reply.send_problem(problem)

    def served(self, request: Request, job_id: str, view: View, outcome: str) -> bytes:
        self.views.counts[outcome] += 1
        body = view[1] + self.link(job_id, view[0]) + view[2]
        return encode(request, 200, JSON, body)

    async def job_status(self, request: Request, reply: Reply, job_id: str) -> None:
        tenant = tenant_of(self.keyring, request.header("authorization"))
        view = self.views.entries.get(job_id)
        outcome = "served"
        if view is None:
            peer = self.peer_for(job_id, request)
            if peer is not None:
                await self.pass_to(peer, request, reply)
                return
            view, outcome = await self.views.ask(job_id), "asked"
        if view is None or view[0] != tenant:
            await self.forward(request, reply)  # counted as relayed
            return
        reply.send_encoded(self.served(request, job_id, view, outcome))

    def link(self, job_id: str, tenant: str) -> bytes:
        exp = self.signer.expiry(time.time())
        kept = self.links.get(job_id)
        if kept is not None and kept[0] == exp:
            return kept[1]  # a job has one tenant: its link for this expiry is the same
        link = orjson.dumps(self.signer.link_until(job_id, tenant, exp))
        if len(self.links) >= self.views.capacity:
            self.links.clear()
        self.links[job_id] = (exp, link)
        return link

    def peer_for(self, job_id: str, request: Request) -> URL | None:
        """The read port of the worker that owns the job's partition, when it is another one's
        and the request did not come from a reader already."""
        if not self.views.partitions or VIA in (request.header("via") or ""):
            return None
        return self.views.elsewhere.get(partition_for(job_id, self.views.partitions))

    async def pass_to(self, peer: URL, request: Request, reply: Reply) -> None:
        """Pass a read of a job another worker owns to that worker's read port, marked `Via`,
        on a pooled connection (`PeerPool`), and its answer back. A peer that cannot be reached,
        or that drops the connection before answering, is passed over for the worker, which
        forwards to the partition's owner."""
        assert peer.host is not None and peer.port is not None
        headers = _outbound(request)
        headers.append(("via", ", ".join(v for v in (request.header("via"), VIA) if v)))
        try:
            answer = await self.peers.get(
                peer.host, peer.port, request.target, headers, FORWARD_TIMEOUT_S
            )
        except (PeerRefused, ConnectionResetError, httptools.HttpParserError):
            await self.forward(request, reply)
            return
        except TimeoutError:
            raise unavailable("the owner's read port did not answer: TimeoutError") from None
        self.views.counts["passed"] += 1
        reply.start(answer.status, answer.reason, _relayed(answer.headers), len(answer.body))
        await reply.write(answer.body)

    async def forward(self, request: Request, reply: Reply) -> None:
        """Relay the request to the worker and its answer back, streamed as it comes."""
        assert self.http is not None
        try:
            async with self.http.request(
                request.method,
                self.worker.join(URL(request.target, encoded=True)),
                headers=_outbound(request),
                data=request.body or None,
                timeout=ClientTimeout(total=FORWARD_TIMEOUT_S),
                allow_redirects=False,
            ) as answer:
                self.views.counts["relayed"] += 1
                relayed = _relayed(answer.headers.items())
                reply.start(answer.status, answer.reason, relayed, answer.content_length)
                async for chunk in answer.content.iter_any():
                    await reply.write(chunk)
                reply.end()
        except (ClientError, TimeoutError) as exc:
            if reply.started:
                raise
            raise unavailable(f"the worker did not answer: {exc.__class__.__name__}") from None

    async def connect(self) -> asyncio.StreamReader:
        """Connect to the worker's socket, waiting for it to open (a worker starting up)."""
        parent = os.getppid()
        deadline = time.monotonic() + CONNECT_WITHIN_S
        while True:
            try:
                stream, self.views.writer = await asyncio.open_unix_connection(
                    self.settings.read_socket
                )
                return stream
            except (FileNotFoundError, ConnectionRefusedError):
                if os.getppid() != parent or time.monotonic() > deadline:
                    raise SystemExit("the worker's read socket never opened") from None
                await asyncio.sleep(0.2)

    async def run(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stream = await self.connect()
        self.http = ClientSession(connector=TCPConnector(limit=256), auto_decompress=False)
        server = ReadServer(self, max_body=self.settings.max_request_bytes)
        await server.start(self.settings.web_host, self.settings.read_port)
        log.info(
            "reader serving",
            extra={"event": "reader.started", "port": self.settings.read_port, "pid": os.getpid()},
        )
        listening = asyncio.create_task(self.views.listen(stream))
        reporting = asyncio.create_task(self.views.report())
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({listening, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if listening in done and listening.exception() is not None:
                log.error(
                    "worker connection failed",
                    extra={"event": "reader.failed", "error": repr(listening.exception())},
                )
        finally:
            listening.cancel()
            reporting.cancel()
            stopping.cancel()
            await server.stop()
            self.peers.close()
            await self.http.close()
            if self.views.writer is not None:
                self.views.writer.transport.abort()


def _outbound(request: Request) -> list[tuple[str, str]]:
    """The request's headers as a reader sends them on: hop-by-hop ones left out."""
    return [(name, value) for name, value in request.headers if name not in _HOP]


def _relayed(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """An answer's headers as a reader relays them: hop-by-hop ones, `Date` and `Server` left
    out (its own are sent), marked `Via`."""
    kept = [(name, value) for name, value in headers if name.lower() not in _NOT_RELAYED]
    kept.append(("Via", VIA))
    return kept


def main() -> None:
    settings = get_settings()
    configure_logging(settings)
    if not settings.read_port:
        raise SystemExit("CP_READ_PORT is not set: a reader has no port to serve")
    # uvloop: a read costs about a tenth less CPU than on asyncio's own loop
    uvloop.run(Reader(settings).run())


if __name__ == "__main__":
    main()
