"""The Grafana dashboard only queries metrics the workers really export, through one data source."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from providers.worker import ProviderMetrics
from streams.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "control-plane.json"
DATASOURCE_UID = "prometheus"

#: Words of PromQL that look like metric names: aggregations, modifiers, operators.
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}
#: What every panel the brief asks for must show, as (title fragment, metric it queries).
REQUIRED_PANELS = [
    ("throughput", "cp_job_transitions_total"),
    ("end-to-end", "cp_job_latency_seconds_bucket"),
    ("attempt latency", "cp_attempt_latency_seconds_bucket"),
    ("overhead", "cp_job_overhead_seconds_bucket"),
    ("retries and fallbacks", "cp_retries_total"),
    ("retries and fallbacks", "cp_fallbacks_total"),
    ("cost", "cp_cost_total"),
    ("dead letters", "cp_dead_letters_total"),
    ("circuit", "cp_circuit_state"),
    ("jobs in flight", "cp_jobs_in_flight"),
    ("provider calls in flight", "provider_calls_in_flight"),
]


def exported_names(registry: CollectorRegistry | Collector) -> set[str]:
    """Sample names a registry exposes, including those of families with no children yet."""
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def known() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry, circuits=lambda: {"sim-cheap": "closed"})
    return exported_names(registry) | exported_names(ProviderMetrics().registry)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    value = json.loads(DASHBOARD.read_text())
    assert isinstance(value, dict)
    return value


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, labels or words."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors and $__rate_interval
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text
    )  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][A-Za-z0-9_:]*)\b(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_WORDS:
            continue
        names.add(name)
    return names


def test_metric_names_parser() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, provider) "
        '(rate(cp_attempt_latency_seconds_bucket{job="x"}[$__rate_interval]))) '
        "/ on(provider) group_left sum without (le) (cp_jobs_in_flight) "
        "and 3600 * increase(provider_calls_total[5m] offset 1h)"
    )
    assert metric_names(expr) == {
        "cp_attempt_latency_seconds_bucket",
        "cp_jobs_in_flight",
        "provider_calls_total",
    }


def test_known_names_cover_both_workers(known: set[str]) -> None:
    assert {
        "cp_job_transitions_total",
        "cp_cost_total",
        "cp_circuit_state",
        "cp_job_latency_seconds_bucket",
        "cp_jobs_in_flight",
        "provider_calls_total",
        "provider_calls_in_flight",
        "provider_call_latency_seconds_count",
    } <= known


def test_dashboard_is_a_provisionable_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"]
    assert dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_every_queried_metric_is_exported(dashboard: dict[str, Any], known: set[str]) -> None:
    used: set[str] = set()
    unknown = {}
    for title, expr in expressions(dashboard):
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        used |= names
        if names - known:
            unknown[title] = sorted(names - known)
    assert not unknown, f"panels query metrics no worker exports: {unknown}"
    assert any(n.startswith("cp_") for n in used) and any(n.startswith("provider_") for n in used)


def test_required_panels_are_present(dashboard: dict[str, Any]) -> None:
    by_title: dict[str, set[str]] = {}
    for title, expr in expressions(dashboard):
        by_title.setdefault(title.lower(), set()).update(metric_names(expr))
    missing = [
        (fragment, metric)
        for fragment, metric in REQUIRED_PANELS
        if not any(fragment in title and metric in names for title, names in by_title.items())
    ]
    assert not missing, f"no panel for: {missing}; panels: {sorted(by_title)}"


def test_expressions_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": expr.replace("$__rate_interval", "1m")}
        for i, (_, expr) in enumerate(expressions(dashboard))
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_provisioning_points_at_the_dashboards_and_prometheus() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    [source] = datasources["datasources"]
    assert (source["uid"], source["type"], source["url"]) == (
        DATASOURCE_UID,
        "prometheus",
        "http://prometheus:9090",
    )
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/dashboards.yml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
