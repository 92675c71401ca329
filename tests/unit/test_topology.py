"""topics.yaml: it loads, job-keyed topics are co-partitioned, every provider has a queue.

That `streams.admin` creates topics idempotently needs a broker: the integration tier covers it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from domain.catalogue import load_catalogue
from streams.topology import (
    MissingDispatchTopics,
    Topology,
    TopologyError,
    catalogue_topology,
    load_topology,
)

ROOT = Path(__file__).resolve().parents[2]
#: Topics the control plane's code refers to by logical name.
REQUIRED = {
    "cp.intake",
    "cp.commands",
    "cp.results",
    "cp.events",
    "cp.responses",
    "cp.dlq",
    "cp.health",
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


@pytest.fixture(scope="module")
def with_catalogue() -> Topology:
    return catalogue_topology(ROOT / "topics.yaml", ROOT / "config" / "catalogue.yaml")


def test_every_catalogue_provider_has_a_dispatch_topic(with_catalogue: Topology) -> None:
    catalogue = load_catalogue(ROOT / "config" / "catalogue.yaml")
    dispatch = with_catalogue.dispatch_topics()
    for provider in catalogue.providers:
        assert provider.name in dispatch, f"no dispatch topic for provider {provider.name}"
        spec = dispatch[provider.name]
        assert spec.name == f"cp.dispatch.{provider.name}"
        assert spec.job_keyed
        assert spec.partitions == with_catalogue.job_partitions()


def test_every_dispatch_topic_belongs_to_a_catalogue_provider(with_catalogue: Topology) -> None:
    names = {p.name for p in load_catalogue(ROOT / "config" / "catalogue.yaml").providers}
    topics = with_catalogue.topics
    dispatch_named = {name for name in topics if name.startswith("cp.dispatch.")}
    assert dispatch_named == {f"cp.dispatch.{p}" for p in with_catalogue.dispatch_topics()}
    assert set(with_catalogue.dispatch_topics()) == names


def test_topics_yaml_lists_no_provider_queue_they_follow_from_the_catalogue(
    topology: Topology,
) -> None:
    assert topology.dispatch_topics() == {}
    assert not any(name.startswith("cp.dispatch.") for name in topology.topics)


NEW_PROVIDER = {
    "name": "local-llm",
    "kind": "openai-compatible",
    "region": "local",
    "base_url": "http://127.0.0.1:1/v1",
    "api_key_env": "LOCAL_LLM_KEY",
    "models": [
        {
            "name": "m1",
            "context_window": 8000,
            "max_output_tokens": 1000,
            "expected_latency_ms": 100,
        }
    ],
}


def test_a_provider_added_to_the_catalogue_alone_gets_a_dispatch_topic(tmp_path: Path) -> None:
    catalogue = yaml.safe_load((ROOT / "config" / "catalogue.yaml").read_text())
    catalogue["providers"].append(NEW_PROVIDER)
    path = tmp_path / "catalogue.yaml"
    path.write_text(yaml.safe_dump(catalogue))
    topology = catalogue_topology(ROOT / "topics.yaml", path)
    spec = topology.dispatch_topics()["local-llm"]
    assert spec.name == "cp.dispatch.local-llm"
    assert spec.job_keyed and spec.description
    assert spec.partitions == topology.job_partitions()
    assert spec.config == topology["cp.events"].config  # the defaults, like every topic


def test_a_declared_dispatch_topic_overrides_the_template(tmp_path: Path) -> None:
    path = write_topics(
        tmp_path,
        """
defaults:
  partitions: 8
dispatch:
  key: job_id
  description: from the template
  config:
    retention.ms: "1000"
topics:
  cp.commands:
    key: job_id
  queue.for.a:
    key: job_id
    provider: a
    description: declared
    config:
      retention.ms: "2000"
""",
    )
    topology = load_topology(path, ["a", "b"])
    dispatch = topology.dispatch_topics()
    assert (dispatch["a"].name, dispatch["a"].description) == ("queue.for.a", "declared")
    assert dispatch["a"].config["retention.ms"] == "2000"
    assert (dispatch["b"].name, dispatch["b"].description) == ("cp.dispatch.b", "from the template")
    assert dispatch["b"].config["retention.ms"] == "1000"
    assert "cp.dispatch.a" not in topology.topics


def test_a_missing_dispatch_topic_message_names_the_provider_and_the_fix() -> None:
    error = MissingDispatchTopics({"local-llm": "x.cp.dispatch.local-llm"}, "127.0.0.1:9092")
    message = str(error)
    assert "local-llm" in message and "x.cp.dispatch.local-llm" in message
    assert "make topics" in message and "python -m streams.admin" in message
