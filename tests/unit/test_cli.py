"""cpctl against a small local fake of the HTTP API (aiohttp in a thread): commands, --json,
exit codes, problem details on stderr, and keys refused on the command line."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web

from cli.app import main, parse_time

KEY = "k-test"
TIMES = {"created_at": "2026-12-03T08:00:00Z", "updated_at": "2026-12-03T08:00:01Z"}


def _problem(status: int, kind: str, detail: str, **extra: Any) -> web.Response:
    body = {"type": f"https://x/{kind}", "title": kind, "status": status, "detail": detail, **extra}
    return web.json_response(body, status=status, content_type="application/problem+json")


def _events(final: str) -> list[dict[str, Any]]:
    kinds = [("created", "ACCEPTED"), ("routed", "ROUTED"), ("dispatched", "DISPATCHED")]
    kinds.append((final.lower(), final))
    return [
        {
            "job_id": "j",
            "tenant_id": "t",
            "seq": n,
            "type": kind,
            "at": f"2026-12-03T08:00:0{n}Z",
            "state": state,
            "attempt_id": None,
            "data": {"chosen": {"provider": "sim-fast", "model": "m"}} if kind == "routed" else {},
        }
        for n, (kind, state) in enumerate(kinds, start=1)
    ]


FINAL = {"job-ok": "COMPLETED", "job-failed": "FAILED", "job-cancelled": "CANCELLED"}


class Fake:
    """The fake API's state: what it was asked, and how far each job's timeline has got."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.revealed: dict[str, int] = {}

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.auth])
        app.router.add_post("/jobs", self.submit)
        app.router.add_get("/jobs", self.listing)
        app.router.add_get("/jobs/{id}", self.status)
        app.router.add_get("/jobs/{id}/events", self.events)
        app.router.add_get("/jobs/{id}/result", self.result)
        app.router.add_post("/jobs/{id}/cancel", self.cancel)
        app.router.add_get("/providers", self.providers)
        return app

    @web.middleware
    async def auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path, dict(request.query), body))
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return _problem(401, "unauthorized", "missing or unknown API key")
        response: web.StreamResponse = await handler(request)
        return response

    async def submit(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "messages" not in body:
            return _problem(
                422,
                "invalid-request",
                "the job request has invalid fields",
                errors=[{"loc": ["messages"], "msg": "Field required", "type": "missing"}],
            )
        return web.json_response(
            {"job_id": "job-ok", "state": "DISPATCHED", "created": True, "links": {}}, status=202
        )

    async def status(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        if job_id not in FINAL:
            return _problem(404, "job-not-found", f"no job {job_id}")
        return web.json_response(
            {
                "job_id": job_id,
                "request_id": "r-1",
                "state": FINAL[job_id],
                **TIMES,
                "attempts": [
                    {
                        "attempt_no": 1,
                        "provider": "sim-fast",
                        "model": "m",
                        "state": "SUCCEEDED",
                        "latency_ms": 12,
                        "cost": {"amount": "0.0001", "currency": "USD"},
                        "error": None,
                    }
                ],
                "routing": {
                    "policy_version": "p1",
                    "preference": "cost",
                    "chosen": {"provider": "sim-fast", "model": "m"},
                    "fallback_plan": [{"provider": "sim-cheap", "model": "n"}],
                },
                "error": None,
            }
        )

    async def events(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        after = int(request.query.get("after", "0"))
        events = _events(FINAL[job_id])
        shown = self.revealed[job_id] = self.revealed.get(job_id, 0) + 1  # one more per poll
        visible = events[:shown]
        return web.json_response(
            {
                "job_id": job_id,
                "state": visible[-1]["state"],
                "events": [e for e in visible if e["seq"] > after],
                "last_seq": len(visible),
            }
        )

    async def result(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        if job_id == "job-running":
            return web.json_response({"job_id": job_id, "state": "RUNNING"}, status=202)
        return web.json_response(
            {
                "job_id": job_id,
                "state": FINAL[job_id],
                "provider": "sim-fast",
                "model": "m",
                "attempts": 1,
                "output": {"text": "hello there"},
                "cost": {"total": {"amount": "0.0001", "currency": "USD"}},
                "error": None,
            }
        )

    async def listing(self, request: web.Request) -> web.Response:
        page = [{"job_id": "job-3", "request_id": "r-3", "state": "RUNNING", **TIMES}]
        if request.query.get("cursor") == "c2":
            return web.json_response({"items": page, "next_cursor": None})
        jobs = [
            {"job_id": f"job-{n}", "request_id": f"r-{n}", "state": "COMPLETED", **TIMES}
            | {"provider": "sim-fast", "model": "m"}
            for n in (1, 2)
        ]
        return web.json_response({"items": jobs, "next_cursor": "c2"})

    async def cancel(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        if job_id == "job-ok":
            return _problem(409, "job-final", f"job {job_id} is COMPLETED", state="COMPLETED")
        return web.json_response(
            {"job_id": job_id, "state": "RUNNING", "cancel_requested": True}, status=202
        )

    async def providers(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "catalogue_version": "c1",
                "policy_version": "p1",
                "providers": [
                    {
                        "name": "sim-fast",
                        "enabled": True,
                        "unavailable": None,
                        "models": [
                            {
                                "name": "m",
                                "prices": {
                                    "currency": "USD",
                                    "input_per_mtok": "0.30",
                                    "output_per_mtok": "1.20",
                                },
                                "expected_latency_ms": 300,
                            }
                        ],
                        "health": {"latency_ewma_ms": 12.4, "error_rate": 0.0, "circuit": "closed"},
                    }
                ],
            }
        )


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, Fake]]:
    state = Fake()
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    runner = web.AppRunner(state.app())
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.SockSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def run(url: str, *argv: str, stdin: str = "", key: str | None = KEY) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    env = {"CP_URL": url} | ({"CP_API_KEY": key} if key is not None else {})
    code = main(list(argv), env=env, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "argv",
    [
        ["--key", "k-test", "get", "j"],
        ["get", "j", "--api-key=k-test"],
        ["list", "--token", "x"],
        ["providers", "--API_KEY", "x"],
    ],
)
def test_a_key_on_the_command_line_is_refused(fake: tuple[str, Fake], argv: list[str]) -> None:
    url, state = fake
    before = len(state.requests)
    code, _, err = run(url, *argv)
    assert code == 64
    assert "CP_API_KEY" in err and "command line" in err
    assert len(state.requests) == before  # nothing was sent


def test_without_a_key_in_the_environment(fake: tuple[str, Fake]) -> None:
    code, _, err = run(fake[0], "get", "job-ok", key=None)
    assert code == 64 and "set CP_API_KEY" in err


def test_a_wrong_key_prints_the_problem(fake: tuple[str, Fake]) -> None:
    code, out, err = run(fake[0], "get", "job-ok", key="nope")
    assert (code, out) == (4, "")
    assert "HTTP 401 unauthorized: missing or unknown API key" in err


def test_submit_from_stdin(fake: tuple[str, Fake]) -> None:
    url, state = fake
    request = {"request_id": "r-1", "messages": [{"role": "user", "content": "hi"}]}
    code, out, err = run(url, "submit", "-", stdin=json.dumps(request))
    assert (code, out, err) == (0, "job-ok  DISPATCHED\n", "")
    assert state.requests[-1][:2] == ("POST", "/jobs") and state.requests[-1][3] == request
    code, out, _ = run(url, "submit", "--json", stdin=json.dumps(request))
    assert code == 0 and json.loads(out)["job_id"] == "job-ok"


def test_submit_a_file_without_request_id_gets_one(fake: tuple[str, Fake], tmp_path: Any) -> None:
    url, state = fake
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    code, _, _ = run(url, "submit", str(path))
    assert code == 0
    assert state.requests[-1][3]["request_id"].startswith("cli-")


def test_submit_and_wait_prints_the_result(fake: tuple[str, Fake]) -> None:
    body = json.dumps({"request_id": "r", "messages": [{"role": "user", "content": "hi"}]})
    code, out, _ = run(fake[0], "submit", "--wait", "5", stdin=body)
    assert code == 0
    assert "state     COMPLETED" in out and "hello there" in out


def test_submit_an_invalid_request(fake: tuple[str, Fake]) -> None:
    code, out, err = run(fake[0], "submit", stdin=json.dumps({"request_id": "r"}))
    assert (code, out) == (4, "")
    assert "HTTP 422 invalid-request" in err and "messages: Field required" in err
    code, _, err = run(fake[0], "submit", stdin="not json")
    assert code == 64 and "not JSON" in err


def test_get(fake: tuple[str, Fake]) -> None:
    code, out, _ = run(fake[0], "get", "job-ok")
    assert code == 0
    assert "state     COMPLETED" in out
    assert "routed    sim-fast/m (preference cost, policy p1)" in out
    assert "fallback  sim-cheap/n" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("#"))
    assert header.split() == ["#", "TARGET", "STATE", "LATENCY_MS", "COST", "ERROR"]
    assert lines[-1].split() == ["1", "sim-fast/m", "SUCCEEDED", "12", "0.0001", "USD", "-"]
    code, out, _ = run(fake[0], "get", "--json", "job-ok")
    assert json.loads(out)["job_id"] == "job-ok"
    code, out, err = run(fake[0], "get", "job-missing")
    assert (code, out) == (4, "") and "no job job-missing" in err


@pytest.mark.parametrize(("job_id", "exit_code"), [("job-ok", 0), ("job-failed", 1)])
def test_watch_prints_events_as_they_come_and_exits_by_state(
    fake: tuple[str, Fake], job_id: str, exit_code: int
) -> None:
    code, out, _ = run(fake[0], "watch", job_id, "--interval", "0.01")
    assert code == exit_code
    lines = out.splitlines()
    assert [line.split()[2] for line in lines] == [
        "created",
        "routed",
        "dispatched",
        FINAL[job_id].lower(),
    ]
    assert "chosen=sim-fast/m" in lines[1]
    # Each poll asked only for what came after the last event printed.
    afters = [q["after"] for m, p, q, _ in fake[1].requests if p == f"/jobs/{job_id}/events"]
    assert afters == ["0", "1", "2", "3"]


def test_watch_json_is_one_event_per_line_and_cancelled_exits_2(fake: tuple[str, Fake]) -> None:
    code, out, _ = run(fake[0], "watch", "--json", "job-cancelled", "--interval", "0.01")
    assert code == 2
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [1, 2, 3, 4]


def test_result_not_final_exits_3(fake: tuple[str, Fake]) -> None:
    code, out, _ = run(fake[0], "result", "job-running")
    assert code == 3 and "RUNNING" in out
    code, out, _ = run(fake[0], "result", "job-failed", "--json")
    assert code == 1 and json.loads(out)["state"] == "FAILED"


def test_list_one_page_and_all_pages(fake: tuple[str, Fake]) -> None:
    url, state = fake
    code, out, _ = run(url, "list", "--state", "COMPLETED", "--limit", "2", "--since", "1h")
    assert code == 0
    method, path, query, _ = state.requests[-1]
    assert (method, path, query["state"], query["limit"]) == ("GET", "/jobs", "COMPLETED", "2")
    assert datetime.fromisoformat(query["since"]) < datetime.now(UTC) - timedelta(minutes=59)
    lines = out.splitlines()
    assert lines[0].split() == ["JOB_ID", "REQUEST_ID", "STATE", "TARGET", "CREATED", "UPDATED"]
    assert lines[1].split()[:4] == ["job-1", "r-1", "COMPLETED", "sim-fast/m"]
    assert "c2" in lines[-1]
    code, out, _ = run(url, "list", "--all", "--json")
    body = json.loads(out)
    assert [j["job_id"] for j in body["items"]] == ["job-1", "job-2", "job-3"]
    assert body["next_cursor"] is None
    assert state.requests[-1][2]["cursor"] == "c2"


def test_cancel(fake: tuple[str, Fake]) -> None:
    url, state = fake
    code, out, _ = run(url, "cancel", "job-running", "--reason", "not needed")
    assert (code, out) == (0, "job-running  cancel requested (state was RUNNING)\n")
    assert state.requests[-1][3] == {"reason": "not needed"}
    code, out, err = run(url, "cancel", "job-ok")
    assert (code, out) == (4, "")
    assert "HTTP 409 job-final: job job-ok is COMPLETED" in err


def test_providers(fake: tuple[str, Fake]) -> None:
    code, out, _ = run(fake[0], "providers")
    assert code == 0
    assert out.startswith("catalogue c1  policy p1")
    row = out.splitlines()[-1].split()
    assert row == ["sim-fast", "m", "enabled", "0.30/1.20", "USD", "300", "12", "0.0%", "closed"]
    code, out, _ = run(fake[0], "providers", "--json")
    assert json.loads(out)["catalogue_version"] == "c1"


def test_unreachable_api() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, err = run(f"http://127.0.0.1:{port}", "get", "j")
    assert code == 4 and "cannot reach" in err
    code, _, err = run("ftp://x", "get", "j")
    assert code == 64 and "http(s) URL" in err


def test_parse_time() -> None:
    now = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)
    assert parse_time("15m", now) == now - timedelta(minutes=15)
    assert parse_time("2h", now) == now - timedelta(hours=2)
    assert parse_time("2026-12-03T07:00:00Z") == datetime(2026, 12, 3, 7, 0, tzinfo=UTC)
    assert parse_time("2026-12-03T07:00:00") == datetime(2026, 12, 3, 7, 0, tzinfo=UTC)


def test_every_command_is_in_the_readme() -> None:
    from pathlib import Path

    from cli.app import build_parser

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Command-line client", 1)[1].split("\n## ", 1)[0]
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in commands.choices:
        assert f"| `{name}" in section, f"cpctl {name} is not in the README's command table"
    assert "### Policy replay" in section


def test_replay_report_for_humans() -> None:
    from cli.app import print_replay
    from domain.replay import replay
    from tests.unit.test_replay import (
        CATALOGUE,
        _latency_first_for_cost,
        _request,
        _routed_event,
    )

    events = [
        _routed_event("j-cost", _request("cost")),
        _routed_event("j-lat", _request("latency")),
    ]
    report = replay(events, catalogue=CATALOGUE, policy=_latency_first_for_cost())
    out = io.StringIO()
    print_replay(report, out)
    text = out.getvalue()
    assert f"catalogue {CATALOGUE.version}, policy latency-first" in text
    row = next(line for line in text.splitlines() if line.startswith("j-cost"))
    assert "sim-cheap/thrift-nano-sim  sim-fast/swift-mini-sim" in row
    assert "(same)" in next(line for line in text.splitlines() if line.startswith("j-lat"))
    assert "decisions  2\nchanged    1\n" in text
    assert "1  sim-cheap/thrift-nano-sim → sim-fast/swift-mini-sim" in text
    assert f"Σ estimated cost difference  {report.cost_delta['USD']} USD" in text
    assert Decimal(report.cost_delta["USD"]) > 0
    assert "mean expected latency difference  -150 ms" in text
    out = io.StringIO()
    print_replay(report, out, changed_only=True)
    assert "j-lat" not in out.getvalue()
