"""Errors as `application/problem+json` (RFC 9457) with a stable `type` per kind of problem."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

PROBLEM_BASE = "https://prompt-gateway.dev/problems/"
PROBLEM_TYPE = "application/problem+json"

log = logging.getLogger(__name__)


class Problem(Exception):
    """Raise from a view to answer with a problem document."""

    def __init__(
        self,
        status: int,
        kind: str,
        title: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def document(self) -> bytes:
        """The problem document (RFC 9457), as JSON."""
        return orjson.dumps(
            {
                "type": PROBLEM_BASE + self.kind,
                "title": self.title,
                "status": self.status,
                "detail": self.detail,
                **self.extra,
            }
        )

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=self.document(),
            content_type=PROBLEM_TYPE,
            headers=self.headers,
        )


def not_found(job_id: str) -> Problem:
    # The same answer for a missing job and another tenant's job: ids are not enumerable.
    return Problem(404, "job-not-found", "Job not found", f"no job {job_id}")


def too_large(limit: int) -> Problem:
    return Problem(413, "request-too-large", "Request too large", f"the body is over {limit} bytes")


def unavailable(reason: str, retry_after: int = 2) -> Problem:
    return Problem(
        503,
        "unavailable",
        "Temporarily unavailable",
        reason,
        headers={"Retry-After": str(retry_after)},
    )


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=headers,
    )


#: Problem types of the errors aiohttp raises itself (routing, body reading).
_HTTP_KINDS = {
    400: "bad-request",
    404: "not-found",
    405: "method-not-allowed",
    413: "request-too-large",
}


@web.middleware
async def problem_documents(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error answered as problem+json: unknown routes and methods too, and a bug is a 500
    problem document (logged with its traceback), never aiohttp's text/plain page."""
    try:
        return await handler(request)
    except Problem as problem:
        return problem.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        detail = {
            404: f"no route {request.path}",
            405: f"{request.method} is not allowed on {request.path}"
            + (f"; use {headers['Allow']}" if "Allow" in headers else ""),
        }.get(exc.status, exc.text or exc.reason)
        return Problem(
            exc.status,
            _HTTP_KINDS.get(exc.status, "http-error"),
            exc.reason,
            detail,
            headers=headers,
        ).response()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in a view", extra={"event": "http.error"})
        return Problem(
            500, "internal", "Internal error", "the server failed; the error is logged"
        ).response()
