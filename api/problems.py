"""Errors as `application/problem+json` (RFC 9457) with a stable `type` per kind of problem."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

PROBLEM_BASE = "https://prompt-gateway.dev/problems/"


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

    def response(self) -> web.Response:
        body = {
            "type": PROBLEM_BASE + self.kind,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }
        return web.Response(
            status=self.status,
            body=orjson.dumps(body),
            content_type="application/problem+json",
            headers=self.headers,
        )


def not_found(job_id: str) -> Problem:
    # The same answer for a missing job and another tenant's job: ids are not enumerable.
    return Problem(404, "job-not-found", "Job not found", f"no job {job_id}")


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
