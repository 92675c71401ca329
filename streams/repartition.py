"""Grow the job partition count of a deployment (N → M) and move each job's state with it.

A job lives on partition `murmur2(job_id) % partitions` of every job-keyed topic, and its state on
the same partition of the job table's changelog. Adding partitions therefore moves jobs: this tool
re-keys the changelog into the new layout while the control-plane workers are stopped.

The procedure (README, "Scaling"):

1. set the new count in topics.yaml (`defaults.partitions`, the job-keyed topics and the job
   core's inputs share it);
2. stop every control-plane worker (provider workers, webhook senders and producers may go on:
   what they write meanwhile waits in Kafka);
3. `python -m streams.repartition` (`cp-repartition`): it refuses while any control-plane worker
   of `CP_APP_ID` is in the job core's group, grows every topic of topics.yaml that has fewer
   partitions than declared, then moves each job's changelog records (`j:` row, `r:` request,
   `i:` retired marker, with their headers) from the partition of the old layout to the one of
   the new, writing the copy and the old key's tombstone in one transaction per batch;
4. start the control-plane workers with the new topics.yaml.

Nothing else moves. The positions of the job core's inputs (`o:<topic>` records) stay with their
partition number, so each worker resumes its partitions of cp.intake, cp.commands and cp.results
where they stopped; the new partitions start empty, from their beginning. Records in those inputs
that were written for the old layout (a command of a job that now lives elsewhere) are re-keyed
by the job core onto the job's new partition, as it re-keys any misplaced input. Dispatches,
events, final responses and webhooks already written stay where they are and are read as before.

Every batch is atomic and the move is idempotent: a run cut short (crash, Ctrl-C, broker
restart) is finished by running the tool again. A count can only grow (Kafka cannot remove
partitions).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

from streams.admin import _admin
from streams.core import changelog_reader
from streams.placement import partition_for
from streams.settings import Settings, get_settings
from streams.topology import catalogue_topology
from tables.exceptions import StateCorrupted
from tables.jobs import OFFSET, split_key

#: Keys moved per transaction: small enough to stay far below the transaction timeout.
BATCH_KEYS = 500
BATCH_BYTES = 16 * 1024 * 1024

Headers = list[tuple[str, bytes]]


class RepartitionRefused(RuntimeError):
    """The tool cannot run now (workers running, a count that would shrink, missing topics)."""


@dataclass
class Report:
    before: int = 0
    after: int = 0
    grown: dict[str, tuple[int, int]] = field(default_factory=dict)
    records_read: int = 0
    keys_moved: int = 0
    jobs_moved: int = 0
    per_partition: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    dry_run: bool = False

    def lines(self) -> list[str]:
        verb = "would move" if self.dry_run else "moved"
        return [
            f"repartition: job partitions {self.before} -> {self.after}",
            *(
                f"repartition: {'would grow' if self.dry_run else 'grew'} {name} "
                f"{old} -> {new} partitions"
                for name, (old, new) in sorted(self.grown.items())
            ),
            f"repartition: read {self.records_read} changelog records; {verb} {self.jobs_moved} "
            f"jobs ({self.keys_moved} keys) to their partition of the new layout",
            f"repartition: done in {self.seconds:.2f} s",
        ]


async def live_members(admin: AIOKafkaAdminClient, group_id: str) -> list[str]:
    """The member ids of a consumer group (empty when the group is empty or unknown)."""
    members: list[str] = []
    for response in await admin.describe_consumer_groups([group_id]):
        for group in response.groups:
            if group[1] == group_id:
                members.extend(str(member[0]) for member in group[5])
    return members


async def repartition(settings: Settings, *, dry_run: bool = False) -> Report:
    """Grow the topics to topics.yaml's counts and move every job's state; see the module doc."""
    started = time.monotonic()
    topology = catalogue_topology(settings.topics_file, settings.catalogue_file)
    target = topology.job_partitions()
    wanted = {
        settings.topic(spec.name, prefixed=spec.prefixed): spec.partitions
        for spec in topology.topics.values()
    }
    changelog = settings.topic("{app_id}-jobs-changelog")
    core_group = settings.topic_prefix + settings.app_id + "-core"
    report = Report(after=target, dry_run=dry_run)
    admin = await _admin(settings.kafka_bootstrap_servers)
    try:
        members = await live_members(admin, core_group)
        if members:
            raise RepartitionRefused(
                f"{len(members)} control-plane worker(s) are in group {core_group}: stop every "
                "control-plane worker of this CP_APP_ID first (they would keep writing jobs to "
                "partitions of the old layout)"
            )
        described = {t["topic"]: t for t in await admin.describe_topics(list(wanted))}
        missing = sorted(n for n in wanted if described.get(n, {}).get("error_code", -1) != 0)
        if missing:
            raise RepartitionRefused(
                f"topics missing: {', '.join(missing)}; run `make topics` (python -m "
                "streams.admin) for a new deployment instead"
            )
        counts = {name: len(described[name]["partitions"]) for name in wanted}
        report.before = counts[changelog]
        for name, count in sorted(counts.items()):
            if count > wanted[name]:
                raise RepartitionRefused(
                    f"{name} has {count} partitions and topics.yaml declares {wanted[name]}: "
                    "Kafka cannot remove partitions; set topics.yaml back to at least "
                    f"{count}"
                )
        grow = {name: wanted[name] for name, count in counts.items() if count < wanted[name]}
        report.grown = {name: (counts[name], total) for name, total in grow.items()}
        if grow and not dry_run:
            await admin.create_partitions(
                {name: NewPartitions(total_count=total) for name, total in grow.items()}
            )
            await _wait_grown(admin, grow)
    finally:
        await admin.close()
    await _move(settings, changelog, core_group, target, report)
    report.seconds = time.monotonic() - started
    return report


async def _wait_grown(
    admin: AIOKafkaAdminClient, grow: dict[str, int], timeout_s: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        described = await admin.describe_topics(list(grow))
        if all(
            len(t["partitions"]) == grow[t["topic"]]
            and all(p["leader"] >= 0 for p in t["partitions"])
            for t in described
        ):
            return
        await asyncio.sleep(0.2)
    raise RepartitionRefused(f"new partitions have no leader after {timeout_s:.0f} s")


async def _move(
    settings: Settings, changelog: str, core_group: str, target: int, report: Report
) -> None:
    """Read every changelog partition (committed records only) and move what is misplaced."""
    consumer = changelog_reader(settings)
    producer: AIOKafkaProducer | None = None
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        numbers = sorted(cluster.partitions_for_topic(changelog) or ())
        if not report.dry_run:
            producer = AIOKafkaProducer(
                bootstrap_servers=settings.kafka_bootstrap_servers,
                # One id per deployment: a second run fences a first one still going.
                transactional_id=f"{core_group}-repartition",
                enable_idempotence=True,
                acks="all",
                max_request_size=4 * 1024 * 1024,
                max_batch_size=1024 * 1024,
                linger_ms=5,
                transaction_timeout_ms=120_000,
            )
            await producer.start()
        for number in numbers:
            moving = await _misplaced(consumer, TopicPartition(changelog, number), target, report)
            report.per_partition[number] = len(moving)
            report.keys_moved += len(moving)
            report.jobs_moved += len({job for (_, job) in moving})
            if producer is not None:
                await _write(producer, changelog, number, target, moving)
    finally:
        await consumer.stop()
        if producer is not None:
            await producer.stop()


async def _misplaced(
    consumer: AIOKafkaConsumer, tp: TopicPartition, target: int, report: Report
) -> dict[tuple[str, str], tuple[bytes, Headers]]:
    """The latest live value of every job key of `tp` whose job belongs elsewhere now."""
    consumer.assign([tp])
    await consumer.seek_to_beginning(tp)
    end = (await consumer.end_offsets([tp]))[tp]
    latest: dict[tuple[str, str], tuple[bytes, Headers]] = {}
    while end > 0 and await consumer.position(tp) < end:
        batch = await consumer.getmany(tp, timeout_ms=1000, max_records=10_000)
        for record in batch.get(tp, []):
            report.records_read += 1
            try:
                kind, job_id = split_key(record.key or b"")
            except (StateCorrupted, UnicodeDecodeError):
                continue  # the job core skips foreign keys on restore too
            if kind == OFFSET or partition_for(job_id, target) == tp.partition:
                continue
            if record.value is None:
                latest.pop((kind, job_id), None)
            else:
                latest[(kind, job_id)] = (record.value, list(record.headers or ()))
    return latest


async def _write(
    producer: AIOKafkaProducer,
    changelog: str,
    source: int,
    target: int,
    moving: dict[tuple[str, str], tuple[bytes, Headers]],
) -> None:
    """Copy each key to its new partition and tombstone it here, a transaction per batch."""
    items = sorted(moving.items(), key=lambda item: (item[0][1], item[0][0]))
    start = 0
    while start < len(items):
        size = 0
        stop = start
        while stop < len(items) and stop - start < BATCH_KEYS and size < BATCH_BYTES:
            size += len(items[stop][1][0])
            stop += 1
        await producer.begin_transaction()
        try:
            futures: list[asyncio.Future[Any]] = []
            for (kind, job_id), (value, headers) in items[start:stop]:
                key = f"{kind}:{job_id}".encode()
                futures.append(
                    await producer.send(
                        changelog,
                        value,
                        key=key,
                        partition=partition_for(job_id, target),
                        headers=headers,
                    )
                )
                futures.append(await producer.send(changelog, None, key=key, partition=source))
            await producer.commit_transaction()
        except BaseException:
            await producer.abort_transaction()
            raise
        for future in futures:
            future.result()
        start = stop


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cp-repartition",
        description="Grow the job partition count to what topics.yaml declares and move every "
        "job's state to its partition of the new layout. Stop every control-plane worker first.",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="say what would grow and how many jobs would move; change nothing",
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    try:
        report = asyncio.run(repartition(settings, dry_run=args.dry_run))
    except RepartitionRefused as exc:
        print(f"repartition: refused: {exc}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
