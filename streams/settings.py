"""Typed, frozen settings read once from the environment (prefix CP_)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from yarl import URL

#: Longest fetch gather window: `CP_FETCH_GATHER_MS`, and what `CP_FETCH_GATHER_PER_WORKER` sets.
MAX_GATHER_MS = 1000


class Settings(BaseSettings):
    """Every knob of a worker; each has an env var, a default and a line in the README."""

    model_config = SettingsConfigDict(env_prefix="CP_", frozen=True, extra="ignore")

    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("CP_KAFKA_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS"),
    )
    app_id: str = "prompt-gateway-cp"
    topic_prefix: str = ""
    topics_file: Path = Path("topics.yaml")
    catalogue_file: Path = Path("config/catalogue.yaml")
    #: Catalogue providers to run although the catalogue says `enabled: false` (comma-separated
    #: names, e.g. `openai,anthropic`): a real provider is switched on from the environment alone.
    enable_providers: str = ""
    policy_file: Path = Path("config/policy.yaml")
    store: str = "rocksdb://"
    data_dir: Path = Path("var/workers/cp-1")
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    web_advertised_url: str | None = None
    broker_session_timeout_s: float = 10.0
    broker_heartbeat_interval_s: float = 1
    timer_interval_s: float = 0.25
    producer_linger_ms: int = 3
    commit_interval_ms: int = 100
    core_max_poll_records: int = 200
    #: How long the broker may hold a fetch with nothing new for the job core's and the provider
    #: worker's consumers; records arriving meanwhile answer it at once. 10 ms cost an idle worker
    #: ~90 ms CPU per second, 100 ms ~25 ms, latency alike (bench/results.md, "Fetch wait").
    fetch_max_wait_ms: int = Field(default=100, ge=1, le=5000)
    #: Under traffic, how long the broker may gather records for one fetch of those consumers
    #: before it answers (0: answer with the first record). Each hop of a job waits up to this
    #: much more, and in return a step's fixed costs (fetch, wake-up, transaction) are shared;
    #: a quiet consumer keeps answering at once (`streams.pacing`). At 150 jobs/s, 40 ms cut
    #: the CPU per job by ~40% at the same latency (bench/results.md, "the gather A/B").
    fetch_gather_ms: int = Field(default=40, ge=0, le=MAX_GATHER_MS)
    #: The job core gathers for `fetch_gather_ms` times the control-plane workers in its group (at
    #: most 1,000 ms), set again at every assignment: the cluster then makes as many fetch
    #: cycles and transactions per second as one worker, and CPU per job stays flat as workers
    #: are added at a fixed rate, for a longer wait on each hop (bench/results.md, "gather").
    fetch_gather_per_worker: bool = False
    #: Longest the job core applies records before it lets the event loop serve HTTP (ms).
    core_turn_slice_ms: float = 2
    #: Rendered status views (GET /jobs/{id}) a worker keeps, split evenly over its partitions.
    status_views: int = 32768
    #: A second HTTP port (0: none) on which reader processes answer `GET /jobs/{id}` of this
    #: worker's jobs from the status views the job core hands them, in their own processes, so
    #: that reads use other cores than the job core's and do not queue behind its steps. The
    #: port forwards every other request to the worker (`api.reader`).
    read_port: int = Field(default=0, ge=0, le=65535)
    #: Reader processes sharing the read port (SO_REUSEPORT), started and restarted by the worker.
    #: On 2 cores busy ingesting, two sustained 5,000 reads/s where one fell behind
    #: (bench/results.md).
    readers: int = Field(default=2, ge=1, le=64)
    #: How much of the cluster's provider health (cp.health) a starting worker replays.
    health_replay_s: float = 300.0
    job_retention_s: float = 72 * 3600.0
    idempotency_window_s: float = 7 * 24 * 3600.0
    provider_concurrency: int = 64
    provider_group_id: str = "prompt-gateway-providers"
    provider_timeout_s: float = 60.0
    provider_data_dir: Path = Path("var/workers/providers-1")
    #: How long a stopping provider worker lets its calls in flight finish (below the 20 s that
    #: `make run` waits for a worker to stop); calls still running then are left to the next one.
    provider_shutdown_grace_s: float = 15.0
    #: How long a handled idempotency key is kept: past cp.dispatch.* retention (7 days) plus the
    #: age of a log segment (up to 7 days more), after which no dispatch can come back.
    provider_handled_retention_s: float = 14 * 24 * 3600.0
    provider_web_port: int = 6067
    #: Completion webhooks (domain.webhooks, providers.webhooks): callback hosts allowed (globs,
    #: `http://host` entries also allow plain http); empty refuses every callback_url.
    webhook_allowed_hosts: str = ""
    #: `tenant=secret` pairs signing each tenant's webhooks (`whsec_<base64>` or plain text).
    webhook_secrets: SecretStr | None = None
    webhook_secrets_file: Path | None = None
    webhook_group_id: str = "prompt-gateway-webhooks"
    #: Webhook POSTs in flight per sender; deliveries waiting for a retry hold no slot.
    webhook_concurrency: int = 64
    webhook_timeout_s: float = 10.0
    #: Retry backoff: base, doubled after each failed attempt, capped; given up once the next
    #: attempt would come later than `webhook_max_age_s` after the job ended.
    webhook_retry_base_s: float = 5.0
    webhook_retry_max_s: float = 3600.0
    webhook_max_age_s: float = 86400.0
    max_request_bytes: int = 900_000
    #: A provider result on cp.results; bigger answers fail their attempt (`malformed_response`).
    #: With it, every record the job core writes fits its topic (a row holds an answer twice).
    max_result_bytes: int = 512_000
    api_keys: SecretStr | None = None
    api_keys_file: Path | None = None
    #: Signs the short-lived timeline links of `GET /jobs/{id}` (api.links); every worker must
    #: have the same one. Unset: derived from the API key configuration.
    link_secret: SecretStr | None = None
    #: How long a signed timeline link opens the page.
    link_ttl_s: float = 900.0
    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"
    #: Tests and `make chaos` only: a job whose request metadata has `cp_fault` set to a stage
    #: name (`decide`, `after_write`) makes the job core raise there. Off in production.
    fault_injection: bool = False

    def topic(self, name: str, *, prefixed: bool = True) -> str:
        """Return the real topic name of a logical name from topics.yaml."""
        real = name.replace("{app_id}", self.app_id)
        return self.topic_prefix + real if prefixed else real

    @property
    def read_socket(self) -> Path:
        """The Unix socket over which the worker hands its reader processes status views."""
        return self.data_dir / "read.sock"

    @property
    def canonical_url(self) -> str:
        """The URL other workers use to reach this one's web views."""
        return self.web_advertised_url or f"http://{self.web_host}:{self.web_port}"

    @property
    def read_url(self) -> str:
        """The URL other workers' readers use to reach this one's read port ("" without one):
        the host of `canonical_url`, the read port."""
        if not self.read_port:
            return ""
        return str(URL(self.canonical_url).with_port(self.read_port).origin())


def local_url(host: str, port: int) -> str:
    """A web port bound on `host`, as a process on the same machine reaches it."""
    shown = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host  # noqa: S104 (comparison only)
    return f"http://{shown}:{port}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read settings once per process."""
    return Settings()
