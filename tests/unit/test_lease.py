"""The membership lease: what renews it, what does not, and how it ends (streams.lease)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from streams.lease import (
    HEARTBEAT,
    JOIN_GROUP,
    REBALANCE_IN_PROGRESS,
    SYNC_GROUP,
    MembershipLease,
    confirms,
)

UNKNOWN_MEMBER_ID, ILLEGAL_GENERATION = 25, 22


def test_answers_that_confirm_the_membership() -> None:
    assert confirms(HEARTBEAT, 0) and confirms(HEARTBEAT, REBALANCE_IN_PROGRESS)
    assert not confirms(HEARTBEAT, UNKNOWN_MEMBER_ID) and not confirms(
        HEARTBEAT, ILLEGAL_GENERATION
    )
    assert confirms(JOIN_GROUP, 0) and confirms(SYNC_GROUP, 0)
    assert not confirms(SYNC_GROUP, REBALANCE_IN_PROGRESS)
    assert not confirms(8, 0)  # an offset commit says nothing here
    assert not confirms(HEARTBEAT, None)


def test_no_lease_before_an_assignment_is_applied() -> None:
    lease = MembershipLease(10.0)
    now = time.monotonic()
    lease.confirmed(JOIN_GROUP, 0, 1, now)
    lease.confirmed(HEARTBEAT, 0, 1, now)
    assert not lease.holds()
    lease.confirmed(SYNC_GROUP, 0, 1, now)
    assert not lease.holds()  # synced, but the worker has not applied it yet
    lease.applied(1)
    assert lease.holds()
    assert lease.until == pytest.approx(now + 8.0)


def test_heartbeats_of_the_applied_generation_renew_it_from_when_they_were_sent() -> None:
    lease = MembershipLease(10.0, fraction=0.5)
    now = time.monotonic()
    lease.confirmed(SYNC_GROUP, 0, 4, now - 20)
    lease.applied(4)
    assert not lease.holds()  # synced 20 s ago: 5 s of lease long gone
    lease.confirmed(HEARTBEAT, UNKNOWN_MEMBER_ID, 4, now)
    assert not lease.holds()
    lease.confirmed(HEARTBEAT, 0, 3, now)  # an older generation's answer
    assert not lease.holds()
    lease.confirmed(HEARTBEAT, REBALANCE_IN_PROGRESS, 4, now - 1)
    assert lease.holds() and lease.until == pytest.approx(now + 4)
    lease.confirmed(HEARTBEAT, 0, 4, now - 3)  # answered late: never shortens it
    assert lease.until == pytest.approx(now + 4)


def test_a_worker_dropped_while_paused_is_not_renewed_by_rejoining() -> None:
    """Paused past its session: its heartbeat fails, it joins again (still holding the old
    generation's jobs in memory) and only the applied new assignment gives it a lease again."""
    lease = MembershipLease(6.0)
    paused_at = time.monotonic() - 8.0
    lease.confirmed(SYNC_GROUP, 0, 1, paused_at - 30)
    lease.applied(1)
    lease.confirmed(HEARTBEAT, 0, 1, paused_at)
    assert not lease.holds()  # 8 s paused > 4.8 s of lease
    now = time.monotonic()
    lease.confirmed(HEARTBEAT, UNKNOWN_MEMBER_ID, 1, now)
    lease.confirmed(JOIN_GROUP, 0, 1, now)
    lease.confirmed(SYNC_GROUP, 0, 3, now)
    assert not lease.holds()
    lease.applied(3)
    assert lease.holds()


def test_a_new_assignment_without_its_sync_holds_nothing() -> None:
    lease = MembershipLease(10.0)
    now = time.monotonic()
    lease.confirmed(SYNC_GROUP, 0, 1, now)
    lease.applied(1)
    assert lease.holds()
    lease.applied(2)  # the old generation's lease does not carry over
    assert not lease.holds() and lease.lapsed_for() > 0


def test_refuses_a_lease_that_cannot_hold() -> None:
    with pytest.raises(ValueError, match="lease"):
        MembershipLease(0)
    with pytest.raises(ValueError, match="lease"):
        MembershipLease(10, fraction=1.0)


@dataclass
class Request:
    API_KEY: int


@dataclass
class Response:
    error_code: int


@dataclass
class Coordinator:
    """Stands in for aiokafka's GroupCoordinator: `_send_req` answers what it is told."""

    generation: int = -1
    answers: list[int] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)

    async def _send_req(self, request: Any) -> Response:
        self.sent.append(request.API_KEY)
        await asyncio.sleep(0)
        return Response(self.answers.pop(0))


async def test_watch_feeds_it_every_group_answer_with_the_generation_it_was_sent_in() -> None:
    lease = MembershipLease(10.0)
    coordinator = Coordinator(generation=5, answers=[0, 0, UNKNOWN_MEMBER_ID])
    lease.watch(coordinator)
    before = time.monotonic()
    answer = await coordinator._send_req(Request(SYNC_GROUP))
    assert answer == Response(0) and coordinator.sent == [SYNC_GROUP]
    assert lease.synced is not None and lease.synced[0] == 5 and lease.synced[1] >= before
    lease.applied(5)
    assert lease.holds()
    lease.until = float("-inf")
    await coordinator._send_req(Request(HEARTBEAT))
    assert lease.holds()
    lease.until = float("-inf")
    await coordinator._send_req(Request(HEARTBEAT))  # unknown member: not renewed
    assert not lease.holds()
