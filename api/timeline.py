"""A job's timeline as one self-contained HTML page: attempts on a time axis, then every event."""

from __future__ import annotations

from datetime import datetime
from html import escape

from domain.job import Job
from domain.lifecycle import AttemptStatus

COLOURS = {
    AttemptStatus.COMPLETED: "#2e9d5b",
    AttemptStatus.FAILED: "#d0453c",
    AttemptStatus.TIMED_OUT: "#e08a1e",
    AttemptStatus.CANCELLED: "#8a8f98",
    AttemptStatus.DISPATCHED: "#4a7bd0",
    AttemptStatus.STARTED: "#4a7bd0",
}
WIDTH, LEFT, ROW = 900, 220, 34


def _ms(start: datetime, at: datetime) -> float:
    return (at - start).total_seconds() * 1000


def timeline_page(job: Job) -> str:
    """Render the page; everything is escaped, nothing is loaded from elsewhere."""
    start = job.created_at
    end = max(
        [job.updated_at, *(a.finished_at or job.updated_at for a in job.attempts)],
        default=job.updated_at,
    )
    span = max(_ms(start, end), 1.0)
    scale = (WIDTH - LEFT - 20) / span
    rows: list[str] = []
    for i, attempt in enumerate(job.attempts):
        y = 30 + i * ROW
        x0 = LEFT + _ms(start, attempt.dispatched_at) * scale
        x1 = LEFT + _ms(start, attempt.finished_at or end) * scale
        colour = COLOURS.get(attempt.status, "#4a7bd0")
        outcome = attempt.status.value.lower()
        if attempt.error is not None:
            outcome += f" ({attempt.error.code.value})"
        label = f"#{attempt.attempt_no} {attempt.provider} / {attempt.model}"
        rows.append(
            f'<text x="8" y="{y + 15}" class="lbl">{escape(label)}</text>'
            f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 2):.1f}" height="20" rx="3" '
            f'fill="{colour}"><title>{escape(outcome)}</title></rect>'
            + _outcome_label(outcome, x0, x1, y)
        )
    markers = []
    for event in job.events:
        x = LEFT + _ms(start, event.at) * scale
        markers.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="18" y2="{30 + len(job.attempts) * ROW}" '
            f'class="tick"><title>{escape(f"{event.seq} {event.type}")}</title></line>'
        )
    height = 50 + max(len(job.attempts), 1) * ROW
    axis = (
        f'<text x="{LEFT}" y="12" class="axis">0 ms</text>'
        f'<text x="{WIDTH - 80}" y="12" class="axis">{span:.0f} ms</text>'
    )
    events = "".join(
        "<tr>"
        f"<td>{event.seq}</td><td>{_ms(start, event.at):.0f} ms</td>"
        f"<td>{escape(event.type)}</td><td>{escape(event.state)}</td>"
        f"<td>{escape((event.attempt_id or '').rpartition('-')[2])}</td>"
        f"<td>{escape(_summary(event.data))}</td>"
        "</tr>"
        for event in job.events
    )
    final = job.final
    outcome = escape(job.status.value)
    if final is not None and final.provider:
        outcome += f" via {escape(final.provider)} / {escape(final.model or '')}"
    if final is not None and final.error is not None:
        outcome += f" — {escape(final.error.code.value)}: {escape(final.error.message)}"
    cost = ""
    if final is not None and final.cost.total is not None and final.cost.total.amount is not None:
        total = final.cost.total
        cost = f" · cost {escape(format(total.amount, 'f'))} {escape(total.currency)}"
        cost += " (estimated)" if total.estimated else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Job {escape(job.job_id)} timeline</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #1d2330; }}
h1 {{ font-size: 18px; margin: 0 0 4px; }}
.state {{ font-size: 16px; margin: 0 0 16px; }}
svg {{ background: #f6f7f9; border: 1px solid #dde1e7; }}
.lbl {{ font-size: 12px; fill: #1d2330; }} .out {{ font-size: 12px; fill: #444; }}
.axis {{ font-size: 11px; fill: #666; }} .tick {{ stroke: #99a; stroke-dasharray: 2 3; }}
table {{ border-collapse: collapse; margin-top: 16px; }}
td, th {{ border-bottom: 1px solid #e3e6eb; padding: 4px 10px; text-align: left; font-size: 13px; }}
</style></head>
<body>
<h1>Job {escape(job.job_id)} <small>({escape(job.request_id)})</small></h1>
<p class="state" id="final-state">{outcome}{cost} · {len(job.attempts)} attempt(s)</p>
<svg width="{WIDTH}" height="{height}" role="img" aria-label="attempts on a time axis">
{axis}{"".join(markers)}{"".join(rows)}
</svg>
<table><thead><tr><th>seq</th><th>t</th><th>event</th><th>state</th><th>attempt</th>
<th>detail</th></tr></thead><tbody>{events}</tbody></table>
</body></html>
"""


def _outcome_label(text: str, x0: float, x1: float, y: int) -> str:
    """Put the outcome after the bar, or before it when the bar reaches the right edge."""
    if x1 + 8 * len(text) < WIDTH:
        return f'<text x="{x1 + 4:.1f}" y="{y + 15}" class="out">{escape(text)}</text>'
    return (
        f'<text x="{x0 - 4:.1f}" y="{y + 15}" class="out" text-anchor="end">{escape(text)}</text>'
    )


def _summary(data: dict[str, object]) -> str:
    keys = ("provider", "to_provider", "reason", "delay_ms", "result", "attempts")
    parts = [f"{k}={data[k]}" for k in keys if k in data and data[k] not in (None, "")]
    error = data.get("error")
    if isinstance(error, dict) and "code" in error:
        parts.append(f"error={error['code']}")
    return ", ".join(parts)
