"""Serve a job's request on the worker that owns its partition, forwarding when it is elsewhere."""

from __future__ import annotations

from aiohttp import ClientError, ClientTimeout, web
from faust.types import TP
from yarl import URL

from api.problems import unavailable
from streams.agents import job_partition
from streams.app import app, topics

FORWARDED = "X-CP-Forwarded"
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


def _ident(url: URL) -> tuple[str, int]:
    return (url.host or "", int(url.port or 80))


def not_serving() -> str | None:
    """Say why this worker cannot answer from its tables right now, or None when it can."""
    if app.should_stop:
        # Stopping closes the tables and the HTTP client before the web server: answer 503.
        return "shutting down"
    if not app.tables.recovery.completed.is_set():
        return "tables recovering"
    if app.rebalancing or app.in_recovery:
        return "rebalancing"
    return None


def owner(job_id: str) -> URL | None:
    """Return the owner's URL, or None when this worker owns the job and can answer now."""
    reason = not_serving()
    if reason is not None:
        raise unavailable(f"the worker is {reason}")
    try:
        dest = app.router.key_store("jobs", job_id)
    except KeyError:
        raise unavailable("no worker owns this job's partition yet") from None
    if _ident(dest) != _ident(URL(app.conf.canonical_url)):
        return dest
    tp = TP(topics.commands.get_topic_name(), job_partition(job_id))
    if tp not in app.assignor.assigned_actives():
        raise unavailable("this job's partition is moving between workers")
    return None


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
            relay = {
                k: v
                for k, v in response.headers.items()
                if k.lower() in ("retry-after", "location")
            }
            return web.Response(
                status=response.status,
                body=await response.read(),
                content_type=response.content_type,
                charset=response.charset,
                headers=relay,
            )
    except (ClientError, TimeoutError, RuntimeError) as exc:  # RuntimeError: session closed
        raise unavailable(f"the owning worker did not answer: {exc.__class__.__name__}") from None
