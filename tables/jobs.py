"""The job table: job_id -> Job, stored as JSON bytes (faust tables cannot hold pydantic models)."""

from __future__ import annotations

from pydantic import ValidationError

from domain.job import Job
from tables.exceptions import StateCorrupted

TABLE_NAME = "jobs"


def encode_job(job: Job) -> bytes:
    return job.model_dump_json().encode()


def decode_job(raw: bytes | None) -> Job | None:
    """Read a stored job; None when the table has no value for the key."""
    if raw is None:
        return None
    try:
        return Job.model_validate_json(raw)
    except (ValidationError, TypeError, ValueError) as exc:
        raise StateCorrupted(f"stored job ({type(raw).__name__}) cannot be decoded: {exc}") from exc
