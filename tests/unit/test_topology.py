"""topics.yaml: it loads, job-keyed topics are co-partitioned, every provider has a queue.

That `streams.admin` creates topics idempotently needs a broker: the integration tier covers it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from domain.catalogue import load_catalogue
from streams.topology import Topology, TopologyError, load_topology

ROOT = Path(__file__).resolve().parents[2]
#: Topics the control plane's code refers to by logical name.
REQUIRED = {
    "cp.intake",
    "cp.commands",
    "cp.results",
    "cp.events",
    "cp.responses",
    "cp.dlq",
    "{app_id}-jobs-changelog",
}


@pytest.fixture(scope="module")
def topology() -> Topology:
    return load_topology(ROOT / "topics.yaml")


def test_topics_yaml_loads_with_every_topic_the_code_uses(topology: Topology) -> None:
    assert set(topology.topics) >= REQUIRED
    for spec in topology.topics.values():
        assert spec.partitions >= 1
        assert spec.replication_factor >= 1
        assert spec.description, f"{spec.name} has no description"


def test_every_job_keyed_topic_has_the_same_partition_count(topology: Topology) -> None:
    job_keyed = {name: spec.partitions for name, spec in topology.topics.items() if spec.job_keyed}
    assert {"cp.commands", "cp.events", "cp.responses", "{app_id}-jobs-changelog"} <= set(job_keyed)
    assert len(set(job_keyed.values())) == 1, job_keyed
    assert topology.job_partitions() == next(iter(job_keyed.values()))


def test_the_job_table_changelog_is_compacted_and_internal(topology: Topology) -> None:
    changelog = topology["{app_id}-jobs-changelog"]
    assert changelog.internal
    assert changelog.config["cleanup.policy"] == "compact"


def write_topics(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "topics.yaml"
    path.write_text(text)
    return path


def test_a_partition_count_mismatch_names_the_topics(tmp_path: Path) -> None:
    path = write_topics(
        tmp_path,
        """
defaults:
  partitions: 8
topics:
  cp.intake:
    key: any
    partitions: 3
  cp.commands:
    key: job_id
  cp.events:
    key: job_id
    partitions: 4
""",
    )
    with pytest.raises(TopologyError) as raised:
        load_topology(path)
    message = str(raised.value)
    assert "cp.commands=8" in message
    assert "cp.events=4" in message
    assert "cp.intake" not in message  # not job-keyed: its count is free


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("topics: [a, b]\n", "'topics' mapping"),
        ("topics:\n  cp.x:\n    key: job_id\n    partitons: 8\n", "unknown fields"),
        ("topics:\n  cp.x:\n    key: job_id\n    partitions: 0\n", "at least one partition"),
        ("topics:\n  cp.x: [1]\n", "must be a mapping"),
        ("topics: {a: [\n", "while parsing"),
    ],
)
def test_a_malformed_topics_file_raises_naming_the_file(
    tmp_path: Path, text: str, fragment: str
) -> None:
    path = write_topics(tmp_path, text)
    with pytest.raises(TopologyError, match=re.escape(str(path))) as raised:
        load_topology(path)
    assert fragment in str(raised.value)


def test_a_missing_topics_file_raises_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(TopologyError, match=re.escape(str(missing))):
        load_topology(missing)


def test_every_catalogue_provider_has_a_dispatch_topic(topology: Topology) -> None:
    catalogue = load_catalogue(ROOT / "config" / "catalogue.yaml")
    dispatch = topology.dispatch_topics()
    for provider in catalogue.providers:
        assert provider.name in dispatch, f"no dispatch topic for provider {provider.name}"
        spec = dispatch[provider.name]
        assert spec.name == f"cp.dispatch.{provider.name}"
        assert spec.job_keyed


def test_every_dispatch_topic_belongs_to_a_catalogue_provider(topology: Topology) -> None:
    names = {p.name for p in load_catalogue(ROOT / "config" / "catalogue.yaml").providers}
    dispatch_named = {name for name in topology.topics if name.startswith("cp.dispatch.")}
    assert dispatch_named == {f"cp.dispatch.{provider}" for provider in topology.dispatch_topics()}
    assert set(topology.dispatch_topics()) <= names
