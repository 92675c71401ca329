"""Faust topic objects for every topic of topics.yaml; all carry raw bytes, parsed in agents."""

from __future__ import annotations

from dataclasses import dataclass

import faust
from faust.types import TopicT

from streams.settings import Settings
from streams.topology import Topology


def raw_topic(app: faust.App, name: str, partitions: int) -> TopicT:
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
        internal=False,
    )


@dataclass(frozen=True)
class Topics:
    intake: TopicT
    commands: TopicT
    results: TopicT
    events: TopicT
    responses: TopicT
    dlq: TopicT
    dispatch: dict[str, TopicT]

    @classmethod
    def declare(cls, app: faust.App, settings: Settings, topology: Topology) -> Topics:
        def topic(name: str) -> TopicT:
            return raw_topic(app, settings.topic(name), topology[name].partitions)

        return cls(
            intake=topic("cp.intake"),
            commands=topic("cp.commands"),
            results=topic("cp.results"),
            events=topic("cp.events"),
            responses=topic("cp.responses"),
            dlq=topic("cp.dlq"),
            dispatch={
                provider: raw_topic(app, settings.topic(spec.name), spec.partitions)
                for provider, spec in topology.dispatch_topics().items()
            },
        )
