"""Load topics.yaml: the one source of topic names, partition counts and configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class TopologyError(ValueError):
    """topics.yaml is malformed: fix the file named in the message."""


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    key: str
    config: dict[str, str] = field(default_factory=dict)
    provider: str | None = None
    internal: bool = False
    prefixed: bool = True
    description: str = ""

    @property
    def job_keyed(self) -> bool:
        return self.key == "job_id"


@dataclass(frozen=True, slots=True)
class Topology:
    topics: dict[str, TopicSpec]

    def __getitem__(self, name: str) -> TopicSpec:
        return self.topics[name]

    def dispatch_topics(self) -> dict[str, TopicSpec]:
        """Map provider name to its dispatch topic."""
        return {t.provider: t for t in self.topics.values() if t.provider is not None}

    def job_partitions(self) -> int:
        """Return the one partition count all job-keyed topics share."""
        counts = {t.partitions for t in self.topics.values() if t.job_keyed}
        if len(counts) != 1:
            detail = ", ".join(
                f"{t.name}={t.partitions}" for t in self.topics.values() if t.job_keyed
            )
            raise TopologyError(f"job-keyed topics must share one partition count: {detail}")
        return counts.pop()


def load_topology(path: Path) -> Topology:
    """Parse and check topics.yaml."""
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TopologyError(f"{path}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("topics"), dict):
        raise TopologyError(f"{path}: expected a mapping with a 'topics' mapping")
    defaults = raw.get("defaults") or {}
    base_config = {str(k): str(v) for k, v in (defaults.get("config") or {}).items()}
    topics: dict[str, TopicSpec] = {}
    for name, declared in raw["topics"].items():
        spec = declared or {}
        if not isinstance(spec, dict):
            raise TopologyError(f"{path}: topic {name!r} must be a mapping")
        unknown = set(spec) - {
            "key",
            "partitions",
            "replication_factor",
            "config",
            "provider",
            "internal",
            "prefixed",
            "description",
        }
        if unknown:
            raise TopologyError(f"{path}: topic {name!r} has unknown fields {sorted(unknown)}")
        partitions = int(spec.get("partitions", defaults.get("partitions", 8)))
        if partitions < 1:
            raise TopologyError(f"{path}: topic {name!r} needs at least one partition")
        config = dict(base_config)
        config.update({str(k): str(v) for k, v in (spec.get("config") or {}).items()})
        topics[str(name)] = TopicSpec(
            name=str(name),
            partitions=partitions,
            replication_factor=int(
                spec.get("replication_factor", defaults.get("replication_factor", 1))
            ),
            key=str(spec.get("key", "any")),
            config=config,
            provider=spec.get("provider"),
            internal=bool(spec.get("internal", False)),
            prefixed=bool(spec.get("prefixed", True)),
            description=str(spec.get("description", "")),
        )
    topology = Topology(topics)
    topology.job_partitions()
    return topology
