"""cpctl on the real broker: jobs submitted and watched with the CLI, then their routing decisions
replayed from cp.events under another catalogue and another policy (read-only)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from cli.app import main
from tests.support.stack import Stack, new_stack

pytestmark = pytest.mark.integration

KEY = "key-replay"
TENANT = "tenant-replay"


@pytest.fixture(scope="module")
def replay_stack(
    kafka_bootstrap: str, run_id: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = new_stack(kafka_bootstrap, run_id, "replay", tmp_path_factory.mktemp("replay"))
    stack.env["CP_API_KEYS"] = f"{KEY}={TENANT}"
    try:
        stack.start_providers()
        stack.start_cp()
        yield stack
    finally:
        stack.stop()


def cpctl(stack: Stack, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    assert stack.cp is not None
    out, err = io.StringIO(), io.StringIO()
    env = {"CP_URL": stack.cp.url, "CP_API_KEY": KEY}
    code = main(list(argv), env=env, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def job(request_id: str, preference: str, latency_ms: int = 5) -> str:
    return json.dumps(
        {
            "request_id": request_id,
            "messages": [{"role": "user", "content": f"question {request_id}"}],
            "preference": preference,
            "simulate": {"latency_ms": latency_ms},
        }
    )


def test_submit_watch_and_replay(replay_stack: Stack, tmp_path: Path) -> None:
    stack = replay_stack
    since = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    # Observed health drives routes (a provider that answered in 5 ms is the fastest) and the
    # replay reuses each decision's recorded snapshot. So: the latency job first and to its end,
    # then two slow cost jobs, both routed before sim-cheap has answered anything.
    code, out, err = cpctl(stack, "submit", "--wait", "60", stdin=job("l1", "latency"))
    assert code == 0, err
    assert "target    sim-fast/swift-mini-sim" in out
    job_ids = {"l1": out.split()[1]}
    for request_id in ("c1", "c2"):
        code, out, err = cpctl(stack, "submit", "--json", stdin=job(request_id, "cost", 3000))
        assert code == 0, err
        job_ids[request_id] = json.loads(out)["job_id"]
    for job_id in job_ids.values():
        code, out, err = cpctl(stack, "watch", job_id, "--interval", "0.1", "--timeout", "60")
        assert code == 0, (out, err)
        assert out.splitlines()[-1].split()[2] == "completed"
    code, out, _ = cpctl(stack, "result", job_ids["c1"], "--json")
    assert code == 0 and json.loads(out)["provider"] == "sim-cheap"

    config = Path(stack.env["CP_CATALOGUE_FILE"]).parent
    catalogue = yaml.safe_load((config / "catalogue.yaml").read_text())
    for provider in catalogue["providers"]:
        if provider["name"] == "sim-cheap":
            provider["enabled"] = False
    catalogue["version"] = "no-cheap"
    no_cheap = tmp_path / "no-cheap.yaml"
    no_cheap.write_text(yaml.safe_dump(catalogue))
    policy = yaml.safe_load((config / "policy.yaml").read_text())
    policy["weights"]["cost"] = {"cost": 0.1, "latency": 0.8, "reliability": 0.1}
    policy["version"] = "latency-first"
    latency_first = tmp_path / "latency-first.yaml"
    latency_first.write_text(yaml.safe_dump(policy))

    window = ["--bootstrap", stack.bootstrap, "--topic-prefix", stack.prefix, "--since", since]
    code, out, err = cpctl(
        stack,
        "replay",
        *window,
        "--catalogue",
        str(no_cheap),
        "--policy",
        str(config / "policy.yaml"),
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["catalogue_version"] == "no-cheap"
    assert {d["job_id"] for d in report["decisions"]} == set(job_ids.values())
    assert (report["total"], report["changed"], report["inexact"]) == (3, 2, 0), out
    assert report["transitions"] == {"sim-cheap/thrift-nano-sim → sim-fast/swift-mini-sim": 2}
    changed = {d["job_id"] for d in report["decisions"] if d["changed"]}
    assert changed == {job_ids["c1"], job_ids["c2"]}
    assert float(report["cost_delta"]["USD"]) > 0
    assert report["mean_latency_delta_ms"] < 0

    # Another policy: cost jobs now weigh latency first; human output this time.
    code, out, err = cpctl(
        stack,
        "replay",
        *window,
        "--tenant",
        TENANT,
        "--catalogue",
        str(config / "catalogue.yaml"),
        "--policy",
        str(latency_first),
    )
    assert code == 0, err
    assert "policy latency-first" in out
    assert "changed    2" in out and "decisions  3" in out
    assert "2  sim-cheap/thrift-nano-sim → sim-fast/swift-mini-sim" in out

    # Another tenant's window is empty; the window before the jobs too.
    code, out, _ = cpctl(
        stack,
        "replay",
        *window,
        "--tenant",
        "nobody",
        "--catalogue",
        str(no_cheap),
        "--policy",
        str(latency_first),
        "--json",
    )
    assert code == 0 and json.loads(out)["total"] == 0
    code, out, _ = cpctl(
        stack,
        "replay",
        *window[:-1],
        "1h",
        "--until",
        since,
        "--catalogue",
        str(no_cheap),
        "--policy",
        str(latency_first),
        "--json",
    )
    assert code == 0 and json.loads(out)["total"] == 0
