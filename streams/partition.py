"""What a worker holds of one job partition: live jobs decoded, everything else encoded in a store.

Live jobs are the working set and stay decoded in memory. Finished jobs, requests and retired-job
records stay encoded in the partition's store (RocksDB on local disk by default) until a read or a
late input needs one. A restore writes changelog records into the store in batches and rebuilds
the timers from record headers, without decoding a single job.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from domain.job import Job
from domain.messages import JobRequest
from streams.runtime import WakeIndex
from tables.exceptions import StateCorrupted
from tables.jobs import (
    OFFSET,
    REQUEST,
    RETIRED,
    ROW,
    RetiredJob,
    decode_request,
    decode_retired,
    decode_row,
    header_time,
    key,
    split_key,
)
from tables.store import MemoryStore, Store


@dataclass
class Partition:
    number: int
    store: Store = field(default_factory=MemoryStore)
    #: Live jobs and their requests, decoded.
    jobs: dict[str, Job] = field(default_factory=dict)
    requests: dict[str, JobRequest] = field(default_factory=dict)
    #: Deadlines, backoffs and attempt timeouts of live jobs.
    wake: WakeIndex = field(default_factory=WakeIndex)
    #: When each finished job leaves the store; when each retired record is dropped.
    retire: WakeIndex = field(default_factory=WakeIndex)
    purge: WakeIndex = field(default_factory=WakeIndex)
    #: Changelog records read by the restore, and the jobs they left (rows less tombstones).
    restored: int = 0
    held: int = 0
    #: Where each input topic's partition resumes, as the restored changelog says.
    offsets: dict[str, int] = field(default_factory=dict)
    #: Store writes of this turn, written in one batch by `flush` (reads see them at once).
    unwritten: dict[bytes, bytes | None] = field(default_factory=dict)

    def _get(self, raw_key: bytes) -> bytes | None:
        if raw_key in self.unwritten:
            return self.unwritten[raw_key]
        return self.store.get(raw_key)

    def flush(self) -> None:
        if self.unwritten:
            self.store.write(list(self.unwritten.items()))
            self.unwritten.clear()

    def job(self, job_id: str) -> Job | None:
        """Return the job, decoding its stored row on first use (raises StateCorrupted)."""
        job = self.jobs.get(job_id)
        if job is not None:
            return job
        raw = self._get(key(ROW, job_id))
        if raw is None:
            return None
        job = decode_row(raw, self.request(job_id))
        if not job.terminal:
            self.jobs[job_id] = job
            self.requests[job_id] = job.request
        return job

    def request(self, job_id: str) -> JobRequest:
        request = self.requests.get(job_id)
        if request is not None:
            return request
        raw = self._get(key(REQUEST, job_id))
        if raw is None:
            raise StateCorrupted(f"job {job_id} has a row but no stored request")
        return decode_request(raw)

    def retired_job(self, job_id: str) -> RetiredJob | None:
        raw = self._get(key(RETIRED, job_id))
        return None if raw is None else decode_retired(raw)

    def add_request(self, job_id: str, request: JobRequest, raw: bytes) -> None:
        self.requests[job_id] = request
        self.unwritten[key(REQUEST, job_id)] = raw

    def keep(self, job: Job, row: bytes | None = None) -> None:
        """Keep a job after a step: live ones decoded, finished ones as their encoded row."""
        if job.terminal and row is not None:
            self.unwritten[key(ROW, job.job_id)] = row
            self.jobs.pop(job.job_id, None)
            self.requests.pop(job.job_id, None)
        else:
            self.jobs[job.job_id] = job

    def retire_job(self, job_id: str, record: bytes | None) -> None:
        """Drop a finished job's row and request, keeping its retired record if given."""
        self.jobs.pop(job_id, None)
        self.requests.pop(job_id, None)
        self.wake.set(job_id, None)
        self.retire.set(job_id, None)
        self.unwritten.update(
            {key(ROW, job_id): None, key(REQUEST, job_id): None, key(RETIRED, job_id): record}
        )

    def purge_retired(self, job_id: str) -> None:
        self.unwritten[key(RETIRED, job_id)] = None

    def stored(self, kind: str) -> dict[str, bytes]:
        """Every stored record of one kind (for tests and tools: it reads the whole store)."""
        self.flush()
        prefix = f"{kind}:".encode()
        found = {}
        for raw_key in self.store.keys(prefix):
            value = self.store.get(raw_key)
            if value is not None:
                found[raw_key.decode()[len(prefix) :]] = value
        return found

    def apply_changelog(self, records: Iterable[tuple[bytes, bytes | None, Any]]) -> None:
        """Fold committed changelog records (key, value, headers) into the partition (restore)."""
        puts: list[tuple[bytes, bytes | None]] = []
        for raw_key, value, headers in records:
            kind, job_id = split_key(raw_key)
            self.restored += 1
            if kind == OFFSET:
                if value is not None:
                    self.offsets[job_id] = int(value)
                continue
            puts.append((raw_key, value))
            if kind == ROW:
                self.jobs.pop(job_id, None)
                self.requests.pop(job_id, None)
                self.held += -1 if value is None else 1
                wake = header_time(headers, "wake") if value is not None else None
                retire = header_time(headers, "retire") if value is not None else None
                self.wake.set(job_id, wake)
                self.retire.set(job_id, retire)
            elif kind == RETIRED:
                self.purge.set(
                    job_id, header_time(headers, "retire") if value is not None else None
                )
        self.store.write(puts)

    def close(self) -> None:
        self.store.close()
