"""Web views served by every control-plane worker.

Views only read the job table (on the worker that owns the job) and produce commands; the job
agent is the only writer. Every error is `application/problem+json`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import wraps
from typing import Any

import orjson
from aiohttp import web
from faust.web import View
from faust.web.drivers.aiohttp import Web as AiohttpWeb
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from api.auth import KeyRing, authenticate
from api.callbacks import check_callback
from api.links import LinkExpired, LinkInvalid, LinkSigner
from api.listing import list_jobs
from api.openapi import openapi_document
from api.problems import Problem, json_response, not_found, too_large, unavailable
from api.render import accepted_body, events_body, status_body, timestamp
from api.routing import forward, not_serving, owner
from api.timeline import timeline_page
from domain.codec import encode, field_errors
from domain.commands import CancelJob, CreateJob
from domain.ids import job_id_for
from domain.job import Job
from domain.messages import JobRequest, TraceContext
from streams.app import app, core, runtime, settings
from streams.commands import send_command
from streams.core import CoreNotReady
from streams.partition import Partition
from streams.tracing import from_headers, span, to_headers
from tables.exceptions import StateCorrupted
from tables.jobs import RetiredJob

log = logging.getLogger(__name__)
keyring = KeyRing.from_settings(settings)
signer = LinkSigner.from_settings(settings)

#: Longest long-poll a client may ask for with ?wait=N.
MAX_WAIT_S = 30.0

Handler = Callable[..., Awaitable[web.StreamResponse]]


def problems(handler: Handler) -> Handler:
    """Turn Problems and unexpected errors into problem documents."""

    @wraps(handler)
    async def wrapped(self: View, request: web.Request, **kwargs: Any) -> web.StreamResponse:
        try:
            return await handler(self, request, **kwargs)
        except Problem as problem:
            return problem.response()
        except Exception:
            log.exception("view failed", extra={"event": "api.error", "path": request.path})
            return Problem(500, "internal", "Internal error", "the server failed").response()

    return wrapped


def ready() -> tuple[bool, str]:
    """Say whether this worker can answer for its partitions, and if not, why."""
    reason = not_serving()
    return (False, reason) if reason is not None else (True, "ready")


def stored(job_id: str) -> Job | None:
    """Read a job of a partition held here: 503 while it moves, 500 when unreadable."""
    try:
        return core.job(job_id)
    except CoreNotReady:
        raise unavailable("this job's partition is being restored or moved") from None
    except StateCorrupted as exc:
        raise Problem(500, "state-corrupted", "Stored job unreadable", str(exc)) from None


def load(job_id: str, tenant: str) -> Job:
    """Read a job this worker owns; another tenant's job is exactly as absent as a missing one."""
    job = stored(job_id)
    if job is None or job.tenant_id != tenant:
        retired = core.retired(job_id)
        if retired is not None and retired.tenant_id == tenant:
            raise gone(retired)
        raise not_found(job_id)
    return job


#: Stands for the signed timeline link in a cached view; replaced on every read.
_LINK_SLOT = "\x00timeline_signed\x00"
_LINK_SLOT_JSON = orjson.dumps(_LINK_SLOT)


def status_view(job_id: str, tenant: str) -> tuple[bytes, bytes]:
    """The job's status body as JSON, split where its signed timeline link goes.

    Rendered once per state of the job (the step that changes it drops the entry): a read of a
    job whose view is kept decodes nothing.
    """
    try:
        part = core.held(job_id)
    except CoreNotReady:
        raise unavailable("this job's partition is being restored or moved") from None
    view: tuple[str, bytes, bytes] | None = part.views.get(job_id)
    if view is None:
        view = _render(part, load(job_id, tenant))
    elif view[0] != tenant:
        load(job_id, tenant)  # another tenant's job: 404 (or 410), exactly as a missing one
    return view[1], view[2]


def _render(part: Partition, job: Job) -> tuple[str, bytes, bytes]:
    body = status_body(job)
    body["links"]["timeline_signed"] = _LINK_SLOT
    head, tail = orjson.dumps(body).split(_LINK_SLOT_JSON, 1)
    view = (job.tenant_id, head, tail)
    part.views.put(job.job_id, view)
    return view


def held_view(job_id: str) -> tuple[str, bytes, bytes] | None:
    """(tenant, head, tail) of a job this worker holds and can answer for now, else None: what a
    reader process may serve (`api.readhub`); anything else it forwards to this worker."""
    if not_serving() is not None or not core.serves(job_id):
        return None
    try:
        part = core.held(job_id)
        view: tuple[str, bytes, bytes] | None = part.views.get(job_id)
        if view is None:
            job = part.job(job_id)
            if job is None:
                return None
            view = _render(part, job)
    except (CoreNotReady, StateCorrupted):
        return None
    return view


def status_response(job_id: str, tenant: str) -> web.Response:
    head, tail = status_view(job_id, tenant)
    link = orjson.dumps(signer.timeline_link(job_id, tenant, time.time()))
    return web.Response(body=head + link + tail, content_type="application/json")


def gone(retired: RetiredJob) -> Problem:
    """A finished job past its retention: its outcome stays known, its details do not."""
    return Problem(
        410,
        "job-retired",
        "Job retired",
        f"job {retired.job_id} finished {retired.state} at {timestamp(retired.finished_at)} and "
        f"left the store at {timestamp(retired.retired_at)} (CP_JOB_RETENTION_S); its final "
        "response stays on cp.responses",
        job_id=retired.job_id,
        state=retired.state,
        finished_at=timestamp(retired.finished_at),
        retired_at=timestamp(retired.retired_at),
    )


async def owned(
    request: web.Request, job_id: str, *, body: bytes | None = None
) -> web.Response | None:
    """Forward to the owner, or return None to serve it here."""
    dest = owner(job_id)
    return await forward(request, dest, body=body) if dest is not None else None


class Accepted:
    """Jobs this worker accepted over HTTP whose CreateJob the job agent has not applied yet.

    Closes the window between `202` and the table write: a conflicting POST still gets `409`.
    """

    def __init__(self, ttl_s: float = 120.0) -> None:
        self.ttl_s = ttl_s
        #: job_id -> (fingerprint, when); insertion order is time order, so expiry pops the front.
        self.jobs: dict[str, tuple[str, float]] = {}

    def add(self, job_id: str, fingerprint: str) -> None:
        now = asyncio.get_running_loop().time()
        while self.jobs:
            oldest, (_, at) = next(iter(self.jobs.items()))
            if now - at < self.ttl_s:
                break
            del self.jobs[oldest]
        self.jobs.pop(job_id, None)
        self.jobs[job_id] = (fingerprint, now)

    def discard(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def fingerprint(self, job_id: str) -> str | None:
        entry = self.jobs.get(job_id)
        return entry[0] if entry else None


accepted = Accepted()
#: How long POST /jobs waits for the job agent to apply a new job before answering 202.
APPLY_WAIT_S = 3.0


# -- probes and documents -------------------------------------------------------------------------


@app.page("/healthz")
class Health(View):
    async def get(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})


@app.page("/readyz")
class Ready(View):
    async def get(self, request: web.Request) -> web.Response:
        ok, reason = ready()
        body = {"ready": ok, "reason": reason, "partitions": sorted(core.parts)}
        return json_response(body, status=200 if ok else 503)


@app.page("/openapi.json")
class OpenAPI(View):
    async def get(self, request: web.Request) -> web.Response:
        return json_response(openapi_document())


# -- jobs -----------------------------------------------------------------------------------------


@app.page("/jobs")
class Jobs(View):
    @problems
    async def get(self, request: web.Request) -> web.StreamResponse:
        """The caller's jobs, newest first, across every partition (`api.listing`)."""
        return await list_jobs(request, authenticate(keyring, request))

    @problems
    async def post(self, request: web.Request) -> web.StreamResponse:
        tenant = authenticate(keyring, request)
        if request.content_type != "application/json":
            raise Problem(
                415,
                "unsupported-media-type",
                "Unsupported media type",
                "send the job request as application/json",
            )
        body = await _read_body(request)
        payload = _parse_request(body, tenant)
        check_callback(settings, payload, tenant)
        job_id = job_id_for(tenant, payload.request_id)
        forwarded = await owned(request, job_id, body=body)
        if forwarded is not None:
            return forwarded
        fingerprint = payload.fingerprint()
        location = {"Location": f"/jobs/{job_id}"}
        known = _known(job_id)
        if known is not None:
            known_fingerprint, state = known
            if known_fingerprint != fingerprint:
                raise Problem(
                    409,
                    "request-conflict",
                    "Conflicting request",
                    f"request_id {payload.request_id!r} was already accepted with another payload",
                    job_id=job_id,
                )
            return json_response(
                accepted_body(job_id, state, created=False), status=202, headers=location
            )
        parent = from_headers(
            [(k, v.encode("utf-8", "surrogateescape")) for k, v in request.headers.items()]
        )
        with span(
            "http.submit", parent, kind=SpanKind.SERVER, job_id=job_id, tenant_id=tenant
        ) as trace:
            return await _submit(
                job_id=job_id,
                tenant=tenant,
                fingerprint=fingerprint,
                payload=payload,
                trace=trace,
                location=location,
            )


def _known(job_id: str) -> tuple[str, str] | None:
    """(fingerprint, state) of a job already accepted: stored, retired, or just sent."""
    existing = stored(job_id)
    if existing is not None:
        return existing.fingerprint, existing.status.value
    retired = core.retired(job_id)
    if retired is not None:
        return retired.fingerprint, retired.state
    pending = accepted.fingerprint(job_id)
    return (pending, "ACCEPTED") if pending is not None else None


async def _submit(
    *,
    job_id: str,
    tenant: str,
    fingerprint: str,
    payload: JobRequest,
    trace: TraceContext,
    location: dict[str, str],
) -> web.Response:
    create = CreateJob(
        command_id=f"http:{uuid.uuid4().hex}",
        job_id=job_id,
        at=datetime.now(UTC),
        tenant_id=tenant,
        fingerprint=fingerprint,
        request=payload,
        trace=trace,
        source="http",
    )
    # Claimed before the first await: a concurrent POST of the same request_id with another
    # payload now sees it and gets 409, instead of both getting 202.
    accepted.add(job_id, fingerprint)
    try:
        await (await send_command(job_id, encode(create), to_headers(trace)))
    except BaseException:
        accepted.discard(job_id)
        raise
    # Read-your-writes: answer once the job agent has applied it (bounded; it is durable anyway).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + APPLY_WAIT_S
    state = "ACCEPTED"
    while loop.time() < deadline:
        job = stored(job_id)
        if job is not None:
            state = job.status.value
            break
        await asyncio.sleep(0.02)
    return json_response(
        accepted_body(job_id, state, created=True),
        status=202,
        headers=location,
    )


async def _read_body(request: web.Request) -> bytes:
    limit = settings.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    body = bytearray()
    async for chunk in request.content.iter_chunked(65536):
        body.extend(chunk)
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


def _parse_request(body: bytes, tenant: str) -> JobRequest:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(422, "invalid-request", "Invalid request", f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Problem(422, "invalid-request", "Invalid request", "the body must be a JSON object")
    claimed = data.get("tenant_id")
    if claimed is not None and claimed != tenant:
        raise Problem(
            422,
            "invalid-request",
            "Invalid request",
            "tenant_id comes from the API key; leave it out",
            errors=[{"loc": ["tenant_id"], "msg": "does not match the API key", "type": "tenant"}],
        )
    data["tenant_id"] = tenant
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        raise Problem(
            422,
            "invalid-request",
            "Invalid request",
            "the job request has invalid fields",
            errors=field_errors(exc),
        ) from None


@app.page("/jobs/by-request/{request_id:.+}")
class JobByRequest(View):
    """The status of the caller's job for a request_id (a Kafka producer is given no job id).

    Registered before `/jobs/{job_id}/...`, so that a request_id such as `result` is one too.
    """

    @problems
    async def get(self, request: web.Request, request_id: str) -> web.StreamResponse:
        tenant = authenticate(keyring, request)
        job_id = job_id_for(tenant, request_id)
        forwarded = await owned(request, job_id)
        if forwarded is not None:
            return forwarded
        return status_response(job_id, tenant)


async def job_status(request: web.Request) -> web.StreamResponse:
    """GET /jobs/{job_id}, the route clients poll: a plain aiohttp handler, without the faust
    View dispatch and per-request sensor the other routes go through (~10% of a read's CPU)."""
    job_id = request.match_info["job_id"]
    try:
        tenant = authenticate(keyring, request)
        forwarded = await owned(request, job_id)
        if forwarded is not None:
            return forwarded
        return status_response(job_id, tenant)
    except Problem as problem:
        return problem.response()
    except Exception:
        log.exception("view failed", extra={"event": "api.error", "path": request.path})
        return Problem(500, "internal", "Internal error", "the server failed").response()


_driver = app.web
assert isinstance(_driver, AiohttpWeb), "the API needs faust's aiohttp web driver"
_driver.web_app.router.add_get("/jobs/{job_id}", job_status)


@app.page("/jobs/{job_id}/result")
class JobResult(View):
    @problems
    async def get(self, request: web.Request, job_id: str) -> web.StreamResponse:
        tenant = authenticate(keyring, request)
        wait = _wait_seconds(request)
        forwarded = await owned(request, job_id)
        if forwarded is not None:
            return forwarded
        job = load(job_id, tenant)
        deadline = asyncio.get_running_loop().time() + wait
        loop = asyncio.get_running_loop()
        while job.final is None and loop.time() < deadline:
            # Woken by the step that finishes the job, or by its partition leaving this worker.
            await core.wait_final(job_id, deadline - loop.time())
            owner(job_id)  # still ours? (raises 503 when the partition moved meanwhile)
            job = load(job_id, tenant)
        if job.final is None:
            return json_response(
                accepted_body(job_id, job.status.value, final=False),
                status=202,
                headers={"Retry-After": "1"},
            )
        return json_response(job.final.model_dump(mode="json"))


def _wait_seconds(request: web.Request) -> float:
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise Problem(422, "invalid-request", "Invalid request", "wait must be a number") from None
    if not 0 <= value <= MAX_WAIT_S:
        raise Problem(
            422, "invalid-request", "Invalid request", f"wait must be between 0 and {MAX_WAIT_S:g}"
        )
    return value


@app.page("/jobs/{job_id}/events")
class JobEvents(View):
    @problems
    async def get(self, request: web.Request, job_id: str) -> web.StreamResponse:
        tenant = authenticate(keyring, request)
        try:
            after = int(request.query.get("after", "0"))
        except ValueError:
            raise Problem(
                422, "invalid-request", "Invalid request", "after must be an integer"
            ) from None
        if after < 0:
            raise Problem(422, "invalid-request", "Invalid request", "after must be >= 0")
        forwarded = await owned(request, job_id)
        if forwarded is not None:
            return forwarded
        return json_response(events_body(load(job_id, tenant), after))


@app.page("/jobs/{job_id}/timeline")
class JobTimeline(View):
    """A bearer key, or the signed link of `GET /jobs/{id}`; never a key in the URL."""

    @problems
    async def get(self, request: web.Request, job_id: str) -> web.StreamResponse:
        keyed = "Authorization" in request.headers or "sig" not in request.query
        tenant = authenticate(keyring, request) if keyed else None
        if tenant is None:
            _link_expiry(request)  # an expired link is refused here, before any forward
        forwarded = await owned(request, job_id)
        if forwarded is not None:
            return forwarded
        job = load(job_id, tenant) if tenant is not None else _linked(request, job_id)
        return web.Response(
            text=timeline_page(job),
            content_type="text/html",
            charset="utf-8",
            headers=PAGE_HEADERS,
        )


#: The page names a job and its providers: no referrer carries its URL away, no cache keeps it.
PAGE_HEADERS = {"Referrer-Policy": "no-referrer", "Cache-Control": "private, no-store"}


def _link_problem(exc: LinkInvalid | LinkExpired) -> Problem:
    if isinstance(exc, LinkExpired):
        return Problem(
            403,
            "link-expired",
            "Link expired",
            f"{exc}; get a fresh one from GET /jobs/{{id}} (links.timeline_signed)",
        )
    return Problem(
        403,
        "link-invalid",
        "Link invalid",
        "the link does not open this page; get one from GET /jobs/{id} (links.timeline_signed)",
    )


def _link_expiry(request: web.Request) -> None:
    try:
        signer.check_expiry(request.query.get("exp", ""), time.time())
    except (LinkInvalid, LinkExpired) as exc:
        raise _link_problem(exc) from None


def _linked(request: web.Request, job_id: str) -> Job:
    """The job a signed link opens: checked against the tenant that owns it, else 403.

    A missing job answers like a bad signature: a link reveals nothing about other ids.
    """
    job = stored(job_id)
    tenant = job.tenant_id if job is not None else None
    retired = core.retired(job_id) if job is None else None
    if retired is not None:
        tenant = retired.tenant_id
    try:
        if tenant is None:
            raise LinkInvalid("no such job")
        signer.verify(
            job_id, tenant, request.query.get("exp", ""), request.query.get("sig", ""), time.time()
        )
    except (LinkInvalid, LinkExpired) as exc:
        raise _link_problem(exc) from None
    if retired is not None:
        raise gone(retired)
    assert job is not None
    return job


@app.page("/jobs/{job_id}/cancel")
class JobCancel(View):
    @problems
    async def post(self, request: web.Request, job_id: str) -> web.StreamResponse:
        tenant = authenticate(keyring, request)
        forwarded = await owned(request, job_id)
        if forwarded is not None:
            return forwarded
        job = load(job_id, tenant)
        if job.terminal:
            raise Problem(
                409,
                "job-final",
                "Job already final",
                f"job {job_id} is {job.status.value}",
                state=job.status.value,
            )
        cancel = CancelJob(
            command_id=f"http-cancel:{uuid.uuid4().hex}",
            job_id=job_id,
            at=datetime.now(UTC),
            tenant_id=tenant,
            reason="cancelled by client",
            source="http",
        )
        await (await send_command(job_id, encode(cancel)))
        return json_response(
            accepted_body(job_id, job.status.value, cancel_requested=True),
            status=202,
        )


@app.page("/providers")
class Providers(View):
    @problems
    async def get(self, request: web.Request) -> web.StreamResponse:
        authenticate(keyring, request)
        from domain.health import effective_circuit

        now = datetime.now(UTC)
        health = runtime.health.snapshot()
        providers = []
        for spec in runtime.catalogue.providers:
            observed = health.get(spec.name)
            providers.append(
                {
                    "name": spec.name,
                    "kind": spec.kind,
                    "enabled": spec.enabled,
                    "unavailable": (
                        runtime.unavailable[spec.name].reason
                        if spec.name in runtime.unavailable
                        else None
                    ),
                    "region": spec.region,
                    "models": [
                        {
                            "name": m.name,
                            "capabilities": m.capabilities,
                            "context_window": m.context_window,
                            "max_output_tokens": m.max_output_tokens,
                            "prices": m.prices.model_dump(mode="json") if m.prices else None,
                            "expected_latency_ms": m.expected_latency_ms,
                        }
                        for m in spec.models
                    ],
                    "health": {
                        "latency_ewma_ms": observed.latency_ewma_ms if observed else None,
                        "error_rate": observed.error_rate if observed else 0.0,
                        "samples": observed.samples if observed else 0,
                        "consecutive_failures": observed.consecutive_failures if observed else 0,
                        "updated_at": observed.updated_at.isoformat()
                        if observed and observed.updated_at
                        else None,
                        "circuit": effective_circuit(observed, now, runtime.policy.circuit)
                        if observed
                        else "closed",
                    },
                }
            )
        return json_response(
            {
                "catalogue_version": runtime.catalogue.version,
                "policy_version": runtime.policy.version,
                # Every worker folds every attempt outcome of the cluster (cp.health).
                "health_scope": "cluster",
                "health_as_of": runtime.health.as_of.isoformat() if runtime.health.as_of else None,
                "health_outcomes_folded": runtime.health.folded,
                "providers": providers,
            }
        )
