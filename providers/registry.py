"""Build one adapter per enabled catalogue provider."""

from __future__ import annotations

import logging
import os

from domain.catalogue import Catalogue, ProviderSpec
from providers.anthropic_adapter import AnthropicProvider
from providers.base import ProviderAdapter
from providers.openai_compat import OpenAICompatibleProvider
from providers.simulated import SimulatedProvider, SimulationProfile

log = logging.getLogger(__name__)


class MissingCredentials(RuntimeError):
    """A provider is enabled in the catalogue but its API key variable is not set."""


def build_adapter(spec: ProviderSpec, *, timeout_s: float, seed: int = 0) -> ProviderAdapter:
    if spec.kind == "simulated":
        sim = spec.simulation
        assert sim is not None  # the catalogue requires it for simulated providers
        profile = SimulationProfile(
            latency_ms=sim.latency_ms,
            latency_jitter_ms=sim.latency_jitter_ms,
            error_rate=sim.error_rate,
            error_code=sim.error_code.value,
        )
        return SimulatedProvider(spec.name, profile, seed=seed)
    key = os.environ.get(spec.api_key_env or "", "")
    if not key:
        raise MissingCredentials(
            f"provider {spec.name} needs its API key in ${spec.api_key_env}; set it or disable "
            f"the provider in the catalogue"
        )
    default_tokens = max(m.max_output_tokens for m in spec.models)
    if spec.kind == "openai-compatible":
        assert spec.base_url is not None
        return OpenAICompatibleProvider(
            spec.name, spec.base_url, key, timeout_s, min(default_tokens, 4096)
        )
    return AnthropicProvider(spec.name, key, spec.base_url, timeout_s, min(default_tokens, 4096))


def build_adapters(
    catalogue: Catalogue, *, timeout_s: float, seed: int = 0
) -> dict[str, ProviderAdapter]:
    """Adapters for every enabled provider; a provider without credentials is left out, loudly."""
    adapters: dict[str, ProviderAdapter] = {}
    for spec in catalogue.providers:
        if not spec.enabled:
            continue
        try:
            adapters[spec.name] = build_adapter(spec, timeout_s=timeout_s, seed=seed)
        except MissingCredentials as exc:
            log.error("provider left out", extra={"provider": spec.name, "reason": str(exc)})
    return adapters
