"""Versioned provider catalogue: which providers and models exist, what they can do and cost.

The catalogue is data (`config/catalogue.yaml`), validated into frozen pydantic models that reject
unknown fields. `load_yaml_model` is shared with `domain.policy` so every config error reads the
same way: the file, the dotted path of the offending field (with provider/model names), the reason.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from domain.errors import ErrorCode
from domain.messages import ProviderName
from domain.money import TokenPrices

ProviderKind = Literal["simulated", "openai-compatible", "anthropic"]

_M = TypeVar("_M", bound=BaseModel)


class ConfigError(ValueError):
    """Raised when a catalogue or policy file cannot be parsed or validated."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SimulationProfile(_Frozen):
    """How the simulated provider behaves: latency around a mean, and a random error rate."""

    latency_ms: int = Field(ge=0, le=600_000)
    latency_jitter_ms: int = Field(default=0, ge=0, le=600_000)
    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    error_code: ErrorCode = ErrorCode.PROVIDER_INTERNAL


class ModelSpec(_Frozen):
    """One model of a provider: capabilities, limits, list prices and expected latency."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@/\-]+$")
    capabilities: list[str] = Field(default_factory=list)
    context_window: int = Field(gt=0)
    max_output_tokens: int = Field(gt=0)
    prices: TokenPrices | None = None
    expected_latency_ms: int = Field(gt=0)
    #: How long this model has to answer an attempt (overrides the provider's and the policy's).
    attempt_timeout_ms: int | None = Field(default=None, ge=1000, le=600_000)

    @field_validator("capabilities")
    @classmethod
    def _unique_capabilities(cls, value: list[str]) -> list[str]:
        dupes = sorted({c for c in value if value.count(c) > 1})
        if dupes:
            raise ValueError(f"duplicate capabilities: {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _output_fits_context(self) -> ModelSpec:
        if self.max_output_tokens > self.context_window:
            raise ValueError(
                f"max_output_tokens ({self.max_output_tokens}) exceeds "
                f"context_window ({self.context_window})"
            )
        return self

    def supports(self, capabilities: list[str]) -> list[str]:
        """Return the requested capabilities this model lacks (empty when it has them all)."""
        have = set(self.capabilities)
        return sorted({c for c in capabilities if c not in have})


class ProviderSpec(_Frozen):
    """One provider endpoint and its models; disabled providers stay listed but are never routed."""

    name: ProviderName
    kind: ProviderKind
    enabled: bool = True
    region: str = Field(min_length=1)
    base_url: str | None = None
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    genai_provider_id: str | None = None
    simulation: SimulationProfile | None = None
    #: How long this provider's models have to answer an attempt (overrides the policy's).
    attempt_timeout_ms: int | None = Field(default=None, ge=1000, le=600_000)
    models: list[ModelSpec] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _unique_models(cls, value: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model names: {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _kind_fields(self) -> ProviderSpec:
        if self.kind != "simulated" and self.simulation is not None:
            raise ValueError(f"simulation is only allowed for kind 'simulated', not {self.kind!r}")
        if self.kind == "simulated" and self.simulation is None:
            raise ValueError("kind 'simulated' needs a simulation profile")
        if self.kind == "openai-compatible" and not self.base_url:
            raise ValueError("kind 'openai-compatible' needs base_url")
        return self

    def model(self, name: str) -> ModelSpec | None:
        """Return the model called `name`, or None when this provider has no such model."""
        return next((m for m in self.models if m.name == name), None)


class Catalogue(_Frozen):
    """A versioned set of providers; provider names are unique."""

    version: str = Field(min_length=1, max_length=64)
    providers: list[ProviderSpec] = Field(min_length=1)

    @field_validator("providers")
    @classmethod
    def _unique_providers(cls, value: list[ProviderSpec]) -> list[ProviderSpec]:
        names = [p.name for p in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate provider names: {', '.join(dupes)}")
        return value

    def provider(self, name: str) -> ProviderSpec | None:
        """Return the provider called `name`, or None when the catalogue has none."""
        return next((p for p in self.providers if p.name == name), None)

    def model(self, provider: str, model: str) -> ModelSpec | None:
        """Return the model of a target, or None when the target is not in the catalogue."""
        spec = self.provider(provider)
        return None if spec is None else spec.model(model)

    def attempt_timeout_ms(self, provider: str, model: str) -> tuple[int | None, str | None]:
        """The catalogue's attempt timeout of a target and where it is set ("model",
        "provider"), or (None, None) when the catalogue leaves it to the policy."""
        spec = self.provider(provider)
        found = None if spec is None else spec.model(model)
        if found is not None and found.attempt_timeout_ms is not None:
            return found.attempt_timeout_ms, "model"
        if spec is not None and spec.attempt_timeout_ms is not None:
            return spec.attempt_timeout_ms, "provider"
        return None, None

    def targets(self) -> Iterator[tuple[ProviderSpec, ModelSpec]]:
        """Yield every (provider, model) pair in name order, enabled or not."""
        for spec in sorted(self.providers, key=lambda p: p.name):
            for model in sorted(spec.models, key=lambda m: m.name):
                yield spec, model


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Why a catalogue provider cannot be routed to in this process (routing reason code)."""

    reason_code: Literal["missing_credentials"]
    reason: str


@dataclass(frozen=True, slots=True)
class ResolvedProviders:
    """The catalogue as this process runs it: switched on from the environment, keys checked."""

    catalogue: Catalogue
    #: Enabled providers that cannot be routed to here, with why.
    unavailable: dict[str, Unavailable]

    def routable(self) -> list[str]:
        """Names of the enabled providers routing may choose, in catalogue order."""
        return [
            p.name for p in self.catalogue.providers if p.enabled and p.name not in self.unavailable
        ]


def parse_provider_list(value: str) -> list[str]:
    """Split a comma-separated list of provider names (blanks ignored)."""
    return [name.strip() for name in value.split(",") if name.strip()]


def resolve_providers(
    catalogue: Catalogue, *, enable: Collection[str], env: Mapping[str, str]
) -> ResolvedProviders:
    """Switch on the providers named in `enable` and check every enabled provider's key.

    `enable` names catalogue providers to run even when the catalogue says `enabled: false`
    (the `CP_ENABLE_PROVIDERS` setting); a name the catalogue does not have is a ConfigError. An
    enabled provider whose `api_key_env` variable is unset or empty in `env` stays listed but is
    unavailable (`missing_credentials`): routing excludes it with that reason.
    """
    known = {p.name for p in catalogue.providers}
    unknown = sorted(set(enable) - known)
    if unknown:
        raise ConfigError(
            f"cannot enable {', '.join(unknown)}: not in catalogue {catalogue.version} "
            f"(it has {', '.join(sorted(known))}); add the provider to the catalogue first"
        )
    providers = [
        p.model_copy(update={"enabled": True}) if p.name in enable and not p.enabled else p
        for p in catalogue.providers
    ]
    unavailable: dict[str, Unavailable] = {}
    for spec in providers:
        if spec.enabled and spec.api_key_env and not env.get(spec.api_key_env, "").strip():
            unavailable[spec.name] = Unavailable(
                "missing_credentials",
                f"provider {spec.name} is enabled but ${spec.api_key_env} is not set",
            )
    return ResolvedProviders(catalogue.model_copy(update={"providers": providers}), unavailable)


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML loader that refuses duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _read_source(source: str | Path) -> tuple[str, str]:
    """Return (text, label): a Path or a one-line `*.yaml`/`*.yml` string is read as a file."""
    if isinstance(source, Path):
        return source.read_text(encoding="utf-8"), str(source)
    if "\n" not in source and source.strip().endswith((".yaml", ".yml")):
        path = Path(source.strip())
        return path.read_text(encoding="utf-8"), str(path)
    return source, "<text>"


def _label_loc(loc: tuple[int | str, ...], data: Any) -> str:
    """Render a pydantic error location as a dotted path, naming list items by their `name`."""
    parts: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(item, int):
            name = None
            if isinstance(node, list) and 0 <= item < len(node):
                node = node[item]
                if isinstance(node, Mapping):
                    name = node.get("name")
            else:
                node = None
            parts.append(f"[{item}]" if name is None else f"[{item}]({name})")
        elif item == "[key]":
            parts.append(" (key)")
        else:
            node = node.get(item) if isinstance(node, Mapping) else None
            parts.append(f".{item}" if parts else item)
    return "".join(parts) or "<root>"


def format_validation_error(exc: ValidationError, data: Any) -> str:
    """Render every validation error as `path: message`, one per line, for humans."""
    lines = []
    for err in exc.errors(include_url=False):
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {_label_loc(tuple(err['loc']), data)}: {message}")
    return "\n".join(lines)


def load_yaml_model(source: str | Path, model: type[_M], what: str) -> _M:
    """Parse YAML text or a file into `model`, raising ConfigError that names the bad field."""
    try:
        text, label = _read_source(source)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid {what} ({label}): not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {what} ({label}): top level must be a mapping")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            f"invalid {what} ({label}):\n{format_validation_error(exc, data)}"
        ) from exc


def load_catalogue(source: str | Path) -> Catalogue:
    """Load and validate a provider catalogue from YAML text or a file path."""
    return load_yaml_model(source, Catalogue, "catalogue")
