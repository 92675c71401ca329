"""W3C trace context on Kafka headers: continue a `traceparent`, or start a trace at intake."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable

from domain.messages import TraceContext

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def valid_traceparent(value: str | None) -> bool:
    if not value:
        return False
    match = _TRACEPARENT.match(value.strip().lower())
    return bool(match) and match.group(1) != "0" * 32 and match.group(2) != "0" * 16


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def from_headers(headers: Iterable[tuple[str, bytes | None]] | None) -> TraceContext:
    """Take the trace context of a record, or start a new trace when it has none."""
    found: dict[str, str] = {}
    for key, value in headers or ():
        if value is not None and key.lower() in ("traceparent", "tracestate"):
            found[key.lower()] = value.decode("latin-1")
    parent = found.get("traceparent")
    if not valid_traceparent(parent):
        return TraceContext(traceparent=new_traceparent())
    return TraceContext(traceparent=parent, tracestate=found.get("tracestate"))


def to_headers(trace: TraceContext | None) -> list[tuple[str, bytes]]:
    headers: list[tuple[str, bytes]] = []
    if trace and trace.traceparent:
        headers.append(("traceparent", trace.traceparent.encode()))
        if trace.tracestate:
            headers.append(("tracestate", trace.tracestate.encode()))
    return headers


def trace_id(trace: TraceContext | None) -> str | None:
    if trace is None or not trace.traceparent:
        return None
    parts = trace.traceparent.split("-")
    return parts[1] if len(parts) == 4 else None
