"""W3C trace context on Kafka headers and OpenTelemetry spans for each stage of a job."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from domain.messages import TraceContext

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def valid_traceparent(value: str | None) -> bool:
    if not value:
        return False
    match = _TRACEPARENT.match(value.strip().lower())
    return match is not None and match.group(1) != "0" * 32 and match.group(2) != "0" * 16


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def from_headers(headers: Iterable[tuple[str, bytes | None]] | None) -> TraceContext:
    """Take the trace context of a record, or start a new trace when it has none."""
    found: dict[str, str] = {}
    for key, value in headers or ():
        if value is not None and key.lower() in ("traceparent", "tracestate"):
            found[key.lower()] = value.decode("latin-1")
    parent = found.get("traceparent")
    if parent is None or not valid_traceparent(parent):
        return TraceContext(traceparent=new_traceparent())
    parent = parent.strip().lower()
    state = found.get("tracestate")
    # W3C: at most 512 characters of printable ASCII; anything else is dropped, not trusted.
    if state is not None and (len(state) > 512 or not state.isascii() or not state.isprintable()):
        state = None
    return TraceContext(traceparent=parent, tracestate=state)


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


# -- spans ----------------------------------------------------------------------------------------

_PROPAGATOR = TraceContextTextMapPropagator()
_configured = False
#: Whether spans are recorded at all (an exporter is configured); if not, `span` costs nothing.
_recording = False


def setup_tracing(service_name: str) -> None:
    """Install a tracer provider; exporters come from the standard OTEL_* variables.

    OTEL_TRACES_EXPORTER=otlp (or OTEL_EXPORTER_OTLP_ENDPOINT set) sends spans over OTLP/HTTP,
    `console` prints them as JSON lines on stdout, anything else (the default) records nothing.
    """
    global _configured, _recording  # noqa: PLW0603 (once per process)
    if _configured:
        return
    _configured = True
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not exporter_name and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        exporter_name = "otlp"
    if exporter_name in ("", "none"):
        return
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    if exporter_name == "console":
        provider.add_span_processor(
            SimpleSpanProcessor(
                ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n")
            )
        )
    elif exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _recording = True


def context_of(parent: TraceContext | None) -> Context:
    carrier = {}
    if parent is not None and parent.traceparent:
        carrier["traceparent"] = parent.traceparent
        if parent.tracestate:
            carrier["tracestate"] = parent.tracestate
    return _PROPAGATOR.extract(carrier)


def current_trace() -> TraceContext:
    """The W3C context of the current span, to put on the records a stage sends."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return TraceContext(
        traceparent=carrier.get("traceparent"), tracestate=carrier.get("tracestate")
    )


@contextmanager
def span(
    name: str,
    parent: TraceContext | None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    semconv: Mapping[str, AttributeValue] | None = None,
    **attributes: str | int | None,
) -> Iterator[TraceContext]:
    """Run a stage in a span under `parent`; yields the context to propagate onwards.

    `attributes` are the control plane's own (named `cp.<name>`); `semconv` are set under their
    own names (OpenTelemetry semantic conventions, such as `gen_ai.*`).

    When no exporter is configured the span is not recorded, and the parent context itself is
    propagated so that the trace id still travels with the job.
    """
    if not _recording:
        yield parent or TraceContext()
        return
    tracer = trace.get_tracer("prompt-gateway")
    attrs: dict[str, AttributeValue] = {
        f"cp.{k}": v for k, v in attributes.items() if v is not None
    }
    attrs.update(semconv or {})
    # Exceptions are recorded by type only: their messages may quote input (prompt) values.
    with tracer.start_as_current_span(
        name,
        context=context_of(parent),
        kind=kind,
        attributes=attrs,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            if current.get_span_context().is_valid and current.is_recording():
                yield current_trace()
            else:
                yield parent or TraceContext()
        except BaseException as exc:
            current.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            current.set_attribute("exception.type", type(exc).__name__)
            raise


def annotate(semconv: Mapping[str, AttributeValue], *, error: str | None = None) -> None:
    """Add attributes (under their own names) to the current span; `error` marks it failed."""
    if not _recording:
        return
    current = trace.get_current_span()
    if not current.is_recording():
        return
    current.set_attributes(semconv)
    if error is not None:
        current.set_status(Status(StatusCode.ERROR, error))


def log_ids() -> dict[str, str]:
    """trace_id and span_id of the current span, for log lines."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}
