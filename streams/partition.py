"""What a worker holds of one job partition: rows, requests, retired jobs and their timers.

Restored rows stay encoded until a step or a read needs them, so a restore costs one dict insert
per record and the timers come from record headers; decoded jobs are the live working set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from domain.job import Job
from domain.messages import JobRequest
from streams.runtime import WakeIndex
from tables.exceptions import StateCorrupted
from tables.jobs import (
    REQUEST,
    RETIRED,
    ROW,
    RetiredJob,
    decode_request,
    decode_retired,
    decode_row,
    header_time,
    split_key,
)


@dataclass
class Partition:
    number: int
    jobs: dict[str, Job] = field(default_factory=dict)
    rows: dict[str, bytes] = field(default_factory=dict)
    requests: dict[str, bytes | JobRequest] = field(default_factory=dict)
    retired: dict[str, bytes | RetiredJob] = field(default_factory=dict)
    #: Deadlines, backoffs and attempt timeouts of live jobs.
    wake: WakeIndex = field(default_factory=WakeIndex)
    #: When each finished job leaves the hot store; when each retired record is dropped.
    retire: WakeIndex = field(default_factory=WakeIndex)
    purge: WakeIndex = field(default_factory=WakeIndex)
    #: Records restored from the changelog (for the restore figures).
    restored: int = 0

    def __len__(self) -> int:
        return len(self.jobs) + len(self.rows)

    def job(self, job_id: str) -> Job | None:
        """Return the job, decoding its stored row on first use (raises StateCorrupted)."""
        job = self.jobs.get(job_id)
        if job is not None:
            return job
        raw = self.rows.get(job_id)
        if raw is None:
            return None
        job = decode_row(raw, self.request(job_id))
        if not job.terminal:
            self.jobs[job_id] = job
            del self.rows[job_id]
        return job

    def request(self, job_id: str) -> JobRequest:
        stored = self.requests.get(job_id)
        if isinstance(stored, JobRequest):
            return stored
        if stored is None:
            raise StateCorrupted(f"job {job_id} has a row but no stored request")
        request = decode_request(stored)
        self.requests[job_id] = request
        return request

    def retired_job(self, job_id: str) -> RetiredJob | None:
        stored = self.retired.get(job_id)
        if stored is None or isinstance(stored, RetiredJob):
            return stored
        record = decode_retired(stored)
        self.retired[job_id] = record
        return record

    def put(self, job: Job, row: bytes | None = None) -> None:
        """Keep a job after a step: live ones decoded, finished ones as their encoded row."""
        if job.terminal and row is not None:
            self.jobs.pop(job.job_id, None)
            self.rows[job.job_id] = row
        else:
            self.rows.pop(job.job_id, None)
            self.jobs[job.job_id] = job

    def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self.rows.pop(job_id, None)
        self.requests.pop(job_id, None)
        self.wake.set(job_id, None)
        self.retire.set(job_id, None)

    def apply_changelog(self, key: bytes, value: bytes | None, headers: object) -> None:
        """Fold one committed changelog record into the partition (restore)."""
        kind, job_id = split_key(key)
        self.restored += 1
        if kind == ROW:
            self.jobs.pop(job_id, None)
            if value is None:
                self.rows.pop(job_id, None)
                self.wake.set(job_id, None)
                self.retire.set(job_id, None)
                return
            self.rows[job_id] = value
            self.wake.set(job_id, header_time(headers, "wake"))
            self.retire.set(job_id, header_time(headers, "retire"))
        elif kind == REQUEST:
            if value is None:
                self.requests.pop(job_id, None)
            else:
                self.requests[job_id] = value
        elif kind == RETIRED:
            if value is None:
                self.retired.pop(job_id, None)
                self.purge.set(job_id, None)
            else:
                self.retired[job_id] = value
                self.purge.set(job_id, header_time(headers, "retire"))
