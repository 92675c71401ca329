"""Per-worker runtime state that is not job state: policy, catalogue, provider health."""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from domain.catalogue import (
    Catalogue,
    ResolvedProviders,
    Unavailable,
    load_catalogue,
    parse_provider_list,
    resolve_providers,
)
from domain.decide import Context, Observation
from domain.health import (
    ProviderHealth,
    effective_circuit,
    initial_health,
    observe,
)
from domain.messages import HealthRecord
from domain.policy import RoutingPolicy, load_policy
from streams.settings import Settings

log = logging.getLogger(__name__)


def load_providers(settings: Settings, env: Mapping[str, str] | None = None) -> ResolvedProviders:
    """The catalogue as this process runs it: CP_ENABLE_PROVIDERS applied, API keys checked."""
    return resolve_providers(
        load_catalogue(settings.catalogue_file),
        enable=parse_provider_list(settings.enable_providers),
        env=os.environ if env is None else env,
    )


def report_providers(resolved: ResolvedProviders, *, worker: str) -> None:
    """Say at start which providers run here and which enabled ones are left out, and why."""
    for name, why in resolved.unavailable.items():
        log.warning(
            "provider left out: %s",
            why.reason,
            extra={
                "event": "provider.unavailable",
                "provider": name,
                "reason_code": why.reason_code,
                "reason": why.reason,
                "worker": worker,
            },
        )
    log.info(
        "providers",
        extra={
            "event": "providers.resolved",
            "routable": resolved.routable(),
            "unavailable": sorted(resolved.unavailable),
            "worker": worker,
        },
    )


@dataclass
class HealthBook:
    """Provider health of the whole cluster (latency, errors, circuit), folded from cp.health.

    Every worker folds the same records in the same order (`streams.health.HealthFeed`), so a
    circuit opened by failures seen through one worker is open on all of them.
    """

    policy: RoutingPolicy
    providers: dict[str, ProviderHealth] = field(default_factory=dict)
    #: Time of the newest outcome folded (None: nothing yet).
    as_of: datetime | None = None
    folded: int = 0

    def observe(self, observation: Observation | HealthRecord) -> None:
        current = self.providers.get(observation.provider) or initial_health(observation.provider)
        self.providers[observation.provider] = observe(
            current,
            ok=observation.ok,
            latency_ms=observation.latency_ms,
            at=observation.at,
            policy=self.policy.circuit,
        )
        self.folded += 1
        if self.as_of is None or observation.at > self.as_of:
            self.as_of = observation.at

    def snapshot(self) -> dict[str, ProviderHealth]:
        return dict(self.providers)


@dataclass
class WakeIndex:
    """When each job of a partition needs a timer step; rebuilt by a restore."""

    due: dict[str, datetime] = field(default_factory=dict)
    _heap: list[tuple[datetime, str]] = field(default_factory=list)

    def set(self, job_id: str, when: datetime | None) -> None:
        if when is None:
            self.due.pop(job_id, None)
            return
        if self.due.get(job_id) == when:
            return
        self.due[job_id] = when
        heapq.heappush(self._heap, (when, job_id))

    def pop_due(self, now: datetime, limit: int = 1000) -> list[str]:
        """Return jobs whose time has come (each once per scheduled time)."""
        ready: list[str] = []
        while self._heap and self._heap[0][0] <= now and len(ready) < limit:
            when, job_id = heapq.heappop(self._heap)
            if self.due.get(job_id) == when:
                del self.due[job_id]
                ready.append(job_id)
        if len(self._heap) > 4 * len(self.due) + 1024:
            self._heap = [(w, j) for j, w in self.due.items()]
            heapq.heapify(self._heap)
        return ready

    def clear(self) -> None:
        self.due.clear()
        self._heap.clear()


@dataclass
class Runtime:
    catalogue: Catalogue
    policy: RoutingPolicy
    health: HealthBook
    #: Enabled providers routing must leave out here (no API key), with why.
    unavailable: dict[str, Unavailable] = field(default_factory=dict)

    @classmethod
    def load(cls, settings: Settings, env: Mapping[str, str] | None = None) -> Runtime:
        policy = load_policy(settings.policy_file)
        resolved = load_providers(settings, env)
        return cls(
            catalogue=resolved.catalogue,
            policy=policy,
            health=HealthBook(policy),
            unavailable=resolved.unavailable,
        )

    @property
    def providers(self) -> ResolvedProviders:
        return ResolvedProviders(self.catalogue, self.unavailable)

    def circuits(self) -> dict[str, str]:
        """Each observed provider's circuit state now."""
        now = datetime.now(UTC)
        return {
            name: effective_circuit(health, now, self.policy.circuit)
            for name, health in self.health.providers.items()
        }

    def context(self) -> Context:
        return Context(
            catalogue=self.catalogue,
            policy=self.policy,
            health=self.health.snapshot(),
            unavailable=self.unavailable,
            health_as_of=self.health.as_of,
        )
