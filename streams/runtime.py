"""Per-worker runtime state that is not job state: policy, catalogue, provider health."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from datetime import UTC, datetime

from domain.catalogue import Catalogue, load_catalogue
from domain.decide import Context, Observation
from domain.health import ProviderHealth, effective_circuit, initial_health, observe
from domain.policy import RoutingPolicy, load_policy
from streams.settings import Settings


@dataclass
class HealthBook:
    """Provider health observed from the results this worker applies (latency, errors, circuit)."""

    policy: RoutingPolicy
    providers: dict[str, ProviderHealth] = field(default_factory=dict)

    def observe(self, observation: Observation) -> None:
        current = self.providers.get(observation.provider) or initial_health(observation.provider)
        self.providers[observation.provider] = observe(
            current,
            ok=observation.ok,
            latency_ms=observation.latency_ms,
            at=observation.at,
            policy=self.policy.circuit,
        )

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

    @classmethod
    def load(cls, settings: Settings) -> Runtime:
        policy = load_policy(settings.policy_file)
        return cls(
            catalogue=load_catalogue(settings.catalogue_file),
            policy=policy,
            health=HealthBook(policy),
        )

    def circuits(self) -> dict[str, str]:
        """Each observed provider's circuit state now."""
        now = datetime.now(UTC)
        return {
            name: effective_circuit(health, now, self.policy.circuit)
            for name, health in self.health.providers.items()
        }

    def context(self) -> Context:
        return Context(catalogue=self.catalogue, policy=self.policy, health=self.health.snapshot())
