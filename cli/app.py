"""cpctl: submit, inspect, watch, list and cancel jobs; show providers; replay routing decisions.

Configuration comes from the environment only: `CP_URL` (default http://127.0.0.1:6066) and
`CP_API_KEY` (needed by every API command). A key is never taken from the command line, where
`ps` and the shell history would show it. Human output by default, `--json` for scripts.

Exit codes: 0 ok / job COMPLETED; 1 job FAILED or EXPIRED; 2 job CANCELLED; 3 the job is still
running when the wait ends; 4 the API answered with an error (its problem detail on stderr) or
could not be reached; 5 replay could not read its inputs; 64 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TextIO

DEFAULT_URL = "http://127.0.0.1:6066"
EXIT_OK, EXIT_FAILED, EXIT_CANCELLED, EXIT_RUNNING, EXIT_API, EXIT_REPLAY = 0, 1, 2, 3, 4, 5
EXIT_USAGE = 64
#: Exit code of a job's final state.
STATE_EXIT = {"COMPLETED": EXIT_OK, "FAILED": EXIT_FAILED, "EXPIRED": EXIT_FAILED}
STATE_EXIT["CANCELLED"] = EXIT_CANCELLED
TERMINAL_STATES = frozenset(STATE_EXIT)
TERMINAL_EVENTS = frozenset({"completed", "failed", "cancelled", "expired"})
#: The server caps one long-poll at 30 s; longer waits are several polls.
MAX_POLL_S = 30.0
_KEY_FLAGS = re.compile(r"^--?(api[-_]?)?(key|token|secret|password|bearer)(=|$)", re.IGNORECASE)


class CliError(Exception):
    """Print the message to stderr and exit with `code`."""

    def __init__(self, message: str, code: int = EXIT_API) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# -- HTTP ------------------------------------------------------------------------------------------


class Api:
    """A small synchronous client of the HTTP API (stdlib only)."""

    def __init__(self, url: str, key: str | None, timeout_s: float = 60.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise CliError(f"CP_URL must be an http(s) URL, not {url!r}", EXIT_USAGE)
        self.url = url.rstrip("/")
        self.key = key
        self.timeout_s = timeout_s

    def call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        timeout_s: float | None = None,
    ) -> tuple[int, Any]:
        """Send a request; return (status, parsed JSON) for 2xx, raise CliError otherwise."""
        if not self.key:
            raise CliError("set CP_API_KEY to your API key (it is never taken from argv)", 64)
        params = {k: v for k, v in (query or {}).items() if v is not None}
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.key}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 - scheme checked in __init__
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as answer:  # noqa: S310
                raw = answer.read()
                return answer.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raise CliError(_problem(exc.code, exc.read()), EXIT_API) from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"cannot reach {self.url}: {reason}", EXIT_API) from None


def _problem(status: int, raw: bytes) -> str:
    """A problem+json (or an OpenAI error) as one line for stderr."""
    try:
        doc = json.loads(raw)
    except ValueError:
        text = raw.decode("utf-8", "replace").strip()
        return f"HTTP {status}: {text[:500] or 'no body'}"
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        doc = doc["error"]
    if not isinstance(doc, dict):
        return f"HTTP {status}: {doc}"
    title = doc.get("title") or doc.get("type") or "error"
    detail = doc.get("detail") or doc.get("message") or ""
    extra = ""
    errors = doc.get("errors")
    if isinstance(errors, list) and errors:
        extra = "; " + "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}"
            for e in errors
            if isinstance(e, dict)
        )
    return f"HTTP {status} {title}: {detail}{extra}"


# -- output ----------------------------------------------------------------------------------------


def _dump(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str], out: TextIO) -> None:
    """Print aligned columns ("-" for None)."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    for row in [list(headers), *cells]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _target(value: Any) -> str | None:
    if isinstance(value, dict) and value.get("provider"):
        return f"{value['provider']}/{value.get('model')}"
    return None


def _cost(value: Any) -> str | None:
    if isinstance(value, dict) and value.get("amount") is not None:
        return f"{value['amount']} {value.get('currency', '')}".strip()
    return None


def event_line(event: dict[str, Any]) -> str:
    """One timeline event as a human line: seq, time, type, state, what matters of its data."""
    data = event.get("data") or {}
    parts: list[str] = []
    if event.get("type") == "routed":
        parts.append(f"chosen={_target(data.get('chosen')) or 'none'}")
    for key in ("provider", "model", "reason", "to_provider", "delay_ms", "latency_ms"):
        if key in data and not isinstance(data[key], dict | list):
            parts.append(f"{key}={data[key]}")
    if isinstance(data.get("error"), dict):
        parts.append(f"error={data['error'].get('code')}")
    if event.get("attempt_id"):
        parts.append(f"attempt={event['attempt_id']}")
    return (
        f"{event.get('seq', '?'):>3}  {event.get('at', '')}  {event.get('type', ''):<18} "
        f"{event.get('state', ''):<10} {' '.join(parts)}".rstrip()
    )


# -- commands --------------------------------------------------------------------------------------


def _read_request(source: str, stdin: TextIO) -> dict[str, Any]:
    try:
        text = stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {source}: {exc}", EXIT_USAGE) from None
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise CliError(f"{source} is not JSON: {exc}", EXIT_USAGE) from None
    if not isinstance(body, dict):
        raise CliError(f"{source} must hold a JSON object (a job request)", EXIT_USAGE)
    return body


def _wait_result(api: Api, job_id: str, wait_s: float) -> tuple[int, Any]:
    """GET the result, long-polling in server-sized steps until final or `wait_s` elapsed."""
    deadline = time.monotonic() + wait_s
    while True:
        left = max(0.0, deadline - time.monotonic())
        step = min(MAX_POLL_S, left)
        status, body = api.call(
            "GET",
            f"/jobs/{job_id}/result",
            query={"wait": f"{step:g}"},
            timeout_s=step + 30,
        )
        if status == 200 or left <= 0:
            return status, body
        time.sleep(0.05)


def _print_result(body: dict[str, Any], out: TextIO) -> None:
    out.write(f"job       {body.get('job_id')}\nstate     {body.get('state')}\n")
    if body.get("provider"):
        out.write(f"target    {body.get('provider')}/{body.get('model')}\n")
    out.write(f"attempts  {body.get('attempts')}\n")
    total = (body.get("cost") or {}).get("total")
    if total:
        out.write(f"cost      {_cost(total) or 'unknown'}\n")
    if body.get("error"):
        err = body["error"]
        out.write(f"error     {err.get('code')}: {err.get('message')}\n")
    output = body.get("output") or {}
    if output.get("text"):
        out.write("\n" + output["text"].rstrip("\n") + "\n")


def _result_exit(status: int, body: dict[str, Any]) -> int:
    if status != 200:
        return EXIT_RUNNING
    return STATE_EXIT.get(str(body.get("state")), EXIT_FAILED)


def cmd_submit(args: argparse.Namespace, api: Api, out: TextIO, stdin: TextIO) -> int:
    body = _read_request(args.file, stdin)
    if "request_id" not in body:
        body["request_id"] = f"cli-{uuid.uuid4().hex}"
    _, answer = api.call("POST", "/jobs", body=body)
    if args.wait is None:
        if args.json:
            _dump(answer, out)
        else:
            created = "" if answer.get("created", True) else "  (already submitted)"
            out.write(f"{answer['job_id']}  {answer['state']}{created}\n")
        return EXIT_OK
    status, result = _wait_result(api, answer["job_id"], args.wait)
    if args.json:
        _dump(result, out)
    elif status == 200:
        _print_result(result, out)
    else:
        out.write(f"{answer['job_id']}  {result.get('state')}  (still running)\n")
    return _result_exit(status, result)


def cmd_get(args: argparse.Namespace, api: Api, out: TextIO, stdin: TextIO) -> int:
    _, body = api.call("GET", f"/jobs/{args.job_id}")
    if args.json:
        _dump(body, out)
        return EXIT_OK
    routing = body.get("routing") or {}
    out.write(
        f"job       {body['job_id']}\nrequest   {body.get('request_id')}\n"
        f"state     {body['state']}\ncreated   {body.get('created_at')}\n"
        f"updated   {body.get('updated_at')}\n"
    )
    if routing:
        plan = ", ".join(filter(None, (_target(t) for t in routing.get("fallback_plan", []))))
        out.write(
            f"routed    {_target(routing.get('chosen')) or 'nothing eligible'} "
            f"(preference {routing.get('preference')}, policy {routing.get('policy_version')})\n"
            f"fallback  {plan or '-'}\n"
        )
    if body.get("error"):
        out.write(f"error     {body['error'].get('code')}: {body['error'].get('message')}\n")
    attempts = body.get("attempts") or []
    if attempts:
        out.write("\n")
        rows = [
            (
                a.get("attempt_no"),
                f"{a.get('provider')}/{a.get('model')}",
                a.get("state"),
                a.get("latency_ms"),
                _cost(a.get("cost")),
                (a.get("error") or {}).get("code"),
            )
            for a in attempts
        ]
        table(rows, ("#", "TARGET", "STATE", "LATENCY_MS", "COST", "ERROR"), out)
    return EXIT_OK


def cmd_result(args: argparse.Namespace, api: Api, out: TextIO, stdin: TextIO) -> int:
    status, body = _wait_result(api, args.job_id, args.wait)
    if args.json:
        _dump(body, out)
    elif status == 200:
        _print_result(body, out)
    else:
        out.write(f"{args.job_id}  {body.get('state')}  (not final yet)\n")
    return _result_exit(status, body)


def cmd_watch(args: argparse.Namespace, api: Api, out: TextIO, stdin: TextIO) -> int:
    after = 0
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while True:
        _, body = api.call("GET", f"/jobs/{args.job_id}/events", query={"after": after})
        ended = False
        for event in body.get("events", []):
            after = max(after, int(event.get("seq", after)))
            if args.json:
                out.write(json.dumps(event, ensure_ascii=False) + "\n")
            else:
                out.write(event_line(event) + "\n")
            ended = ended or event.get("type") in TERMINAL_EVENTS
        out.flush()
        state = str(body.get("state"))
        if ended or (state in TERMINAL_STATES and after >= int(body.get("last_seq", after))):
            return STATE_EXIT.get(state, EXIT_FAILED)
        if deadline is not None and time.monotonic() >= deadline:
            sys.stderr.write(f"cpctl: job {args.job_id} is still {state}\n")
            return EXIT_RUNNING
        time.sleep(args.interval)


def cmd_list(args: argparse.Namespace, api: Api, out: TextIO, stdin: TextIO) -> int:
    query: dict[str, Any] = {
        "state": args.state,
        "since": args.since and parse_time(args.since).isoformat(),
        "until": args.until and parse_time(args.until).isoformat(),
        "limit": args.limit,
    }
    jobs: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        _, body = api.call("GET", "/jobs", query={**query, "cursor": cursor})
        jobs.extend(body.get("items", body.get("jobs", [])))
        cursor = body.get("next_cursor")
        if not args.all or not cursor:
            break
    if args.json:
        _dump(body if not args.all else {"items": jobs, "next_cursor": None}, out)
        return EXIT_OK
    rows = [
        (
            j.get("job_id"),
            j.get("request_id"),
            j.get("state"),
            f"{j['provider']}/{j.get('model')}" if j.get("provider") else None,
            j.get("created_at"),
            j.get("updated_at"),
        )
        for j in jobs
    ]
    table(rows, ("JOB_ID", "REQUEST_ID", "STATE", "TARGET", "CREATED", "UPDATED"), out)
    if cursor:
        out.write(f"(more: --all, or the next page's cursor is {cursor})\n")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, api: Api, out: TextIO, stdin: TextIO) -> int:
    body = {"reason": args.reason} if args.reason else None
    _, answer = api.call("POST", f"/jobs/{args.job_id}/cancel", body=body)
    if args.json:
        _dump(answer, out)
    else:
        out.write(f"{answer['job_id']}  cancel requested (state was {answer['state']})\n")
    return EXIT_OK


def cmd_providers(args: argparse.Namespace, api: Api, out: TextIO, stdin: TextIO) -> int:
    _, body = api.call("GET", "/providers")
    if args.json:
        _dump(body, out)
        return EXIT_OK
    out.write(f"catalogue {body.get('catalogue_version')}  policy {body.get('policy_version')}\n\n")
    rows = []
    for p in body.get("providers", []):
        health = p.get("health") or {}
        status = "enabled" if p.get("enabled") else "disabled"
        if p.get("enabled") and p.get("unavailable"):
            status = "no-key"
        for m in p.get("models", []):
            prices = m.get("prices") or {}
            price = (
                f"{prices['input_per_mtok']}/{prices['output_per_mtok']} {prices.get('currency')}"
                if prices
                else None
            )
            latency = health.get("latency_ewma_ms")
            rows.append(
                (
                    p.get("name"),
                    m.get("name"),
                    status,
                    price,
                    m.get("expected_latency_ms"),
                    None if latency is None else round(latency),
                    f"{100 * float(health.get('error_rate') or 0):.1f}%",
                    health.get("circuit"),
                )
            )
    headers = (
        "PROVIDER",
        "MODEL",
        "STATUS",
        "PRICE_IN/OUT_PER_MTOK",
        "EXPECTED_MS",
        "EWMA_MS",
        "ERRORS",
        "CIRCUIT",
    )
    table(rows, headers, out)
    return EXIT_OK


def cmd_replay(args: argparse.Namespace, api: Api, out: TextIO, stdin: TextIO) -> int:
    from cli.events import read_routed
    from domain.catalogue import ConfigError, load_catalogue
    from domain.policy import load_policy
    from domain.replay import replay

    try:
        catalogue = load_catalogue(Path(args.catalogue))
        policy = load_policy(Path(args.policy))
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_REPLAY) from None
    since = parse_time(args.since)
    until = parse_time(args.until) if args.until else None
    topic = args.topic_prefix + "cp.events"
    try:
        events, unreadable = asyncio.run(
            read_routed(
                args.bootstrap,
                topic,
                since=since,
                until=until,
                tenant=args.tenant,
                timeout_s=args.read_timeout,
            )
        )
    except (LookupError, TimeoutError, OSError) as exc:
        raise CliError(f"cannot read {topic}: {exc}", EXIT_REPLAY) from None
    except Exception as exc:  # noqa: BLE001 - aiokafka's connection errors have no common base
        raise CliError(f"cannot read {topic} from {args.bootstrap}: {exc!r}", EXIT_REPLAY) from None
    report = replay(events, catalogue=catalogue, policy=policy)
    report = report.model_copy(update={"unreadable": report.unreadable + unreadable})
    if args.json:
        _dump(report.model_dump(mode="json"), out)
        return EXIT_OK
    print_replay(report, out, changed_only=args.changed_only)
    return EXIT_OK


def print_replay(report: Any, out: TextIO, *, changed_only: bool = False) -> None:
    """The replay report for humans: one line per decision, then the totals."""
    from domain.replay import label

    rows = [
        (
            d.job_id,
            d.at.isoformat(timespec="seconds"),
            label(d.old),
            label(d.new) if d.changed else "(same)",
            _cost(d.old_cost and d.old_cost.model_dump(mode="json")),
            _cost(d.new_cost and d.new_cost.model_dump(mode="json")),
            None if d.cost_delta is None else format(d.cost_delta, "f"),
            d.old_latency_ms,
            d.new_latency_ms,
            "" if d.exact else "inexact",
        )
        for d in report.decisions
        if d.changed or not changed_only
    ]
    out.write(
        f"replaying under catalogue {report.catalogue_version}, policy {report.policy_version}\n\n"
    )
    headers = (
        "JOB_ID",
        "AT",
        "OLD",
        "NEW",
        "OLD_COST",
        "NEW_COST",
        "COST_DELTA",
        "OLD_MS",
        "NEW_MS",
        "NOTE",
    )
    table(rows, headers, out)
    out.write(f"\ndecisions  {report.total}\nchanged    {report.changed}\n")
    for pair, count in report.transitions.items():
        out.write(f"  {count:>5}  {pair}\n")
    for currency, delta in report.cost_delta.items():
        out.write(f"Σ estimated cost difference  {delta} {currency}\n")
    if report.mean_latency_delta_ms is not None:
        out.write(f"mean expected latency difference  {report.mean_latency_delta_ms:+g} ms\n")
    if report.inexact:
        out.write(
            f"{report.inexact} decision(s) recorded before the request's limits were recorded: "
            "replayed as if unconstrained (see --json 'missing')\n"
        )
    if report.unreadable:
        out.write(f"{report.unreadable} record(s) could not be read\n")


# -- arguments -------------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(value: str, now: datetime | None = None) -> datetime:
    """An ISO-8601 time (UTC when it has no offset), or a duration ago: 30s, 15m, 2h, 1d."""
    match = _RELATIVE.match(value.strip())
    if match:
        delta = timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
        return (now or datetime.now(UTC)) - delta
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CliError(
            f"not a time: {value!r} (use ISO-8601 like 2026-12-03T08:00:00Z, or 15m, 2h, 1d ago)",
            EXIT_USAGE,
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


Command = Callable[[argparse.Namespace, Api, TextIO, TextIO], int]


def build_parser() -> argparse.ArgumentParser:
    """The cpctl argument parser."""
    parser = _Parser(
        prog="cpctl",
        description="Command-line client of the prompt gateway control plane. "
        "Environment: CP_URL (default http://127.0.0.1:6066), CP_API_KEY (required by API "
        "commands; never given on the command line).",
        epilog="exit codes: 0 ok/COMPLETED, 1 FAILED or EXPIRED, 2 CANCELLED, 3 still running, "
        "4 API error or unreachable, 5 replay input error, 64 usage",
    )
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the raw JSON")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("submit", parents=[common], help="submit a job request (JSON)")
    p.add_argument("file", nargs="?", default="-", help="request file, or - for stdin (default)")
    p.add_argument("--wait", type=float, metavar="S", help="wait up to S seconds for the result")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("get", parents=[common], help="a job's status, routing and attempts")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("result", parents=[common], help="a job's final response")
    p.add_argument("job_id")
    p.add_argument("--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds")
    p.set_defaults(func=cmd_result)

    p = sub.add_parser("watch", parents=[common], help="print a job's events until it ends")
    p.add_argument("job_id")
    p.add_argument("--interval", type=float, default=0.5, metavar="S", help="poll interval")
    p.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds (exit 3)")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("list", parents=[common], help="list jobs, newest first")
    p.add_argument("--state", help="only jobs in this state (e.g. RUNNING, COMPLETED)")
    p.add_argument("--since", help="created at or after (ISO-8601, or 15m/2h/1d ago)")
    p.add_argument("--until", help="created before (ISO-8601, or 15m/2h/1d ago)")
    p.add_argument("--limit", type=int, help="page size")
    p.add_argument("--all", action="store_true", help="follow next_cursor through every page")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("cancel", parents=[common], help="cancel a job")
    p.add_argument("job_id")
    p.add_argument("--reason", help="why (sent along; the API records its own reason)")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("providers", parents=[common], help="the catalogue with live health")
    p.set_defaults(func=cmd_providers)

    p = sub.add_parser(
        "replay",
        parents=[common],
        help="re-route recorded decisions under another catalogue/policy (read-only)",
        description="Read the routed events of a time window from cp.events and route each "
        "decision's recorded inputs again under --catalogue and --policy; report what changes.",
    )
    p.add_argument(
        "--bootstrap",
        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        help="Kafka bootstrap servers (default $KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:9092)",
    )
    p.add_argument(
        "--topic-prefix",
        default=os.environ.get("CP_TOPIC_PREFIX", ""),
        help="topic prefix of the deployment (default $CP_TOPIC_PREFIX)",
    )
    p.add_argument("--since", required=True, help="window start (ISO-8601, or 15m/2h/1d ago)")
    p.add_argument("--until", help="window end, exclusive (default: now)")
    p.add_argument("--tenant", help="only this tenant's decisions")
    p.add_argument("--catalogue", required=True, help="catalogue YAML to evaluate")
    p.add_argument("--policy", required=True, help="policy YAML to evaluate")
    p.add_argument("--changed-only", action="store_true", help="list only changed decisions")
    p.add_argument("--read-timeout", type=float, default=60.0, metavar="S", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_replay)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    env: dict[str, str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run cpctl; return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if env is None else env)
    out, err = stdout or sys.stdout, stderr or sys.stderr
    for arg in argv:
        if arg == "--":
            break
        if _KEY_FLAGS.match(arg):
            err.write(
                "cpctl: API keys are not taken on the command line (ps and the shell history "
                "would show them); set CP_API_KEY in the environment instead\n"
            )
            return EXIT_USAGE
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        api = Api(environ.get("CP_URL") or DEFAULT_URL, environ.get("CP_API_KEY"))
        func: Command = args.func
        return func(args, api, out, stdin or sys.stdin)
    except CliError as exc:
        err.write(f"cpctl: {exc}\n")
        return exc.code
    except KeyboardInterrupt:
        return 130
