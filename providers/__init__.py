"""Provider adapters: make one attempt of a job at one LLM provider and report how it ended."""

from providers.base import Completed, Failed, NoAnswer, Outcome, ProviderAdapter
from providers.simulated import SimulatedProvider, SimulationProfile

__all__ = [
    "Completed",
    "Failed",
    "NoAnswer",
    "Outcome",
    "ProviderAdapter",
    "SimulatedProvider",
    "SimulationProfile",
]
