"""Serve a job's request on the worker that owns its partition, forwarding when it is elsewhere."""

from __future__ import annotations

from aiohttp import ClientError, ClientTimeout, web
from yarl import URL

from api.problems import unavailable
from streams.app import app, core

FORWARDED = "X-CP-Forwarded"
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}
#: Headers of the owner's answer passed on to the client (the OpenAI front door's job headers
#: too, and the timeline page's referrer and cache policy).
_RELAYED = {
    "retry-after",
    "location",
    "x-job-id",
    "x-request-id",
    "x-should-retry",
    "referrer-policy",
    "cache-control",
}


def _ident(url: URL) -> tuple[str, int]:
    return (url.host or "", int(url.port or 80))


def not_serving() -> str | None:
    """Say why this worker cannot answer for its partitions right now, or None when it can."""
    if app.should_stop:
        # Stopping closes the job core and the HTTP client before the web server: answer 503.
        return "shutting down"
    ok, reason = core.ready()
    return None if ok else reason


def owner(job_id: str) -> URL | None:
    """Return the owner's URL, or None when this worker holds the job and can answer now."""
    if app.should_stop:
        raise unavailable("the worker is shutting down")
    if core.serves(job_id):
        return None
    url = core.owner_url(job_id)
    if not url:
        raise unavailable("no worker owns this job's partition yet")
    dest = URL(url)
    if _ident(dest) == _ident(URL(core.url)):
        raise unavailable("this job's partition is being restored or moved")
    return dest


async def forward(
    request: web.Request, dest: URL, *, body: bytes | None = None, timeout_s: float = 65.0
) -> web.Response:
    """Send the request, body included, to the owner and relay its answer.

    Pass `body` when the view already consumed the request stream.
    """
    if request.headers.get(FORWARDED):
        raise unavailable("ownership changed while the request was forwarded")
    url = request.url.with_host(dest.host or "127.0.0.1").with_port(dest.port)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
    headers[FORWARDED] = "1"
    if body is None:
        body = await request.read()
    try:
        async with app.http_client.request(
            request.method,
            url,
            headers=headers,
            data=body or None,
            timeout=ClientTimeout(total=timeout_s),
        ) as response:
            relay = {k: v for k, v in response.headers.items() if k.lower() in _RELAYED}
            return web.Response(
                status=response.status,
                body=await response.read(),
                content_type=response.content_type,
                charset=response.charset,
                headers=relay,
            )
    except (ClientError, TimeoutError, RuntimeError) as exc:  # RuntimeError: session closed
        raise unavailable(f"the owning worker did not answer: {exc.__class__.__name__}") from None
