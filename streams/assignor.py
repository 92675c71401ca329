"""The job core's partition assignor: co-partitioned, sticky, and telling everyone who owns what.

Every member gets the same partition numbers of every subscribed topic (cp.intake, cp.commands,
cp.results), so one worker holds partition N of all of them and is the only writer of the jobs
that hash to N. Partitions stay with the member that held them when it is still there (its state
needs no rebuild). Each member puts its web URL (and its read port's, when it has one) in its join
metadata; the leader hands every member the whole partition -> URL maps with its assignment, which
the API uses to forward requests and the reader processes to relay reads straight to the owner's
read port.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

VERSION = 0


class CopartitionedAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """Assign partition numbers, not topic partitions; sticky; carries the ownership map."""

    name = "cp-copartitioned"

    def __init__(self, url: str, held: Callable[[], Iterable[int]], read_url: str = "") -> None:
        self.url = url
        self.held = held
        self.read_url = read_url
        self.owners: dict[int, str] = {}
        #: partition -> its owner's read port URL, for owners that have one.
        self.readers: dict[int, str] = {}

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        member: dict[str, Any] = {"url": self.url, "held": sorted(self.held())}
        if self.read_url:
            member["read"] = self.read_url
        user_data = orjson.dumps(member)
        return ConsumerProtocolMemberMetadata(VERSION, sorted(topics), user_data)

    def assign(
        self,
        cluster: ClusterMetadata,
        members: Mapping[str, ConsumerProtocolMemberMetadata],
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        info: dict[str, dict[str, Any]] = {}
        topics: set[str] = set()
        for member_id, meta in members.items():
            try:
                info[member_id] = orjson.loads(meta.user_data or b"{}")
            except orjson.JSONDecodeError:
                info[member_id] = {}
            topics.update(meta.subscription)
        counts = {t: len(cluster.partitions_for_topic(t) or ()) for t in topics}
        count = min((c for c in counts.values() if c), default=0)
        plan = plan_assignment(
            list(range(count)),
            {m: [int(p) for p in info[m].get("held", [])] for m in sorted(members)},
        )
        owners = {p: str(info[m].get("url", "")) for m, parts in plan.items() for p in parts}
        readers = {
            p: str(info[m]["read"])
            for m, parts in plan.items()
            if info[m].get("read")
            for p in parts
        }
        user_data = orjson.dumps(
            {
                "owners": {str(p): url for p, url in sorted(owners.items())},
                "readers": {str(p): url for p, url in sorted(readers.items())},
            }
        )
        result = {}
        for member_id, parts in plan.items():
            subscribed = sorted(members[member_id].subscription)
            result[member_id] = ConsumerProtocolMemberAssignment(
                VERSION,
                [(t, sorted(p for p in parts if p < counts.get(t, 0))) for t in subscribed],
                user_data,
            )
        return result

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        try:
            data = orjson.loads(assignment.user_data or b"{}")
            self.owners = {int(p): str(url) for p, url in data.get("owners", {}).items()}
            self.readers = {int(p): str(url) for p, url in data.get("readers", {}).items()}
        except (orjson.JSONDecodeError, AttributeError, ValueError):
            self.owners, self.readers = {}, {}


def plan_assignment(partitions: list[int], held: Mapping[str, list[int]]) -> dict[str, list[int]]:
    """Spread partitions evenly over members, leaving each where it was when that is possible."""
    members = sorted(held)
    plan: dict[str, list[int]] = {m: [] for m in members}
    if not members:
        return plan
    base, extra = divmod(len(partitions), len(members))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(members)}
    free = set(partitions)
    # Members that held more partitions keep theirs first, so the ones with big quotas get them.
    for member in sorted(members, key=lambda m: (-len(held[m]), m)):
        for p in sorted(held[member]):
            if p in free and len(plan[member]) < quota[member]:
                plan[member].append(p)
                free.discard(p)
    for p in sorted(free):
        member = min(members, key=lambda m: (len(plan[m]) - quota[m], m))
        plan[member].append(p)
    return plan
