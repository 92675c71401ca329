"""Let a busy consumer's fetches gather records; keep a quiet one answering at once.

A fetch the broker answers with the first record that arrives (`fetch.min.bytes` 1) costs the
same whether it carries one record or fifty: the request and response, the event-loop wake-up,
the step's flush, a transaction. At a moderate rate each record comes alone, and those fixed
costs are most of a job's CPU (bench/results.md: ~10 ms per job at a steady 150 jobs/s against
~2.5 in a burst). Asking the broker to gather for a few ms shares them, at the price of that
wait on each hop; it pays only once records come faster than one per wait, so below that rate
the consumer keeps asking for the first record.

aiokafka reads `fetch_min_bytes` and `fetch_max_wait_ms` from its fetcher for every request it
builds, so they can change between fetches (a fetch already waiting at the broker keeps its own).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from streams.settings import Settings

#: How often the rate is measured and the fetch settings chosen (seconds).
WINDOW_S = 0.5
#: A gathering fetch answers at once when this much is waiting (more than any gather window
#: holds at the rates where gathering is on, so in practice the wait decides).
GATHER_MIN_BYTES = 1024 * 1024
#: Gathering starts when this many records would come in one gather window.
RECORDS_PER_GATHER = 2.0


class FetchPacer:
    """Switch a consumer between answering at once and gathering for `gather_ms`, by its rate."""

    def __init__(
        self,
        consumer: Any,
        *,
        idle_wait_ms: int,
        gather_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self.idle_wait_ms = idle_wait_ms
        self.clock = clock
        self.since = clock()
        self.records = 0
        self.gathering = False
        self.gather_ms = 0
        self.threshold = float("inf")
        self.set_gather(gather_ms)

    @classmethod
    def of(cls, consumer: Any, settings: Settings) -> FetchPacer:
        """The pacer of a consumer that waits `CP_FETCH_MAX_WAIT_MS` idle and gathers for
        `CP_FETCH_GATHER_MS` (the job core's and the provider worker's)."""
        return cls(
            consumer, idle_wait_ms=settings.fetch_max_wait_ms, gather_ms=settings.fetch_gather_ms
        )

    def set_gather(self, gather_ms: int) -> None:
        """Gather for `gather_ms` from the next fetch on (when gathering)."""
        self.gather_ms = gather_ms
        #: Records per second from which a gather window holds RECORDS_PER_GATHER records.
        self.threshold = RECORDS_PER_GATHER * 1000 / gather_ms if gather_ms else float("inf")
        if self.gathering:
            self.gathering = bool(gather_ms)
            self.apply()

    def observe(self, records: int) -> None:
        """Count what a poll brought; every WINDOW_S, choose how the next fetches wait."""
        self.records += records
        now = self.clock()
        elapsed = now - self.since
        if elapsed < WINDOW_S:
            return
        self.gathering = self.records / elapsed >= self.threshold
        self.since, self.records = now, 0
        self.apply()

    def apply(self) -> None:
        fetcher = getattr(self.consumer, "_fetcher", None)
        if fetcher is None:  # not started yet: the next window applies it
            return
        if self.gathering:
            fetcher._fetch_min_bytes = GATHER_MIN_BYTES
            fetcher._fetch_max_wait_ms = self.gather_ms
        else:
            fetcher._fetch_min_bytes = 1
            fetcher._fetch_max_wait_ms = self.idle_wait_ms
