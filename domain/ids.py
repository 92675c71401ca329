"""Deterministic identifiers: the same request always names the same job and attempts."""

from __future__ import annotations

import base64
import hashlib


def job_id_for(tenant_id: str, request_id: str) -> str:
    """Derive the job id from (tenant_id, request_id), so a re-sent request is the same job."""
    digest = hashlib.sha256(f"{tenant_id}\x00{request_id}".encode()).digest()
    return "job_" + base64.b32encode(digest[:15]).decode().lower()


def attempt_id_for(job_id: str, attempt_no: int) -> str:
    return f"{job_id}-a{attempt_no}"


def idempotency_key(job_id: str, attempt_id: str) -> str:
    """Key a provider worker uses to run an attempt at most once: `job_id:attempt_id`."""
    return f"{job_id}:{attempt_id}"
