"""Providers come from the catalogue alone, on the real broker with real workers.

A new OpenAI-compatible provider is a catalogue entry and a key: `ensure_topics` (what `make
topics` runs) creates its dispatch topic, both workers pick it up, and jobs run on it against a
local OpenAI-compatible server. A worker that may route to (or call) a provider without a
dispatch topic refuses to start and says which provider and what to run.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.admin import ensure_topics
from tests.support.llm_server import LocalLLM, local_llm
from tests.support.stack import Stack, TopicReader, produce, to_json, write_test_config
from tests.support.workers import Worker, free_port

pytestmark = pytest.mark.integration

KEY_ENV = "CP_TEST_LOCAL_LLM_KEY"
MISSING_KEY_ENV = "CP_TEST_NOBODY_SET_THIS_KEY"


@pytest.fixture
def llm_server() -> Iterator[LocalLLM]:
    with local_llm() as server:
        yield server


def provider_entry(name: str, base_url: str, key_env: str) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "openai-compatible",
        "region": "local",
        "base_url": base_url,
        "api_key_env": key_env,
        "attempt_timeout_ms": 20_000,
        "models": [
            {
                "name": "pong-1",
                "capabilities": ["chat"],
                "context_window": 8192,
                "max_output_tokens": 1024,
                "prices": {"currency": "USD", "input_per_mtok": "1.00", "output_per_mtok": "2.00"},
                "expected_latency_ms": 50,
            }
        ],
    }


def stack_with(
    kafka_bootstrap: str, run_id: str, name: str, root: Path, extra: list[dict[str, Any]]
) -> Stack:
    """A stack whose catalogue is the test catalogue plus `extra` providers; no topics yet."""
    catalogue_path, policy_path = write_test_config(root / "config")
    catalogue = yaml.safe_load(catalogue_path.read_text())
    catalogue["providers"].extend(extra)
    catalogue["version"] = f"{catalogue['version']}-{name}"
    catalogue_path.write_text(yaml.safe_dump(catalogue, sort_keys=False))
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "CP_APP_ID": f"{run_id}-{name}",
        "CP_TOPIC_PREFIX": f"{run_id}.{name}.",
        "CP_CATALOGUE_FILE": str(catalogue_path),
        "CP_POLICY_FILE": str(policy_path),
        "CP_LOG_FORMAT": "json",
        "CP_TIMER_INTERVAL_S": "0.1",
        KEY_ENV: "sk-local-test",
    }
    return Stack(bootstrap=kafka_bootstrap, env=env, root=root)


def job(tenant: str, request_id: str, allow: list[str]) -> bytes:
    return to_json(
        {
            "request_id": request_id,
            "tenant_id": tenant,
            "messages": [{"role": "user", "content": f"ping {request_id}"}],
            "constraints": {"providers": {"allow": allow}},
        }
    )


async def finals(stack: Stack, tenant: str, count: int) -> dict[str, dict[str, Any]]:
    async with TopicReader(stack.bootstrap, stack.topic("cp.responses")) as reader:
        await reader.until(
            lambda _: (
                len({v["request_id"] for v in reader.values() if v["tenant_id"] == tenant}) >= count
            ),
            timeout=90,
            what=f"{count} final responses",
        )
        return {v["request_id"]: v for v in reader.values() if v["tenant_id"] == tenant}


async def test_a_provider_added_to_the_catalogue_alone_runs_jobs(
    kafka_bootstrap: str, run_id: str, tmp_path: Path, llm_server: LocalLLM
) -> None:
    base_url = f"http://127.0.0.1:{llm_server.port}/v1"
    stack = stack_with(
        kafka_bootstrap,
        run_id,
        "newprov",
        tmp_path,
        [
            provider_entry("local-llm", base_url, KEY_ENV),
            provider_entry("local-nokey", base_url, MISSING_KEY_ENV),
        ],
    )
    # What `make topics` does: the new providers' dispatch topics follow from the catalogue.
    report = await ensure_topics(stack.settings())
    assert not report.errors, report.errors
    assert stack.topic("cp.dispatch.local-llm") in report.created
    assert stack.topic("cp.dispatch.local-nokey") in report.created
    try:
        await asyncio.to_thread(stack.start_cp)
        await asyncio.to_thread(stack.start_providers)
        tenant = f"newprov-{uuid.uuid4().hex[:8]}"
        await produce(
            stack.bootstrap,
            stack.topic("cp.intake"),
            [job(tenant, f"r{i}", ["local-llm"]) for i in range(5)]
            + [job(tenant, "nokey", ["local-nokey"])],
        )
        results = await finals(stack, tenant, 6)
        async with TopicReader(stack.bootstrap, stack.topic("cp.events")) as reader:
            await reader.until(
                lambda _: (
                    sum(
                        1
                        for v in reader.values()
                        if v["tenant_id"] == tenant and v["type"] == "dispatched"
                    )
                    >= 5
                ),
                timeout=30,
                what="the dispatched events",
            )
            dispatched = [
                v["data"]
                for v in reader.values()
                if v["tenant_id"] == tenant and v["type"] == "dispatched"
            ]
    finally:
        await asyncio.to_thread(stack.stop)

    for i in range(5):
        final = results[f"r{i}"]
        assert (final["state"], final["provider"], final["model"]) == (
            "COMPLETED",
            "local-llm",
            "pong-1",
        ), final
        assert final["output"]["text"] == "pong"
        assert final["outcome"]["reason"] == "completed"
        # 12 input and 3 output tokens at the catalogue's 1.00 and 2.00 USD per million.
        assert Decimal(final["cost"]["total"]["amount"]) == Decimal("0.000018")
    # The catalogue's per-provider attempt timeout is the one used, and the timeline says so.
    assert {(d["provider"], d["timeout_ms"], d["timeout_source"]) for d in dispatched} == {
        ("local-llm", 20_000, "provider")
    }
    assert len(llm_server.calls) == 5
    assert {call["model"] for call in llm_server.calls} == {"pong-1"}
    assert set(llm_server.auth) == {"Bearer sk-local-test"}

    # Enabled without its key: left out of routing, saying why.
    nokey = results["nokey"]
    assert nokey["state"] == "FAILED"
    assert nokey["error"]["code"] == "no_eligible_target"
    assert "missing_credentials" in nokey["error"]["message"]
    outcome = nokey["outcome"]
    assert outcome["reason"] == "no_eligible_target"
    excluded = {(e["provider"], e["reason_code"]) for e in outcome["excluded"]}
    assert ("local-nokey", "missing_credentials") in excluded


def exits_with(worker: Worker, timeout: float = 90.0) -> tuple[int, str]:
    """Wait for a worker that should refuse to start; return its exit code and log."""
    assert worker.process is not None
    try:
        code = worker.process.wait(timeout=timeout)
    except Exception:
        worker.kill()
        raise AssertionError(f"the worker did not exit; log:\n{worker.tail(80)}") from None
    worker.stop()
    return code, worker.log_path.read_text(errors="replace")


def test_workers_refuse_to_start_when_a_routable_provider_has_no_topic(
    kafka_bootstrap: str, run_id: str, tmp_path: Path, spawned: list[Worker]
) -> None:
    stack = stack_with(kafka_bootstrap, run_id, "notopic", tmp_path, [])
    stack.create_topics()  # the shipped providers' topics only
    # Then the provider is added to the catalogue, and `make topics` is forgotten.
    catalogue_path = Path(stack.env["CP_CATALOGUE_FILE"])
    catalogue = yaml.safe_load(catalogue_path.read_text())
    catalogue["providers"].append(provider_entry("late-llm", "http://127.0.0.1:9/v1", KEY_ENV))
    catalogue_path.write_text(yaml.safe_dump(catalogue, sort_keys=False))
    topic = stack.topic("cp.dispatch.late-llm")

    cp = Worker.faust(
        "streams.app",
        env=stack.env,
        data_dir=tmp_path / "data" / "cp",
        web_port=free_port(),
        log_path=tmp_path / "logs" / "cp.log",
    ).start()
    port = free_port()
    providers = Worker(
        [sys.executable, "-m", "providers.worker"],
        env={
            **stack.env,
            "CP_PROVIDER_DATA_DIR": str(tmp_path / "data" / "providers"),
            "CP_PROVIDER_WEB_PORT": str(port),
        },
        log_path=tmp_path / "logs" / "providers.log",
        web_port=port,
    ).start()
    spawned.extend([cp, providers])

    for worker in (cp, providers):
        code, log = exits_with(worker)
        assert code != 0, log
        assert "late-llm" in log and topic in log, log
        assert "make topics" in log, log
