"""OpenAI-compatible front door: `POST /v1/chat/completions` (non-streaming) and `GET /v1/models`.

The official `openai` SDK pointed at a worker (`base_url="http://host:6066/v1"`, `api_key=` a key
of CP_API_KEYS) gets OpenAI-shaped answers. A completion is a job: submitted like `POST /jobs`, on
the worker that owns the job's partition (forwarded there when it is elsewhere), then awaited up
to `?wait=N` seconds (60 by default) and answered as a ChatCompletion, with the job id in
`X-Job-Id`. An `Idempotency-Key` header names the job: the same key and body is the same job, the
same key with another body a 409. Every answer on /v1, errors included, is in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar, cast

import orjson
from aiohttp import web
from faust.web import View
from multidict import CIMultiDict
from opentelemetry.trace import SpanKind

from api.auth import authenticate
from api.openai_shapes import (
    SHOULD_RETRY_HEADER,
    OpenAIError,
    completion_body,
    failure,
    find_model,
    from_problem,
    job_headers,
    job_request,
    model_list,
    request_id_for,
    still_running,
    wait_seconds,
)
from api.problems import Problem, json_response
from api.routing import FORWARDED, forward, owner
from api.views import _known, _read_body, _submit, gone, keyring, stored
from domain.ids import job_id_for
from domain.job import Job
from streams.app import app, core, runtime
from streams.tracing import from_headers, span

log = logging.getLogger(__name__)

#: The request id a forwarding worker chose for a completion sent without an Idempotency-Key, so
#: that the owner runs the job the forwarder routed by.
REQUEST_ID_HEADER = "X-CP-Request-Id"
#: Time a forwarded completion gets beyond its wait: the submit and the answer's way back.
FORWARD_MARGIN_S = 15.0

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[web.StreamResponse]])


def openai_errors(handler: Handler) -> Handler:
    """Answer OpenAIErrors, Problems (auth, body size, rebalancing) and bugs in OpenAI's shape."""

    @wraps(handler)
    async def wrapped(self: View, request: web.Request, **kwargs: Any) -> web.StreamResponse:
        try:
            return await handler(self, request, **kwargs)
        except OpenAIError as error:
            return error.response()
        except Problem as problem:
            return from_problem(problem).response()
        except Exception:
            log.exception("view failed", extra={"event": "api.error", "path": request.path})
            return OpenAIError(500, "the server failed; the error is logged").response()

    return cast(Handler, wrapped)


class _V1View(View):
    """A /v1 route: a method it does not serve is a 405 in OpenAI's shape, not problem+json."""

    async def get(self, request: web.Request, **kwargs: Any) -> web.StreamResponse:
        return self.unserved(request)

    async def post(self, request: web.Request, **kwargs: Any) -> web.StreamResponse:
        return self.unserved(request)

    async def put(self, request: web.Request, **kwargs: Any) -> web.StreamResponse:
        return self.unserved(request)

    async def patch(self, request: web.Request, **kwargs: Any) -> web.StreamResponse:
        return self.unserved(request)

    async def delete(self, request: web.Request, **kwargs: Any) -> web.StreamResponse:
        return self.unserved(request)

    def unserved(self, request: web.Request) -> web.Response:
        served = [
            name.upper()
            for name in ("get", "post")
            if getattr(type(self), name) is not getattr(_V1View, name)
        ]
        return OpenAIError(
            405,
            f"{request.method} is not allowed on {request.path}; use {', '.join(served)}",
            code="method_not_allowed",
            headers={"Allow": ", ".join(served)},
        ).response()


@app.page("/v1/chat/completions")
class ChatCompletions(_V1View):
    @openai_errors
    async def post(self, request: web.Request, **kwargs: Any) -> web.StreamResponse:
        tenant = authenticate(keyring, request)
        if request.content_type != "application/json":
            raise OpenAIError(
                415, "send the request as application/json", code="unsupported_media_type"
            )
        wait = wait_seconds(request.query.get("wait"))
        body = await _read_body(request)
        key = _idempotency_key(request)
        request_id = _request_id(request, key)
        payload = job_request(
            _json_object(body),
            tenant=tenant,
            request_id=request_id,
            catalogue=runtime.catalogue,
            unavailable=runtime.unavailable,
        )
        job_id = job_id_for(tenant, request_id)
        dest = owner(job_id)
        if dest is not None:
            if key is None:
                headers = CIMultiDict(request.headers)
                headers[REQUEST_ID_HEADER] = request_id
                request = request.clone(headers=headers)
            return await forward(request, dest, body=body, timeout_s=wait + FORWARD_MARGIN_S)

        fingerprint = payload.fingerprint()
        known = _known(job_id)
        if known is not None and known[0] != fingerprint:
            raise OpenAIError(
                409,
                f"Idempotency-Key {key or request_id!r} was already used for another request "
                f"(job {job_id}); use a new key for a new request",
                code="idempotency_key_reused",
                param="Idempotency-Key",
                job_id=job_id,
                headers={SHOULD_RETRY_HEADER: "false"},
            )
        if known is None:
            parent = from_headers(
                [(k, v.encode("utf-8", "surrogateescape")) for k, v in request.headers.items()]
            )
            with span(
                "http.submit", parent, kind=SpanKind.SERVER, job_id=job_id, tenant_id=tenant
            ) as trace:
                await _submit(
                    job_id=job_id,
                    tenant=tenant,
                    fingerprint=fingerprint,
                    payload=payload,
                    trace=trace,
                    location={"Location": f"/jobs/{job_id}"},
                )
        job = await _wait_final(job_id, wait)
        if job is None or job.final is None:
            state = job.status.value if job is not None else "ACCEPTED"
            raise still_running(job_id, state, wait, idempotent=key is not None)
        if job.final.state != "COMPLETED":
            raise failure(job.final, idempotent=key is not None)
        return json_response(completion_body(job.final), headers=job_headers(job_id))


def _idempotency_key(request: web.Request) -> str | None:
    raw = request.headers.get("Idempotency-Key")
    if raw is None:
        return None
    if not raw.strip():
        raise OpenAIError(400, "the Idempotency-Key header is empty", param="Idempotency-Key")
    return raw.strip()


def _request_id(request: web.Request, key: str | None) -> str:
    """From the client's key; else the forwarder's choice; else a new one (a new job)."""
    if key is not None:
        return request_id_for(key)
    chosen = request.headers.get(REQUEST_ID_HEADER) if request.headers.get(FORWARDED) else None
    return request_id_for(chosen) if chosen else uuid.uuid4().hex


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OpenAIError(400, f"the body is not JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the body must be a JSON object", code="invalid_json")
    return data


async def _wait_final(job_id: str, wait: float) -> Job | None:
    """The job once final, or as it is when `wait` runs out (None if not applied yet).

    Like `GET /jobs/{id}/result?wait=N`: a partition that moves meanwhile answers 503.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        job = stored(job_id)
        if job is None:
            retired = core.retired(job_id)
            if retired is not None:
                raise gone(retired)
        elif job.final is not None:
            return job
        remaining = deadline - loop.time()
        if remaining <= 0:
            return job
        await core.wait_final(job_id, min(remaining, 1.0))
        owner(job_id)


@app.page("/v1/models")
class Models(_V1View):
    @openai_errors
    async def get(self, request: web.Request, **kwargs: Any) -> web.StreamResponse:
        authenticate(keyring, request)
        return json_response(model_list(runtime.catalogue, runtime.unavailable))


@app.page("/v1/models/{model:.+}")
class Model(_V1View):
    @openai_errors
    async def get(self, request: web.Request, **kwargs: Any) -> web.StreamResponse:
        authenticate(keyring, request)
        model = request.match_info["model"]
        return json_response(find_model(model, runtime.catalogue, runtime.unavailable))


@app.page("/v1/{path:.*}")
class V1Unknown(_V1View):
    """Any other /v1 path: a 404 in OpenAI's shape (registered last: the routes above win)."""

    def unserved(self, request: web.Request) -> web.Response:
        return OpenAIError(404, f"no route {request.path}", code="unknown_url").response()
