"""Catalogue loading: the shipped file is valid, bad files fail naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from domain.catalogue import Catalogue, ConfigError, ModelSpec, load_catalogue

CONFIG = Path(__file__).resolve().parents[2] / "config"
SHIPPED = (CONFIG / "catalogue.yaml").read_text(encoding="utf-8")

MINIMAL = """
version: "t1"
providers:
  - name: sim-a
    kind: simulated
    region: local
    simulation: {latency_ms: 100}
    models:
      - name: m1
        capabilities: [chat]
        context_window: 1000
        max_output_tokens: 100
        prices: {input_per_mtok: "1", output_per_mtok: "2"}
        expected_latency_ms: 100
"""


def test_shipped_catalogue_loads_from_path_and_text() -> None:
    from_path = load_catalogue(CONFIG / "catalogue.yaml")
    assert from_path == load_catalogue(SHIPPED)
    assert from_path == load_catalogue(str(CONFIG / "catalogue.yaml"))
    assert from_path.version == "2026-11-26.1"
    enabled = [p for p in from_path.providers if p.enabled]
    assert {p.name for p in enabled} >= {"sim-fast", "sim-smart", "sim-cheap"}
    assert all(p.kind == "simulated" and p.simulation is not None for p in enabled)


def test_shipped_real_providers_are_disabled_examples() -> None:
    cat = load_catalogue(SHIPPED)
    openai = cat.provider("openai")
    anthropic = cat.provider("anthropic")
    assert openai is not None and anthropic is not None
    assert not openai.enabled and not anthropic.enabled
    assert openai.kind == "openai-compatible"
    assert openai.base_url == "https://api.openai.com/v1"
    assert openai.api_key_env == "OPENAI_API_KEY"
    assert openai.genai_provider_id == "openai"
    assert openai.model("gpt-4o-mini") is not None
    assert anthropic.kind == "anthropic"
    assert anthropic.api_key_env == "ANTHROPIC_API_KEY"


def test_shipped_simulated_providers_differ() -> None:
    cat = load_catalogue(SHIPPED)
    sims = [p for p in cat.providers if p.kind == "simulated"]
    latencies = {p.simulation.latency_ms for p in sims if p.simulation is not None}
    assert len(latencies) == len(sims)
    fast = cat.model("sim-fast", "swift-mini-sim")
    smart = cat.model("sim-smart", "sage-pro-sim")
    cheap = cat.model("sim-cheap", "thrift-nano-sim")
    assert fast is not None and smart is not None and cheap is not None
    assert "vision" not in fast.capabilities and "vision" in smart.capabilities
    assert cheap.context_window < fast.context_window < smart.context_window
    assert cheap.prices is not None and fast.prices is not None and smart.prices is not None
    assert cheap.prices.output_per_mtok < fast.prices.output_per_mtok
    assert fast.prices.output_per_mtok < smart.prices.output_per_mtok


def test_targets_are_in_name_order() -> None:
    cat = load_catalogue(SHIPPED)
    pairs = [(p.name, m.name) for p, m in cat.targets()]
    assert pairs == sorted(pairs)


def test_models_are_frozen() -> None:
    cat = load_catalogue(MINIMAL)
    with pytest.raises(ValidationError):
        cat.providers[0].models[0].context_window = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "context_window: 1000",
            "context_window: 0",
            "providers[0](sim-a).models[0](m1).context_window",
        ),
        (
            'input_per_mtok: "1"',
            "input_per_mtok: 1.5",
            "providers[0](sim-a).models[0](m1).prices.input_per_mtok",
        ),
        ("    region: local", "    region: local\n    colour: red", "providers[0](sim-a).colour"),
        ("kind: simulated", "kind: bedrock", "providers[0](sim-a).kind"),
        ("max_output_tokens: 100", "max_output_tokens: 5000", "exceeds context_window"),
        ('version: "t1"', "", "version: Field required"),
        ("    simulation: {latency_ms: 100}\n", "", "needs a simulation profile"),
        ("{latency_ms: 100}", "{latency_ms: 100, error_rate: 2}", "simulation.error_rate"),
    ],
)
def test_bad_catalogue_names_the_field(old: str, new: str, expected: str) -> None:
    assert old in MINIMAL
    with pytest.raises(ConfigError, match="invalid catalogue") as info:
        load_catalogue(MINIMAL.replace(old, new))
    assert expected in str(info.value)


def test_duplicate_provider_names_rejected() -> None:
    providers = MINIMAL.split("providers:\n", 1)[1]
    text = MINIMAL + providers
    with pytest.raises(ConfigError, match="duplicate provider names: sim-a"):
        load_catalogue(text)


def test_duplicate_model_names_rejected() -> None:
    model = MINIMAL.split("    models:\n", 1)[1]
    with pytest.raises(ConfigError, match="duplicate model names: m1"):
        load_catalogue(MINIMAL + model)


def test_duplicate_yaml_keys_rejected() -> None:
    text = MINIMAL.replace("    region: local", "    region: local\n    region: other")
    with pytest.raises(ConfigError, match="duplicate key 'region'"):
        load_catalogue(text)


def test_syntax_error_and_non_mapping_are_clear() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_catalogue("version: [")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_catalogue("- 1\n- 2\n")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read catalogue file"):
        load_catalogue(tmp_path / "nope.yaml")


def test_openai_compatible_needs_base_url() -> None:
    text = MINIMAL.replace("kind: simulated", "kind: openai-compatible").replace(
        "    simulation: {latency_ms: 100}\n", "    api_key_env: KEY\n"
    )
    with pytest.raises(ConfigError, match="needs base_url"):
        load_catalogue(text)


def test_missing_capabilities_listed() -> None:
    model = ModelSpec(
        name="m",
        capabilities=["chat", "tools"],
        context_window=10,
        max_output_tokens=5,
        expected_latency_ms=1,
    )
    assert model.supports(["tools", "vision", "json_mode"]) == ["json_mode", "vision"]
    assert model.supports([]) == []


def test_catalogue_round_trips_through_json() -> None:
    cat = load_catalogue(SHIPPED)
    assert Catalogue.model_validate_json(cat.model_dump_json()) == cat


def test_attempt_timeouts_on_a_provider_and_a_model() -> None:
    text = MINIMAL.replace(
        "    simulation: {latency_ms: 100}\n",
        "    simulation: {latency_ms: 100}\n    attempt_timeout_ms: 5000\n",
    )
    cat = load_catalogue(text)
    assert cat.attempt_timeout_ms("sim-a", "m1") == (5000, "provider")
    with_model = text.replace(
        "        expected_latency_ms: 100\n",
        "        expected_latency_ms: 100\n        attempt_timeout_ms: 7000\n",
    )
    assert load_catalogue(with_model).attempt_timeout_ms("sim-a", "m1") == (7000, "model")
    assert load_catalogue(MINIMAL).attempt_timeout_ms("sim-a", "m1") == (None, None)
    assert cat.attempt_timeout_ms("nobody", "m1") == (None, None)


@pytest.mark.parametrize("value", [999, 600_001])
def test_an_attempt_timeout_outside_1s_to_10min_names_the_field(value: int) -> None:
    text = MINIMAL.replace(
        "    simulation: {latency_ms: 100}\n",
        f"    simulation: {{latency_ms: 100}}\n    attempt_timeout_ms: {value}\n",
    )
    with pytest.raises(ConfigError, match=r"providers\[0\]\(sim-a\)\.attempt_timeout_ms"):
        load_catalogue(text)
