"""The Docker path and the Makefile agree with the code, topics.yaml and scripts/kafka.sh."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.settings import Settings
from streams.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
APP_SERVICES = ("topics", "control-plane", "providers")
#: Broker settings a single-node cluster needs; compose must use the same values as kafka.sh.
SINGLE_NODE = (
    "offsets.topic.replication.factor",
    "transaction.state.log.replication.factor",
    "transaction.state.log.min.isr",
    "group.initial.rebalance.delay.ms",
    "auto.create.topics.enable",
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def kafka_sh_properties() -> dict[str, str]:
    """The server.properties that scripts/kafka.sh writes, as a dict."""
    script = (ROOT / "scripts" / "kafka.sh").read_text()
    body = re.search(r"<<PROPS\n(.*?)\nPROPS\n", script, re.S)
    assert body, "scripts/kafka.sh no longer writes server.properties from a PROPS heredoc"
    lines = [line for line in body.group(1).splitlines() if "=" in line]
    return dict(line.split("=", 1) for line in lines)


def env_name(prop: str) -> str:
    return "KAFKA_" + prop.upper().replace(".", "_")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def container_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for mapping in service.get("ports", []):
        target = mapping["target"] if isinstance(mapping, dict) else str(mapping).split(":")[-1]
        ports.add(int(str(target).split("/")[0]))
    return ports


def command_modules(command: list[str]) -> list[str]:
    """Modules a `python -m x` or `faust -A x` command line needs to import."""
    return [
        command[i + 1].split(":")[0] for i, arg in enumerate(command[:-1]) if arg in ("-m", "-A")
    ]


def test_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert {"kafka", *APP_SERVICES, "prometheus"} <= set(services)


def test_kafka_has_the_single_node_settings_of_kafka_sh(
    services: dict[str, dict[str, Any]],
) -> None:
    env = environment(services["kafka"])
    props = kafka_sh_properties()
    for prop in SINGLE_NODE:
        assert env.get(env_name(prop)) == props[prop], prop
    # Every other broker setting compose shares with kafka.sh (not addresses) has the same value.
    shared = {p for p in props if env_name(p) in env} - {
        "listeners",
        "advertised.listeners",
        "listener.security.protocol.map",
        "controller.quorum.voters",
        "log.dirs",
    }
    assert {p: env[env_name(p)] for p in shared} == {p: props[p] for p in shared}
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_kafka_image_is_the_version_kafka_sh_runs(services: dict[str, dict[str, Any]]) -> None:
    script = (ROOT / "scripts" / "kafka.sh").read_text()
    version = re.search(r'KAFKA_VERSION="\$\{KAFKA_VERSION:-([^}]+)\}"', script)
    assert version
    assert services["kafka"]["image"] == f"apache/kafka:{version.group(1)}"


def test_other_containers_reach_kafka_at_kafka_9092(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    advertised = environment(kafka)["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "PLAINTEXT://kafka:9092" in advertised
    assert environment(kafka)["KAFKA_INTER_BROKER_LISTENER_NAME"] == "PLAINTEXT"
    assert "test" in kafka["healthcheck"]
    for name in APP_SERVICES:
        assert environment(services[name])["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092", name
        assert services[name]["depends_on"]["kafka"]["condition"] == "service_healthy", name


def test_broker_accepts_the_largest_message_topics_yaml_allows(
    services: dict[str, dict[str, Any]],
) -> None:
    topology = load_topology(ROOT / "topics.yaml")
    largest = max(int(spec.config.get("max.message.bytes", 0)) for spec in topology.topics.values())
    assert int(environment(services["kafka"])["KAFKA_MESSAGE_MAX_BYTES"]) >= largest


def test_workers_start_after_the_topics_exist(services: dict[str, dict[str, Any]]) -> None:
    assert services["topics"].get("restart") == "no"
    for name in ("control-plane", "providers"):
        condition = services[name]["depends_on"]["topics"]["condition"]
        assert condition == "service_completed_successfully", name


def test_ports_are_published_on_localhost_only(services: dict[str, dict[str, Any]]) -> None:
    published = 0
    for name, service in services.items():
        for mapping in service.get("ports", []):
            published += 1
            if isinstance(mapping, dict):
                assert mapping.get("host_ip") == "127.0.0.1", (name, mapping)
            else:
                assert str(mapping).startswith("127.0.0.1:"), (name, mapping)
    assert published >= 2


def test_worker_web_servers_listen_where_compose_publishes(
    services: dict[str, dict[str, Any]],
) -> None:
    fields = Settings.model_fields
    for name, port_var, default in (
        ("control-plane", "CP_WEB_PORT", fields["web_port"].default),
        ("providers", "CP_PROVIDER_WEB_PORT", fields["provider_web_port"].default),
    ):
        env = environment(services[name])
        assert env["CP_WEB_HOST"] == "0.0.0.0", name
        assert int(env.get(port_var, default)) in container_ports(services[name]), name


def test_worker_state_lives_on_volumes(services: dict[str, dict[str, Any]]) -> None:
    for name, data_var in (("control-plane", "CP_DATA_DIR"), ("providers", "CP_PROVIDER_DATA_DIR")):
        data_dir = environment(services[name])[data_var]
        targets = [str(volume).split(":")[1] for volume in services[name]["volumes"]]
        assert data_dir in targets, name


def test_commands_run_the_workers_and_the_topic_tool(services: dict[str, dict[str, Any]]) -> None:
    assert services["topics"]["command"] == ["python", "-m", "streams.admin"]
    assert services["control-plane"]["command"][:5] == [
        "python",
        "-m",
        "faust",
        "-A",
        "streams.app",
    ]
    assert "worker" in services["control-plane"]["command"]
    assert services["providers"]["command"] == ["python", "-m", "providers.worker"]


def test_command_modules_import(services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    modules = sorted({m for n in APP_SERVICES for m in command_modules(services[n]["command"])})
    assert {"streams.app", "providers.worker", "streams.admin"} <= set(modules)
    # A fresh interpreter, as in the container: importing streams.app builds the faust app.
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "assert hasattr(sys.modules['streams.app'], 'app'), 'faust -A streams.app needs `app`'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "CP_DATA_DIR": str(tmp_path / "data")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_prometheus_scrapes_the_compose_workers(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "15s"
    targets: dict[str, int] = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.split(":")
                targets[host] = int(port)
    assert set(targets) == {"control-plane", "providers"}
    for host, port in targets.items():
        assert port in container_ports(services[host]), host
    mounts = [str(v) for v in services["prometheus"]["volumes"]]
    assert any(m.startswith("./deploy/prometheus.yml:") for m in mounts)


def test_dockerfile_installs_the_project_without_dev_tools_as_non_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)
    assert "[dev]" not in dockerfile
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    copied = set(re.findall(r"^COPY (\S+)", dockerfile, re.M))
    # Every package pyproject ships, and the files the settings read relative to the workdir.
    packages = {"domain", "tables", "streams", "api", "providers"}
    fields = Settings.model_fields
    config_paths = {
        str(fields[name].default).split("/")[0]
        for name in ("topics_file", "catalogue_file", "policy_file")
    }
    assert packages | config_paths <= copied


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".cache", "var", ".git", ".pytest_cache"} <= ignored


def test_makefile_has_the_documented_targets() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", makefile, re.M))
    wanted = {"help", "run", "test", "lint", "kafka-up", "kafka-down", "kafka-reset", "topics"}
    assert wanted <= targets, wanted - targets
    phony = set(re.findall(r"^\.PHONY:(.*)$", makefile, re.M)[0].split())
    assert wanted <= phony, wanted - phony
    recipes = dict(re.findall(r"^([A-Za-z][\w-]*):[^\n]*\n((?:\t[^\n]*\n)+)", makefile, re.M))
    assert re.search(r"-m streams\.run\s*$", recipes["run"], re.M)
    assert "-m streams.run --demo" in recipes["demo"]
    assert "-m streams.admin" in recipes["topics"]
