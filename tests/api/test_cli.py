"""cpctl against the real API stack: submit → watch → result, get, list, providers, cancel."""

from __future__ import annotations

import io
import json
import uuid

import pytest

from cli.app import main
from tests.api.conftest import FALLBACK, HANG, ApiStack, job_request

pytestmark = pytest.mark.integration


def cpctl(url: str, *argv: str, stdin: str = "", key: str = "key-a") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    env = {"CP_URL": url, "CP_API_KEY": key}
    code = main(list(argv), env=env, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_submit_watch_result(api_stack: ApiStack) -> None:
    url = api_stack.cp1
    body = job_request(f"cli-{uuid.uuid4().hex[:8]}", FALLBACK)
    code, out, err = cpctl(url, "submit", stdin=json.dumps(body))
    assert code == 0, err
    job_id, state = out.split()[:2]
    assert job_id.startswith("job_") and state

    code, out, err = cpctl(url, "watch", job_id, "--interval", "0.1", "--timeout", "60")
    assert code == 0, (out, err)
    kinds = [line.split()[2] for line in out.splitlines()]
    assert kinds[0] == "created" and kinds[-1] == "completed"
    assert "fallback" in kinds  # sim-cheap failed, sim-fast answered

    code, out, _ = cpctl(url, "result", job_id, "--json")
    assert code == 0
    result = json.loads(out)
    assert (result["state"], result["provider"]) == ("COMPLETED", "sim-fast")
    code, out, _ = cpctl(url, "get", job_id)
    assert code == 0 and "state     COMPLETED" in out and "sim-cheap/" in out

    # Another tenant cannot see it: the API's 404, on stderr, exit 4.
    code, out, err = cpctl(url, "get", job_id, key="key-b")
    assert (code, out) == (4, "") and "404" in err

    code, out, _ = cpctl(api_stack.cp2, "list", "--state", "COMPLETED", "--all", "--json")
    assert code == 0
    assert job_id in {item["job_id"] for item in json.loads(out)["items"]}


def test_cancel_and_watch_exit_code(api_stack: ApiStack) -> None:
    url = api_stack.cp2
    body = job_request(f"cli-{uuid.uuid4().hex[:8]}", HANG)
    code, out, err = cpctl(url, "submit", "--json", stdin=json.dumps(body))
    assert code == 0, err
    job_id = json.loads(out)["job_id"]
    code, out, err = cpctl(url, "cancel", job_id, "--reason", "test")
    assert code == 0, err
    assert "cancel requested" in out
    code, out, _ = cpctl(url, "watch", job_id, "--json", "--interval", "0.1", "--timeout", "60")
    assert code == 2
    # Events of the same poll that follow the end (a late result, say) are printed too.
    assert "cancelled" in [json.loads(line)["type"] for line in out.splitlines()]
    code, _, err = cpctl(url, "cancel", job_id)
    assert code == 4 and "409" in err


def test_providers(api_stack: ApiStack) -> None:
    code, out, _ = cpctl(api_stack.cp1, "providers")
    assert code == 0
    assert out.startswith("catalogue ")
    assert "sim-cheap" in out and "thrift-nano-sim" in out
