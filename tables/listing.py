"""Listing a tenant's jobs newest first: each partition's in-memory index, cursors and the merge.

Each partition keeps, per tenant and state, its jobs' positions `(created_at µs, job_id)` in an
ascending list, and per job its (tenant, position, state). The index is local and derived: the
core keeps it up to date on every step and retirement, and a restore rebuilds it from the row
records' headers (`tenant`, `created`, `state`) without decoding a job. A page of one partition is
two bisections per state list the filter selects and a merge of `limit + 1` entries, whatever the
number of jobs held; a page across partitions merges every partition's page and keeps the newest
`limit`.

A cursor is the position of the last entry of a page: the next page holds what is strictly older,
so a job created meanwhile never shifts the pages (it is newer than every cursor).
"""

from __future__ import annotations

import base64
import binascii
import heapq
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice

from domain.lifecycle import TERMINAL, JobStatus

#: (created_at in µs since the epoch, job_id): the order of a listing, newest last.
Position = tuple[int, str]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STATES = {status.value for status in JobStatus}
#: The state filter's groups, besides each lifecycle state.
STATE_GROUPS = {
    "open": frozenset(_STATES - {s.value for s in TERMINAL}),
    "terminal": frozenset(s.value for s in TERMINAL),
}


def micros(at: datetime) -> int:
    """Exact microseconds since the epoch (no float rounding)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return (at - _EPOCH) // timedelta(microseconds=1)


def states_for(name: str) -> frozenset[str]:
    """The states a `state=` filter value selects; raises ValueError for an unknown one."""
    if name in STATE_GROUPS:
        return STATE_GROUPS[name]
    if name.upper() in _STATES:
        return frozenset({name.upper()})
    raise ValueError(name)


@dataclass(frozen=True)
class Filter:
    """What a listing keeps: states (None: all), created_at in [since, until) in µs."""

    states: frozenset[str] | None = None
    since: int | None = None
    until: int | None = None


class ListingIndex:
    """One partition's jobs per tenant and state, each list ordered by creation."""

    def __init__(self) -> None:
        #: tenant -> state -> ascending positions
        self.by_tenant: dict[str, dict[str, list[Position]]] = {}
        #: job_id -> (tenant, created µs, state)
        self.listed: dict[str, tuple[str, int, str]] = {}

    def __len__(self) -> int:
        return len(self.listed)

    def put(self, job_id: str, tenant: str, created: int, state: str) -> None:
        entry = (tenant, created, state)
        known = self.listed.get(job_id)
        if known == entry:
            return
        if known is not None:
            self._drop(job_id, known)
        self.listed[job_id] = entry
        entries = self.by_tenant.setdefault(tenant, {}).setdefault(state, [])
        position = (created, job_id)
        if not entries or entries[-1] < position:
            entries.append(position)  # the usual case: the newest job of its state
        else:
            insort(entries, position)

    def remove(self, job_id: str) -> None:
        known = self.listed.pop(job_id, None)
        if known is not None:
            self._drop(job_id, known)

    def _drop(self, job_id: str, known: tuple[str, int, str]) -> None:
        tenant, created, state = known
        lists = self.by_tenant.get(tenant, {})
        entries = lists.get(state)
        if not entries:
            return
        at = bisect_left(entries, (created, job_id))
        if at < len(entries) and entries[at] == (created, job_id):
            del entries[at]
        if not entries:
            del lists[state]
            if not lists:
                del self.by_tenant[tenant]

    def page(
        self, tenant: str, where: Filter, before: Position | None, limit: int
    ) -> tuple[list[Position], bool]:
        """Up to `limit` positions older than `before`, newest first, and whether more follow.

        Per state list of the tenant that the filter selects: two bisections, then a merge that
        reads `limit + 1` entries in all (a state filter never walks the other states' jobs).
        """
        lists = self.by_tenant.get(tenant)
        if not lists or limit <= 0:
            return [], False
        states = lists.keys() if where.states is None else where.states & lists.keys()
        runs: list[Iterator[Position]] = []
        for state in states:
            entries = lists[state]
            high = len(entries) if before is None else bisect_left(entries, before)
            if where.until is not None:
                high = min(high, bisect_left(entries, (where.until, "")))
            low = 0 if where.since is None else bisect_left(entries, (where.since, ""))
            if high > low:
                runs.append(_backwards(entries, low, high))
        found = list(islice(heapq.merge(*runs, reverse=True), limit + 1))
        return found[:limit], len(found) > limit


def _backwards(entries: list[Position], low: int, high: int) -> Iterator[Position]:
    for at in range(high - 1, low - 1, -1):
        yield entries[at]


def merge(pages: Iterable[list[Position]], limit: int) -> tuple[list[Position], bool]:
    """The newest `limit` of several newest-first pages, and whether some were left out."""
    merged = list(heapq.merge(*pages, reverse=True))
    return merged[:limit], len(merged) > limit


def encode_cursor(position: Position) -> str:
    raw = f"{position[0]}:{position[1]}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    """The position a cursor names; raises ValueError when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError("not a cursor") from exc
    created, sep, job_id = raw.partition(":")
    if not sep or not job_id or not created.isdigit() or len(created) > 20:
        raise ValueError("not a cursor")
    return int(created), job_id
