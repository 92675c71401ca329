"""The README agrees with the code: settings, make targets, topics and the example messages."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import AliasChoices

from domain.errors import ERROR_POLICY
from domain.messages import JobRequest
from streams.settings import Settings
from streams.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()


def section(title: str) -> str:
    """The text of the README's `## title` section, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    """Cells of a markdown table's body rows (header and separator left out)."""
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.lstrip().startswith("|")
    ]
    return [row for row in rows[2:] if row]


def config_table() -> dict[str, str]:
    """Each variable named in the Configuration table, mapped to its default cell."""
    table: dict[str, str] = {}
    for row in table_rows(section("Configuration")):
        for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", row[0]):
            table[name] = row[1]
    return table


def env_names(field: str) -> set[str]:
    """The environment variables that set a Settings field."""
    info = Settings.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return {str(choice) for choice in alias.choices}
    if isinstance(alias, str):
        return {alias}
    return {f"CP_{field.upper()}"}


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_in_the_configuration_table(field: str) -> None:
    names = env_names(field)
    assert f"CP_{field.upper()}" in names or field == "kafka_bootstrap_servers"
    documented = set(config_table())
    assert names <= documented, f"{field}: {sorted(names - documented)} not in README"


def test_kafka_bootstrap_servers_is_documented_without_its_prefix() -> None:
    assert "KAFKA_BOOTSTRAP_SERVERS" in config_table()


def test_the_configuration_table_names_no_unknown_variable() -> None:
    known = {name for field in Settings.model_fields for name in env_names(field)}
    assert set(config_table()) <= known


def _normal(value: Any) -> str:
    if value is None:
        return "(none)"
    if value == "":
        return "(empty)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_the_documented_default_is_the_real_one(field: str) -> None:
    default = Settings.model_fields[field].default
    cell = next(config_table()[name] for name in sorted(env_names(field)) if name in config_table())
    if default is None and cell != "(none)":
        return  # an optional setting whose effective value is derived: the README says how
    assert cell.strip("`") == _normal(default), f"{field}: {cell}"


# -- make targets ---------------------------------------------------------------------------------


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*):", MAKEFILE, re.M))


def readme_targets() -> set[str]:
    """Targets the README names: `make <target>`, and the list after 'Other targets:'."""
    named = set(re.findall(r"\bmake ([a-z][a-z0-9-]*)", README))
    other = re.search(r"Other targets:(.*?)\n\n", README, re.S)
    assert other, "README no longer lists the other make targets"
    named |= set(re.findall(r"`([a-z][a-z0-9-]*)`", other.group(1)))
    return named


@pytest.mark.parametrize("target", sorted(readme_targets()))
def test_every_make_target_in_the_readme_exists(target: str) -> None:
    assert target in makefile_targets()


def test_the_readme_names_the_main_targets() -> None:
    assert {"run", "test", "test-fast", "demo", "topics", "kafka-up"} <= readme_targets()


# -- topics ---------------------------------------------------------------------------------------


def test_every_public_topic_is_in_the_readme_topic_table() -> None:
    documented = {row[0].strip("`") for row in table_rows(section("Topics"))}
    topology = load_topology(ROOT / "topics.yaml")
    for name, spec in topology.topics.items():
        if spec.internal and name != "{app_id}-jobs-changelog":
            continue  # faust's own bookkeeping topics; the job table's changelog is documented
        expected = "cp.dispatch.<provider>" if spec.provider else name
        assert expected in documented, f"{name} is not in the README's topic table"


def test_the_readme_states_the_real_job_partition_count() -> None:
    partitions = load_topology(ROOT / "topics.yaml").job_partitions()
    assert f"same partition count ({partitions})" in section("Topics")


# -- example messages -----------------------------------------------------------------------------


def test_the_canonical_job_request_example_validates() -> None:
    blocks = re.findall(r"```json\n(.*?)```", section("Canonical messages"), re.S)
    assert len(blocks) == 1, "expected one ```json example under 'Canonical messages'"
    request = JobRequest.model_validate(json.loads(blocks[0]))
    assert request.tenant_id is not None  # the Kafka shape: tenant_id is required there
    assert request.simulate is not None


def test_the_quick_start_examples_validate() -> None:
    quick = section("Quick start")
    kafka = re.search(r"echo '(\{.*?\})'", quick, re.S)
    http = re.search(r"-d '(\{.*?\})'", quick, re.S)
    assert kafka and http, "the Quick start no longer shows a kcat and a curl example"
    assert JobRequest.model_validate(json.loads(kafka.group(1))).tenant_id is not None
    assert JobRequest.model_validate(json.loads(http.group(1))).tenant_id is None


def test_the_canonical_error_codes_are_listed_with_their_flags() -> None:
    section = README.split("## Canonical errors", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| (yes|no) \| (yes|no) \|", section, re.M)
    listed = {code: (retry == "yes", fallback == "yes") for code, retry, fallback in rows}
    assert listed == {
        code.value: (policy.retryable, policy.fallback) for code, policy in ERROR_POLICY.items()
    }
