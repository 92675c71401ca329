"""Which partition a job lives on: murmur2 of its id, as the Java client and aiokafka place keys.

A module of its own so that a reader process (`api.reader`) places jobs as the job core does
without importing the job core.
"""

from __future__ import annotations

import functools

from aiokafka.partitioner import murmur2


@functools.lru_cache(maxsize=65536)
def partition_for(job_id: str, partitions: int) -> int:
    """The job's partition: murmur2 of its id, as the Java client and aiokafka compute it."""
    return int(murmur2(job_id.encode()) & 0x7FFFFFFF) % partitions
