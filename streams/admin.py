"""Create the topics of topics.yaml that are missing and check the ones that exist.

Every provider of the catalogue (CP_CATALOGUE_FILE) gets its dispatch topic `cp.dispatch.<name>`
from the `dispatch:` template of topics.yaml: a provider added to the catalogue needs no topic
entry.

Run as `python -m streams.admin` (or `cp-topics`). A partition-count or replication mismatch is an
error naming the topic; a run that finds everything in place changes nothing and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError

from streams.settings import Settings, get_settings
from streams.topology import TopicSpec, catalogue_topology


@dataclass
class Report:
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)


async def _admin(bootstrap: str, attempts: int = 60) -> AIOKafkaAdminClient:
    last: Exception | None = None
    for _ in range(attempts):
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
        try:
            await admin.start()
        except KafkaConnectionError as exc:
            last = exc
            await admin.close()
            await asyncio.sleep(0.5)
            continue
        return admin
    raise SystemExit(f"topics: no Kafka broker answers at {bootstrap}: {last}")


async def ensure_topics(settings: Settings, *, names: Sequence[str] | None = None) -> Report:
    """Create what is missing from topics.yaml (with a dispatch topic for every provider of the
    catalogue) and report what differs from it."""
    topology = catalogue_topology(settings.topics_file, settings.catalogue_file)
    wanted: dict[str, TopicSpec] = {
        settings.topic(spec.name, prefixed=spec.prefixed): spec
        for spec in topology.topics.values()
        if names is None or spec.name in names
    }
    report = Report()
    admin = await _admin(settings.kafka_bootstrap_servers)
    try:
        existing = {t["topic"]: t for t in await admin.describe_topics(list(wanted))}
        missing = [
            name for name in wanted if name not in existing or existing[name]["error_code"] != 0
        ]
        for name, spec in wanted.items():
            if name in missing:
                continue
            partitions = existing[name]["partitions"]
            if len(partitions) != spec.partitions:
                report.errors.append(
                    f"{name}: has {len(partitions)} partitions, topics.yaml declares "
                    f"{spec.partitions}; recreate the topic or change topics.yaml"
                )
                continue
            replicas = {len(p["replicas"]) for p in partitions}
            if replicas != {spec.replication_factor}:
                report.errors.append(
                    f"{name}: replication factor {sorted(replicas)}, topics.yaml declares "
                    f"{spec.replication_factor}"
                )
                continue
            report.unchanged.append(name)
        if missing:
            response = await admin.create_topics(
                [
                    NewTopic(
                        name=name,
                        num_partitions=wanted[name].partitions,
                        replication_factor=wanted[name].replication_factor,
                        topic_configs=wanted[name].config,
                    )
                    for name in missing
                ]
            )
            for topic_error in response.topic_errors:
                name, code = topic_error[0], topic_error[1]
                message = topic_error[2] if len(topic_error) > 2 else ""
                if code == 0:
                    report.created.append(name)
                elif code == 36:  # TOPIC_ALREADY_EXISTS: another process won the race
                    report.unchanged.append(name)
                else:
                    report.errors.append(f"{name}: create failed with error {code}: {message}")
        if report.created:
            await _wait_for_leaders(admin, {n: wanted[n] for n in report.created})
        if report.unchanged:
            report.drift.extend(
                await _config_drift(admin, {n: wanted[n] for n in report.unchanged})
            )
    finally:
        await admin.close()
    return report


async def _wait_for_leaders(
    admin: AIOKafkaAdminClient, specs: dict[str, TopicSpec], timeout_s: float = 30.0
) -> None:
    """Return once every new topic's partitions have a leader: workers may start right after."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        described = await admin.describe_topics(list(specs))
        ready = {
            t["topic"]
            for t in described
            if t["error_code"] == 0
            and len(t["partitions"]) == specs[t["topic"]].partitions
            and all(p["leader"] >= 0 for p in t["partitions"])
        }
        if ready == set(specs):
            return
        await asyncio.sleep(0.2)
    raise SystemExit(f"topics: created topics have no leaders after {timeout_s:.0f}s")


async def _config_drift(admin: AIOKafkaAdminClient, specs: dict[str, TopicSpec]) -> list[str]:
    resources = [
        ConfigResource(ConfigResourceType.TOPIC, name, configs=dict.fromkeys(spec.config))
        for name, spec in specs.items()
    ]
    drift: list[str] = []
    for response in await admin.describe_configs(resources):
        for resource in response.resources:
            name, entries = resource[3], resource[4]
            actual = {entry[0]: entry[1] for entry in entries}
            for key, want in specs[name].config.items():
                if key in actual and actual[key] != want:
                    drift.append(f"{name}: {key}={actual[key]} (topics.yaml says {want})")
    return drift


def main(argv: Sequence[str] | None = None) -> int:
    """Create and check topics; exit 1 on any mismatch."""
    parser = argparse.ArgumentParser(prog="cp-topics", description=__doc__)
    parser.parse_args(argv)
    settings = get_settings()
    report = asyncio.run(ensure_topics(settings))
    for name in report.created:
        print(f"topics: created {name}")
    for line in report.drift:
        print(f"topics: config differs: {line}")
    for line in report.errors:
        print(f"topics: ERROR {line}", file=sys.stderr)
    if report.errors:
        return 1
    if not report.created:
        print(f"topics: all {len(report.unchanged)} topics in place; nothing changed")
    else:
        print(f"topics: {len(report.created)} created, {len(report.unchanged)} already in place")
    return 0


if __name__ == "__main__":
    sys.exit(main())
