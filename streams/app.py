"""The control-plane faust application; `faust -A streams.app worker` starts a worker."""

from __future__ import annotations

import asyncio
import gc
import logging

import faust
from faust.sensors.prometheus import setup_prometheus_sensors
from mode import Service
from prometheus_client import CollectorRegistry

from api.problems import problem_documents
from streams.core import JobCore
from streams.health import HealthFeed
from streams.logs import logging_config
from streams.metrics import Metrics
from streams.runtime import Runtime
from streams.settings import Settings, get_settings
from streams.topics import Topics
from streams.topology import Topology, catalogue_topology
from streams.tracing import setup_tracing

log = logging.getLogger(__name__)

#: Young-generation collections every 50,000 allocations instead of 700 (measured in bench/).
GC_THRESHOLDS = (50_000, 50, 100)


def create_app(settings: Settings, topology: Topology) -> faust.App:
    """Build the faust app from settings, with the unauthenticated table and router pages off."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return faust.App(
        settings.app_id,
        broker=[
            f"kafka://{server.strip()}" for server in settings.kafka_bootstrap_servers.split(",")
        ],
        store=settings.store,
        datadir=str(settings.data_dir),
        autodiscover=False,
        # The job core (streams.core) runs its own transactions, one per partition; faust's
        # exactly_once would leave sends to topics it does not consume outside them (#177).
        processing_guarantee="at_least_once",
        topic_partitions=topology.job_partitions(),
        topic_replication_factor=1,
        topic_allow_declare=True,
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_interval_s,
        web_enabled=True,
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        canonical_url=settings.canonical_url,
        web_router_enabled=False,
        web_tables_enabled=False,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_application_options={"middlewares": [problem_documents]},
        table_standby_replicas=0,
        producer_max_request_size=2 * 1024 * 1024,
        producer_max_batch_size=1024 * 1024,
        producer_linger=settings.producer_linger_ms / 1000,
        consumer_auto_offset_reset="earliest",
        logging_config=logging_config(settings),
    )


settings = get_settings()
setup_tracing("control-plane")
topology = catalogue_topology(settings.topics_file, settings.catalogue_file)
app = create_app(settings, topology)
# The job core consumes with a consumer of its own (streams.core). faust's would subscribe to no
# topic yet join a group of its own and poll and heartbeat in a thread of its own: ~3.7 ms of CPU
# per idle second of every worker (bench/results.md). faust's producer and web server stay.
app.boot_strategy = app.BootStrategy(app, enable_kafka_consumer=False)
runtime = Runtime.load(settings)
topics = Topics.declare(app, settings, topology)
registry = CollectorRegistry()
metrics = Metrics(registry, circuits=runtime.circuits)
setup_prometheus_sensors(app, pattern="/metrics", registry=registry, name_prefix="faust")

core = JobCore(
    settings,
    runtime,
    metrics,
    url=settings.canonical_url,
    partitions=topology.job_partitions(),
    dispatch_topics={provider: t.get_topic_name() for provider, t in topics.dispatch.items()},
)

health_feed = HealthFeed(settings, runtime.health, registry)


@app.service
class CoreService(Service):
    """Start the job core with the worker and stop it (committing what is open) before it."""

    async def on_start(self) -> None:
        # The job core allocates many small objects per job and holds thousands of jobs: move
        # what start-up built out of the collector's way and collect the young generation less
        # often (measured in bench/results.md).
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        # Routing starts with the cluster's provider health, not an empty one.
        await health_feed.start()
        if readhub is not None:
            core.view_listener = readhub
            await readhub.start()
        await core.start()
        assert core.task is not None
        core.task.add_done_callback(self._core_ended)

    async def on_stop(self) -> None:
        if readhub is not None:
            await readhub.stop()
        await core.stop()
        await health_feed.stop()

    def _core_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or core.stopping:
            return
        error = task.exception() or RuntimeError("job core ended")
        core.crashed = error
        log.critical("job core crashed", extra={"event": "core.crashed", "error": repr(error)})
        app._crash(error)


# Register the web views on the app (autodiscovery is off: explicit is faster).
from api import openai_front, views  # noqa: E402, F401
from api.readhub import ReadHub  # noqa: E402

#: The reader processes' hub, when a read port is set (`CP_READ_PORT`).
readhub = (
    ReadHub(
        settings,
        views.held_view,
        lambda outcome, n: metrics.reader_reads.labels(outcome=outcome).inc(n),
        lambda: core.lease.until,
    )
    if settings.read_port
    else None
)
