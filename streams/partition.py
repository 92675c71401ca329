"""What a worker holds of one job partition: live jobs decoded, everything else encoded in a store.

Live jobs are the working set and stay decoded in memory. Finished jobs, requests and retired-job
records stay encoded in the partition's store (RocksDB on local disk by default) until a read or a
late input needs one. A restore writes changelog records into the store in batches and rebuilds
the timers from record headers, without decoding a single job.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

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
    header_listing,
    header_time,
    key,
    split_key,
)
from tables.listing import Filter, ListingIndex, Position, merge, micros
from tables.store import MemoryStore, Store


@dataclass
class ViewCache:
    """What reads rendered of recent jobs (least recently read dropped first).

    The step that changes a job drops its entry (`Partition.keep`, `retire_job`), so an entry is
    always what the job's current state renders to.
    """

    capacity: int = 4096
    entries: OrderedDict[str, Any] = field(default_factory=OrderedDict)
    #: Told of every job whose state changed, cached here or not (the reader processes' views).
    changed: Callable[[str], None] | None = None

    def get(self, job_id: str) -> Any:
        entry = self.entries.get(job_id)
        if entry is not None:
            self.entries.move_to_end(job_id)
        return entry

    def put(self, job_id: str, entry: Any) -> None:
        self.entries[job_id] = entry
        self.entries.move_to_end(job_id)
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def drop(self, job_id: str) -> None:
        """The job's state changed: forget what it rendered to."""
        self.entries.pop(job_id, None)
        if self.changed is not None:
            self.changed(job_id)


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
    #: Each tenant's jobs held here (live and finished, not retired) by creation time.
    index: ListingIndex = field(default_factory=ListingIndex)
    #: Rendered status views of jobs read lately (api.views), dropped by each step.
    views: ViewCache = field(default_factory=ViewCache)

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
        self.views.drop(job.job_id)
        if job.terminal and row is not None:
            self.unwritten[key(ROW, job.job_id)] = row
            self.jobs.pop(job.job_id, None)
            self.requests.pop(job.job_id, None)
        else:
            self.jobs[job.job_id] = job
        self.index.put(job.job_id, job.tenant_id, micros(job.created_at), job.status.value)

    def retire_job(self, job_id: str, record: bytes | None) -> None:
        """Drop a finished job's row and request, keeping its retired record if given."""
        self.views.drop(job_id)
        self.jobs.pop(job_id, None)
        self.requests.pop(job_id, None)
        self.index.remove(job_id)
        self.wake.set(job_id, None)
        self.retire.set(job_id, None)
        self.unwritten.update(
            {key(ROW, job_id): None, key(REQUEST, job_id): None, key(RETIRED, job_id): record}
        )

    def purge_retired(self, job_id: str) -> None:
        self.unwritten[key(RETIRED, job_id)] = None

    def summary(self, job_id: str) -> dict[str, Any] | None:
        """What a listing shows of a job, without decoding a finished one into a `Job`."""
        job = self.jobs.get(job_id)
        if job is not None:
            data: dict[str, Any] = job.model_dump(
                mode="json", include={"job_id", "request_id", "status", "created_at", "updated_at"}
            )
            final = job.final.model_dump(mode="json") if job.final else None
        else:
            raw = self._get(key(ROW, job_id))
            if raw is None:
                return None
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return None  # unreadable: GET /jobs/{id} answers 500 for it; a listing skips it
            final = data.get("final")
        state = data.get("status")
        return {
            "job_id": job_id,
            "request_id": data.get("request_id"),
            "state": state,
            "terminal": state in ("COMPLETED", "FAILED", "CANCELLED", "EXPIRED"),
            "created_at": data.get("created_at"),
            "updated_at": data.get("updated_at"),
            "provider": final.get("provider") if final else None,
            "model": final.get("model") if final else None,
            "links": {
                "self": f"/jobs/{job_id}",
                "result": f"/jobs/{job_id}/result",
                "events": f"/jobs/{job_id}/events",
            },
        }

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
                self._index_row(job_id, value, headers)
            elif kind == RETIRED:
                self.purge.set(
                    job_id, header_time(headers, "retire") if value is not None else None
                )
        self.store.write(puts)

    def _index_row(self, job_id: str, value: bytes | None, headers: Any) -> None:
        """Keep the listing index in step with a restored row (decoded only without headers)."""
        if value is None:
            self.index.remove(job_id)
            return
        listed = header_listing(headers)
        if listed is None:  # a row written before rows had these headers
            try:
                data = orjson.loads(value)
                created = datetime.fromisoformat(data["created_at"])
                listed = (data["tenant_id"], micros(created), data["status"])
            except (ValueError, KeyError, TypeError):
                return  # unreadable: reads of it answer 500; a listing leaves it out
        self.index.put(job_id, *listed)

    def close(self) -> None:
        self.store.close()


def page_of(
    parts: dict[int, Partition],
    numbers: Iterable[int],
    *,
    tenant: str,
    where: Filter,
    before: Position | None,
    limit: int,
) -> tuple[list[tuple[Position, dict[str, Any]]], bool, list[int]]:
    """One page of a tenant's jobs over the given partitions held here, newest first.

    Returns (position, summary) of up to `limit` jobs, whether older ones follow, and the
    partitions of `numbers` that are not held here (the caller answers for their absence).
    Each partition walks at most `limit + 1` matching entries; only the `limit` kept are read.
    """
    missing: list[int] = []
    pages: list[list[Position]] = []
    where_from: dict[str, Partition] = {}
    more = False
    for number in sorted(set(numbers)):
        part = parts.get(number)
        if part is None:
            missing.append(number)
            continue
        found, left = part.index.page(tenant, where, before, limit)
        more = more or left
        pages.append(found)
        where_from.update((job_id, part) for _, job_id in found)
    kept, cut = merge(pages, limit)
    items = []
    for position in kept:
        summary = where_from[position[1]].summary(position[1])
        if summary is not None:
            items.append((position, summary))
    return items, more or cut, missing
