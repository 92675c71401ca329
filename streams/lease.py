"""How long a worker may still take itself for a member of the job core's consumer group.

The group coordinator drops a member that it has not heard from for the session timeout, and
gives its partitions to the others. A worker that was paused (SIGSTOP, a long GC, a stalled VM)
past that timeout does not know it yet when it runs again: until its next heartbeat fails, its
memory still holds jobs that another worker has moved on since. Its writes are fenced by the
partitions' transactions; its reads are fenced here.

A member's lease runs for `fraction` of the session timeout from when a request that the
coordinator confirmed was *sent* (it received it later, so it cannot have dropped the member
before the lease ends), and only for the generation whose assignment the worker has applied:

- a heartbeat of that generation renews it (answered "rebalancing" too: the coordinator then
  waits for the member to rejoin, and it revokes before it does);
- a join confirms nothing the worker holds: a worker dropped while paused rejoins with the state
  of its old generation still in memory;
- a sync starts the lease of its generation once the worker has applied that assignment
  (`applied`), having dropped what it no longer owns.

A worker answers for its partitions only while its lease holds (`JobCore.serves`), and its
reader processes serve views only until the lease it last told them of (`api.readhub`); both
clocks are the host's CLOCK_MONOTONIC, which is the same in every process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

#: Kafka API keys of the group requests whose success confirms the membership.
JOIN_GROUP, HEARTBEAT, SYNC_GROUP = 11, 12, 14
#: A heartbeat answered "rebalancing": the member is still in the group, and the coordinator
#: waits for it to rejoin (it revokes its partitions first) before anyone else gets them.
REBALANCE_IN_PROGRESS = 27
#: Part of the session timeout the lease lasts, leaving room for the coordinator's clock.
FRACTION = 0.8


class MembershipLease:
    """Renewed by the group coordinator's confirmations (`watch`); `holds()` while in force."""

    def __init__(self, session_timeout_s: float, fraction: float = FRACTION) -> None:
        if session_timeout_s <= 0 or not 0 < fraction < 1:
            raise ValueError("a lease needs a positive session timeout and 0 < fraction < 1")
        self.length = session_timeout_s * fraction
        #: CLOCK_MONOTONIC time the lease ends (never renewed: it does not hold).
        self.until = float("-inf")
        #: The generation whose assignment the worker applied (None: none yet).
        self.generation: int | None = None
        #: (generation, sent at) of the last sync the coordinator confirmed.
        self.synced: tuple[int, float] | None = None

    def holds(self) -> bool:
        return time.monotonic() < self.until

    def lapsed_for(self) -> float:
        """Seconds since the lease ended (0 while it holds)."""
        return max(0.0, time.monotonic() - self.until)

    def confirmed(
        self, api_key: int, error_code: int | None, generation: int, sent_at: float
    ) -> None:
        """The coordinator answered a group request of `generation` sent at `sent_at`."""
        if not confirms(api_key, error_code):
            return
        if api_key == SYNC_GROUP:
            self.synced = (generation, sent_at)
        elif api_key == HEARTBEAT and generation == self.generation:
            self.until = max(self.until, sent_at + self.length)

    def applied(self, generation: int) -> None:
        """The worker now holds the assignment of `generation` and nothing older."""
        self.generation = generation
        synced = self.synced
        self.until = synced[1] + self.length if synced and synced[0] == generation else -math.inf

    def watch(self, coordinator: Any) -> None:
        """Feed the lease every answer to a group request of `coordinator`.

        aiokafka (pinned) sends heartbeats, joins and syncs through the coordinator's
        `_send_req`, built from its `generation` at the time; this wraps that one method of this
        one instance.
        """
        send: Callable[[Any], Awaitable[Any]] = coordinator._send_req

        async def send_and_renew(request: Any) -> Any:
            sent_at = time.monotonic()
            generation = coordinator.generation
            response = await send(request)
            self.confirmed(
                request.API_KEY, getattr(response, "error_code", None), generation, sent_at
            )
            return response

        coordinator._send_req = send_and_renew


def confirms(api_key: int, error_code: int | None) -> bool:
    """Whether an answer to a group request says the member is (still) in the group."""
    if api_key in (JOIN_GROUP, SYNC_GROUP):
        return error_code == 0
    if api_key == HEARTBEAT:
        return error_code in (0, REBALANCE_IN_PROGRESS)
    return False
