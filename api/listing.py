"""`GET /jobs`: the caller's jobs, newest first, from every partition, answered by any worker.

The worker that takes the request pages its own partitions and asks each other owner (over HTTP,
the caller's key and the partitions it should answer for in `X-CP-Partitions`) for its page; it
merges the pages and keeps the newest `limit`. Each owner walks its partitions' in-memory index
(`tables.listing`) and reads only the jobs of its own newest `limit`, so a page costs, whatever
the number of jobs held: per partition two bisections and a walk of `limit + 1` entries (more when
a state filter skips entries), per owner at most `limit` job summaries read (live jobs from
memory, finished ones one store read and a JSON parse each), and one HTTP round trip per other
owner, made concurrently.

A partition that no worker serves right now (a rebalance, a restore) makes the whole answer a 503
problem with `Retry-After` and `missing_partitions`: a listing is never silently incomplete.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from aiohttp import ClientError, ClientTimeout, web
from yarl import URL

from api.problems import Problem, json_response, unavailable
from api.routing import FORWARDED
from streams.app import app, core
from streams.partition import page_of
from tables.listing import (
    Filter,
    Position,
    decode_cursor,
    encode_cursor,
    merge,
    micros,
    states_for,
)

#: The partitions a forwarded listing asks its owner to answer for, e.g. `0,3,5`.
PARTITIONS = "X-CP-Partitions"
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
#: How long the answering worker waits for another owner's page.
OWNER_TIMEOUT_S = 10.0

Item = tuple[Position, dict[str, Any]]


@dataclass(frozen=True)
class Query:
    where: Filter
    before: Position | None
    limit: int


def _invalid(name: str, message: str) -> Problem:
    return Problem(
        422,
        "invalid-request",
        "Invalid request",
        f"{name}: {message}",
        errors=[{"loc": ["query", name], "msg": message, "type": "value_error"}],
    )


def _instant(name: str, raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        raise _invalid(name, "must be an RFC 3339 timestamp, e.g. 2026-01-31T12:00:00Z") from None
    if at.tzinfo is None:
        raise _invalid(name, "must carry a time zone (Z or ±hh:mm)")
    try:
        return micros(at)
    except OverflowError:
        raise _invalid(name, "is out of range") from None


def parse_query(query: Mapping[str, str]) -> Query:
    """Read `state`, `since`, `until`, `limit` and `cursor`; 422 for any invalid one."""
    states: frozenset[str] | None = None
    raw_state = query.get("state")
    if raw_state is not None:
        try:
            states = frozenset().union(*(states_for(s.strip()) for s in raw_state.split(",")))
        except ValueError:
            raise _invalid(
                "state", "must be a job state (e.g. COMPLETED), open or terminal, comma-separated"
            ) from None
    raw_limit = query.get("limit", str(DEFAULT_LIMIT))
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise _invalid("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    before = None
    if "cursor" in query:
        try:
            before = decode_cursor(query["cursor"])
        except ValueError:
            raise _invalid("cursor", "is not a cursor this API gave (next_cursor)") from None
    where = Filter(
        states=states,
        since=_instant("since", query.get("since")),
        until=_instant("until", query.get("until")),
    )
    return Query(where=where, before=before, limit=int(raw_limit))


async def list_jobs(request: web.Request, tenant: str) -> web.Response:
    """Answer `GET /jobs` (or, forwarded, one owner's share of it)."""
    if app.should_stop:
        raise unavailable("the worker is shutting down")
    query = parse_query(request.query)
    asked = request.headers.get(PARTITIONS)
    if asked is not None and request.headers.get(FORWARDED):
        return _share(tenant, query, asked)
    mine = set(core.parts)
    others: dict[str, list[int]] = {}
    missing: list[int] = []
    here = _ident(URL(core.url))
    for number in range(core.partitions):
        if number in mine:
            continue
        url = core.assignor.owners.get(number)
        if not url or _ident(URL(url)) == here:
            missing.append(number)  # no owner yet, or ours but still loading
        else:
            others.setdefault(url, []).append(number)
    if missing:
        raise _gap(missing)
    items, more, gaps = page_of(
        core.parts, mine, tenant=tenant, where=query.where, before=query.before, limit=query.limit
    )
    answers = await asyncio.gather(
        *(_ask(request, url, numbers) for url, numbers in others.items())
    )
    pages = [items]
    for remote_items, remote_more, remote_gaps in answers:
        pages.append(remote_items)
        more = more or remote_more
        gaps += remote_gaps
    if gaps:
        raise _gap(gaps)
    summaries = {position: summary for page in pages for position, summary in page}
    kept, cut = merge([[position for position, _ in page] for page in pages], query.limit)
    more = more or cut
    return json_response(
        {
            "items": [summaries[position] for position in kept],
            "next_cursor": encode_cursor(kept[-1]) if kept and more else None,
        }
    )


def _share(tenant: str, query: Query, asked: str) -> web.Response:
    """One owner's page over the partitions the asking worker named."""
    try:
        numbers = [int(n) for n in asked.split(",") if n]
    except ValueError:
        raise _invalid(PARTITIONS, "must list partition numbers") from None
    items, more, missing = page_of(
        core.parts,
        numbers,
        tenant=tenant,
        where=query.where,
        before=query.before,
        limit=query.limit,
    )
    return json_response(
        {
            "items": [{"position": list(position), "job": job} for position, job in items],
            "more": more,
            "missing": missing,
        }
    )


async def _ask(
    request: web.Request, url: str, numbers: list[int]
) -> tuple[list[Item], bool, list[int]]:
    """Another owner's page over `numbers`; a failed answer counts them all missing."""
    dest = URL(url)
    target = request.url.with_host(dest.host or "127.0.0.1").with_port(dest.port)
    headers = {FORWARDED: "1", PARTITIONS: ",".join(map(str, numbers))}
    if "Authorization" in request.headers:
        headers["Authorization"] = request.headers["Authorization"]
    try:
        async with app.http_client.get(
            target, headers=headers, timeout=ClientTimeout(total=OWNER_TIMEOUT_S)
        ) as response:
            if response.status != 200:
                return [], False, numbers
            body = orjson.loads(await response.read())
    except (ClientError, TimeoutError, RuntimeError, orjson.JSONDecodeError):
        return [], False, numbers
    items = [((int(i["position"][0]), str(i["position"][1])), i["job"]) for i in body["items"]]
    return items, bool(body["more"]), [int(n) for n in body["missing"]]


def _gap(missing: list[int]) -> Problem:
    numbers = sorted(set(missing))
    return Problem(
        503,
        "partitions-unavailable",
        "Listing incomplete",
        f"no worker serves partitions {', '.join(map(str, numbers))} right now (a rebalance or a "
        "restore): a listing without them would be incomplete; retry shortly",
        headers={"Retry-After": "2"},
        missing_partitions=numbers,
    )


def _ident(url: URL) -> tuple[str, int]:
    return (url.host or "", int(url.port or 80))
