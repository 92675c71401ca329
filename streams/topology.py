"""Load topics.yaml: the one source of topic names, partition counts and configs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: A provider's dispatch queue is this prefix and its catalogue name.
DISPATCH_PREFIX = "cp.dispatch."

_TOPIC_FIELDS = {
    "key",
    "partitions",
    "replication_factor",
    "config",
    "provider",
    "internal",
    "prefixed",
    "description",
}


def dispatch_topic_name(provider: str) -> str:
    """The logical name of a provider's dispatch queue (before CP_TOPIC_PREFIX)."""
    return DISPATCH_PREFIX + provider


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


def load_topology(path: Path, providers: Iterable[str] = ()) -> Topology:
    """Parse and check topics.yaml, with a dispatch queue for each of `providers`.

    A provider's queue is `cp.dispatch.<provider>`, built from the file's `dispatch:` template
    unless a topic of the file names that provider (`provider: <name>`) and overrides it.
    """
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TopologyError(f"{path}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("topics"), dict):
        raise TopologyError(f"{path}: expected a mapping with a 'topics' mapping")
    defaults = raw.get("defaults") or {}
    base_config = {str(k): str(v) for k, v in (defaults.get("config") or {}).items()}
    declared_topics: dict[str, Any] = dict(raw["topics"])
    template = raw.get("dispatch") or {}
    if not isinstance(template, dict):
        raise TopologyError(f"{path}: 'dispatch' must be a mapping (the dispatch queue template)")
    overridden = {
        spec.get("provider") for spec in declared_topics.values() if isinstance(spec, dict)
    }
    for provider in providers:
        if provider not in overridden:
            declared_topics.setdefault(
                dispatch_topic_name(provider),
                {"key": "job_id", **template, "provider": provider},
            )
    topics: dict[str, TopicSpec] = {}
    for name, declared in declared_topics.items():
        spec = declared or {}
        if not isinstance(spec, dict):
            raise TopologyError(f"{path}: topic {name!r} must be a mapping")
        unknown = set(spec) - _TOPIC_FIELDS
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


def catalogue_topology(topics_file: Path, catalogue_file: Path) -> Topology:
    """topics.yaml with a dispatch queue for every provider of the catalogue, enabled or not."""
    from domain.catalogue import load_catalogue

    catalogue = load_catalogue(catalogue_file)
    return load_topology(topics_file, [p.name for p in catalogue.providers])


class MissingDispatchTopics(RuntimeError):
    """A provider this worker may route or call has no dispatch topic on the broker."""

    def __init__(self, missing: dict[str, str], servers: str) -> None:
        self.missing = missing
        names = ", ".join(f"{provider} (topic {topic})" for provider, topic in missing.items())
        super().__init__(
            f"no dispatch topic on {servers} for provider(s) {names}: run `make topics` "
            "(python -m streams.admin), which creates the dispatch topic of every provider in "
            "the catalogue, then start again; or disable the provider (catalogue `enabled: "
            "false`, not in CP_ENABLE_PROVIDERS)"
        )
