"""Job and attempt states and the one table of legal job transitions."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    CREATED = "CREATED"
    ROUTED = "ROUTED"
    DISPATCHED = "DISPATCHED"
    STARTED = "STARTED"
    RETRYING = "RETRYING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


class AttemptStatus(StrEnum):
    DISPATCHED = "DISPATCHED"
    STARTED = "STARTED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    CANCELLED = "CANCELLED"

    @property
    def live(self) -> bool:
        return self in (AttemptStatus.DISPATCHED, AttemptStatus.STARTED)


TERMINAL = frozenset(
    {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED}
)

_ENDINGS = frozenset({JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED})

#: Every legal job transition. A fallback re-routes (STARTED/DISPATCHED -> ROUTED -> DISPATCHED);
#: a retry waits in RETRYING, then dispatches the same target again.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.CREATED: frozenset({JobStatus.ROUTED}) | _ENDINGS,
    JobStatus.ROUTED: frozenset({JobStatus.DISPATCHED}) | _ENDINGS,
    JobStatus.DISPATCHED: frozenset(
        {JobStatus.STARTED, JobStatus.COMPLETED, JobStatus.RETRYING, JobStatus.ROUTED}
    )
    | _ENDINGS,
    JobStatus.STARTED: frozenset({JobStatus.COMPLETED, JobStatus.RETRYING, JobStatus.ROUTED})
    | _ENDINGS,
    JobStatus.RETRYING: frozenset({JobStatus.DISPATCHED, JobStatus.ROUTED}) | _ENDINGS,
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
    JobStatus.EXPIRED: frozenset(),
}


def can_transition(current: JobStatus, target: JobStatus) -> bool:
    return target in TRANSITIONS[current]
