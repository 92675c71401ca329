"""A job's timeline as one self-contained HTML page: the place to understand a job.

It shows why the job ended, the routing decision (candidates with their score breakdown, excluded
targets with why), every attempt with its error and cost, the attempts on a time axis with the
backoff and waiting gaps between them, and every event with the state the job was left in.

Everything is escaped and nothing is loaded from elsewhere. The request's content is never shown:
provider messages are already sanitized by the error mapping, and any text of the prompt that
still appears in one is redacted here.

Text in the chart never overlaps: widths are over-estimated per character (DejaVu Sans, the
widest common fallback) and each label takes the first free place among its candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from html import escape

from domain.job import Attempt, Job
from domain.lifecycle import AttemptStatus
from domain.messages import JobEvent
from domain.money import Cost
from domain.routing import RoutingDecision

COLOURS = {
    AttemptStatus.COMPLETED: "#2e9d5b",
    AttemptStatus.FAILED: "#d0453c",
    AttemptStatus.TIMED_OUT: "#e08a1e",
    AttemptStatus.CANCELLED: "#8a8f98",
    AttemptStatus.DISPATCHED: "#4a7bd0",
    AttemptStatus.STARTED: "#4a7bd0",
}
#: Chart geometry: total width, where bars start, right margin, row height, bar height.
WIDTH, LEFT, RIGHT, ROW, BAR = 960, 260, 16, 46, 20
TOP = 30
FONT = 12
#: The longest provider message shown.
MAX_MESSAGE = 300


def _ms(start: datetime, at: datetime) -> float:
    return (at - start).total_seconds() * 1000


def text_width(text: str, size: float = FONT) -> float:
    """Over-estimate how wide `text` renders (DejaVu Sans advances, rounded up)."""
    total = 0.0
    for char in text:
        if char in "il.,:;|!'()[]/ ":
            total += 0.42
        elif char in "mwMW@%—":
            total += 1.02
        elif char.isupper() or char in "#&_~=+<>":
            total += 0.82
        else:
            total += 0.66
    return total * size + 2


@dataclass
class Layout:
    """Text boxes placed so far in the chart: a new one goes where it overlaps none."""

    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)

    def free(self, box: tuple[float, float, float, float]) -> bool:
        x0, y0, x1, y1 = box
        return all(x1 <= a or b <= x0 or y1 <= c or d <= y0 for a, c, b, d in self.boxes)

    def take(self, box: tuple[float, float, float, float]) -> None:
        self.boxes.append(box)


def _text(layout: Layout, x: float, y: float, text: str, cls: str, *, anchor: str = "start") -> str:
    """A text whose baseline is at `y`, its box recorded in `layout`."""
    width = text_width(text)
    x0 = x - width if anchor == "end" else x - width / 2 if anchor == "middle" else x
    layout.take((x0, y - FONT, x0 + width, y + 4))
    extra = f' text-anchor="{anchor}"' if anchor != "start" else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" class="{cls}"{extra}>{escape(text)}</text>'


def _fit(text: str, width: float) -> str:
    """Cut `text` with an ellipsis so that it fits in `width`."""
    if text_width(text) <= width:
        return text
    while text and text_width(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _redact(text: str, job: Job) -> str:
    """Drop any line of the request's text that a provider echoed in its message."""
    for raw in job.request.prompt_text().splitlines():
        line = raw.strip()
        if len(line) >= 8 and line in text:
            text = text.replace(line, "[request text redacted]")
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 1] + "…"
    return text


def _money(cost: Cost | None) -> str:
    if cost is None:
        return "—"
    if cost.amount is None:
        return "unknown"
    text = f"{format(cost.amount, 'f')} {cost.currency}"
    return text + " (est.)" if cost.estimated else text


def states_after(events: list[JobEvent]) -> list[str]:
    """The state each event left the job in.

    An event records the job's state when it was written; `attempt_failed` is written before the
    step decides what follows (retry, fallback, failure), so its state is the next event's of
    the same step.
    """
    states = []
    for i, event in enumerate(events):
        state = event.state
        following = events[i + 1] if i + 1 < len(events) else None
        if event.type == "attempt_failed" and following is not None and following.at == event.at:
            state = following.state
        states.append(state)
    return states


def _end(job: Job) -> datetime:
    times = [job.updated_at, *(a.finished_at for a in job.attempts if a.finished_at)]
    if job.final is not None:
        times.append(job.final.finished_at)
    if job.retry_at is not None and not job.terminal:
        times.append(job.retry_at)
    return max(times)


@dataclass(frozen=True)
class Gap:
    start: datetime
    end: datetime
    label: str
    title: str


def gaps(job: Job) -> list[Gap]:
    """Time between an attempt's end and the next dispatch: a backoff or a wait."""
    delays = {e.attempt_id: e.data.get("delay_ms") for e in job.events if e.type == "retried"}
    found: list[Gap] = []
    for attempt, after in zip(job.attempts, [*job.attempts[1:], None], strict=True):
        if attempt.finished_at is None:
            continue
        if after is not None:
            until = after.dispatched_at
        elif job.retry_at is not None and not job.terminal:
            until = job.retry_at
        else:
            continue
        span = _ms(attempt.finished_at, until)
        if span <= 0:
            continue
        planned = delays.get(attempt.attempt_id)
        if planned is not None:
            label = f"backoff {span:.0f} ms"
            title = f"retry backoff after attempt #{attempt.attempt_no}: {planned} ms planned"
        else:
            label = f"waiting {span:.0f} ms"
            title = f"waiting after attempt #{attempt.attempt_no}"
        found.append(Gap(attempt.finished_at, until, label, title))
    return found


def _outcome_text(attempt: Attempt, job: Job) -> str:
    text = attempt.status.value.lower().replace("_", " ")
    outcome = job.final.outcome if job.final else None
    if attempt.status is AttemptStatus.CANCELLED and outcome and outcome.reason == "deadline":
        text += " · deadline passed"
    if attempt.error is not None:
        text += f" · {attempt.error.code.value}"
        if attempt.error.http_status is not None:
            text += f" {attempt.error.http_status}"
    return text


def chart(job: Job) -> str:
    """The attempts on a time axis, with gaps, the deadline and event ticks."""
    start, end = job.created_at, _end(job)
    span = max(_ms(start, end), 1.0)
    inner = WIDTH - LEFT - RIGHT
    scale = inner / span

    def x_at(at: datetime) -> float:
        return LEFT + min(max(_ms(start, at), 0.0), span) * scale

    layout = Layout()
    parts: list[str] = []
    rows_bottom = TOP + len(job.attempts) * ROW
    # Axis ticks along the top, labels at the tick (the last one right-aligned).
    step = _nice_step(span / 5)
    tick = 0.0
    while tick <= span + 1e-9:
        x = LEFT + tick * scale
        anchor = "end" if x > WIDTH - RIGHT - 40 else "middle" if tick else "start"
        label = _duration(tick)
        box_ok = layout.free(_box(x, 14, label, anchor))
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="18" y2="{rows_bottom}" class="grid"/>')
        if box_ok:
            parts.append(_text(layout, x, 14, label, "axis", anchor=anchor))
        tick += step
    # Backoff and waiting gaps: shaded across the rows, labelled in the lane below them.
    lane_y = rows_bottom + 18
    lane_lines = 0
    for gap in gaps(job):
        x0, x1 = x_at(gap.start), x_at(gap.end)
        parts.append(
            f'<rect x="{x0:.1f}" y="{TOP - 6}" width="{max(x1 - x0, 1.5):.1f}" '
            f'height="{rows_bottom - TOP + 6}" class="gap">'
            f"<title>{escape(gap.title)}</title></rect>"
        )
        centre = (x0 + x1) / 2
        width = text_width(gap.label)
        left = min(max(centre - width / 2, LEFT), WIDTH - RIGHT - width)
        line = 0
        while not layout.free(
            (left, lane_y + line * 16 - FONT, left + width, lane_y + line * 16 + 4)
        ):
            line += 1
        lane_lines = max(lane_lines, line + 1)
        parts.append(_text(layout, left, lane_y + line * 16, gap.label, "gapl"))
    bottom = lane_y + lane_lines * 16
    # The deadline, when it falls on the axis.
    if job.deadline_at is not None and start <= job.deadline_at <= end:
        x = x_at(job.deadline_at)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="18" y2="{rows_bottom}" class="deadline">'
            "<title>deadline</title></line>"
        )
        label = "deadline"
        left = min(max(x - text_width(label) / 2, LEFT), WIDTH - RIGHT - text_width(label))
        line = 0
        while not layout.free(_box(left, bottom + line * 16, label, "start")):
            line += 1
        parts.append(_text(layout, left, bottom + line * 16, label, "dl"))
        bottom += (line + 1) * 16
    # Event ticks (titles only: hover to read).
    for event in job.events:
        x = x_at(event.at)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="18" y2="{rows_bottom}" '
            f'class="tick"><title>{escape(f"{event.seq} {event.type}")}</title></line>'
        )
    # One row per attempt: its label, its bar, its outcome where there is room.
    for i, attempt in enumerate(job.attempts):
        y = TOP + i * ROW
        x0 = x_at(attempt.dispatched_at)
        x1 = max(x_at(attempt.finished_at or end), x0 + 2)
        label = _fit(f"#{attempt.attempt_no} {attempt.provider} / {attempt.model}", LEFT - 16)
        parts.append(_text(layout, 8, y + 15, label, "lbl"))
        colour = COLOURS.get(attempt.status, "#4a7bd0")
        outcome = _outcome_text(attempt, job)
        parts.append(
            f'<rect x="{x0:.1f}" y="{y}" width="{x1 - x0:.1f}" height="{BAR}" rx="3" '
            f'fill="{colour}"><title>{escape(outcome)}</title></rect>'
        )
        parts.append(_outcome_label(layout, outcome, x0, x1, y))
    height = bottom + 8
    return (
        f'<svg id="chart" width="{WIDTH}" height="{height}" role="img" '
        'aria-label="attempts on a time axis">'
        '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#fff4d6"/>'
        '<line x1="0" y1="0" x2="0" y2="6" stroke="#e6c46a" stroke-width="2"/></pattern></defs>'
        + "".join(parts)
        + "</svg>"
    )


def _box(x: float, y: float, text: str, anchor: str) -> tuple[float, float, float, float]:
    width = text_width(text)
    x0 = x - width if anchor == "end" else x - width / 2 if anchor == "middle" else x
    return (x0, y - FONT, x0 + width, y + 4)


def _outcome_label(layout: Layout, text: str, x0: float, x1: float, y: int) -> str:
    """Inside the bar when it fits, else after it, else before it, else under it."""
    width = text_width(text)
    base = y + 15
    if x1 - x0 >= width + 8:
        return _text(layout, x0 + 4, base, text, "in")
    if x1 + 4 + width <= WIDTH - RIGHT and layout.free(_box(x1 + 4, base, text, "start")):
        return _text(layout, x1 + 4, base, text, "out")
    if x0 - 4 - width >= LEFT and layout.free(_box(x0 - 4, base, text, "end")):
        return _text(layout, x0 - 4, base, text, "out", anchor="end")
    left = min(max(x0, LEFT), WIDTH - RIGHT - width)
    return _text(layout, left, y + BAR + 14, text, "out")


def _nice_step(raw: float) -> float:
    magnitude = 1.0
    while magnitude * 10 <= raw:
        magnitude *= 10
    while magnitude > raw and magnitude > 1e-3:
        magnitude /= 10
    for factor in (1, 2, 5, 10):
        if magnitude * factor >= raw:
            return magnitude * factor
    return magnitude * 10


def _duration(ms: float) -> str:
    return f"{ms / 1000:g} s" if ms >= 10_000 else f"{ms:.0f} ms"


def routing_section(decisions: list[RoutingDecision], reasons: list[str]) -> str:
    """Each routing decision: what was chosen from which candidates, and what was ruled out."""
    if not decisions:
        return '<section id="routing"><h2>Routing</h2><p>No routing decision yet.</p></section>'
    out = ['<section id="routing"><h2>Routing</h2>']
    for n, decision in enumerate(decisions):
        why = reasons[n] if n < len(reasons) else ""
        chosen = (
            f"{decision.chosen.provider} / {decision.chosen.model}"
            if decision.chosen
            else "nothing: no eligible target"
        )
        plan = ", ".join(f"{t.provider} / {t.model}" for t in decision.fallback_plan) or "none"
        facts = [
            ("chosen", chosen),
            ("fallback plan", plan),
            ("preference", str(decision.preference)),
            ("prompt tokens (estimate)", str(decision.prompt_tokens_estimate)),
            ("policy / catalogue", f"{decision.policy_version} / {decision.catalogue_version}"),
        ]
        if decision.pin:
            facts.append(("pinned", ", ".join(decision.pin)))
        if decision.required_capabilities:
            facts.append(("required capabilities", ", ".join(decision.required_capabilities)))
        title = f"Decision {n + 1}" + (f" ({why})" if why else "")
        out.append(f'<h3>{escape(title)}</h3><dl class="facts">')
        out.extend(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts)
        out.append("</dl>")
        if decision.candidates:
            out.append(
                '<table class="candidates"><thead><tr><th>candidate</th><th>score</th>'
                "<th>cost</th><th>latency</th><th>reliability</th><th>estimated cost</th>"
                "<th>expected latency</th></tr></thead><tbody>"
            )
            for c in decision.candidates:
                mark = (
                    " ✓"
                    if decision.chosen
                    and (c.provider, c.model) == (decision.chosen.provider, decision.chosen.model)
                    else ""
                )
                cost = (
                    f"{format(c.estimated_cost.amount, 'f')} {c.estimated_cost.currency}"
                    if c.estimated_cost
                    else "unknown"
                )
                b = c.breakdown
                out.append(
                    f"<tr><td>{escape(c.provider)} / {escape(c.model)}{mark}</td>"
                    f"<td>{c.score:.3f}</td><td>{b.cost:.3f}</td><td>{b.latency:.3f}</td>"
                    f"<td>{b.reliability:.3f}</td><td>{escape(cost)}</td>"
                    f"<td>{c.expected_latency_ms} ms</td></tr>"
                )
            out.append("</tbody></table>")
        if decision.excluded:
            out.append(
                '<table class="excluded"><thead><tr><th>excluded</th><th>reason</th><th>why</th>'
                "</tr></thead><tbody>"
            )
            out.extend(
                f"<tr><td>{escape(e.provider)} / {escape(e.model)}</td>"
                f"<td><code>{escape(e.reason_code)}</code></td><td>{escape(e.reason)}</td></tr>"
                for e in decision.excluded
            )
            out.append("</tbody></table>")
    out.append("</section>")
    return "".join(out)


def attempts_section(job: Job) -> str:
    """Each attempt's target, state, error (code, HTTP status, provider's) and cost; the total."""
    billed = {c.attempt_id: c.cost for c in job.final.cost.attempts} if job.final else {}
    rows = []
    for a in job.attempts:
        error = a.error
        code = error.code.value if error else ""
        status = str(error.http_status) if error and error.http_status is not None else ""
        provider_code = error.provider_code or "" if error else ""
        message = _redact(error.message, job) if error else ""
        cost = a.cost or billed.get(a.attempt_id)
        cost_title = cost.reason or "" if cost else ""
        why = f"<small>{escape(cost_title)}</small>" if cost and cost.amount is None else ""
        latency = f"{a.latency_ms} ms" if a.latency_ms is not None else ""
        rows.append(
            f'<tr class="attempt"><td>#{a.attempt_no}</td>'
            f"<td>{escape(a.provider)} / {escape(a.model)}</td>"
            f"<td>{escape(a.status.value)}</td><td><code>{escape(code)}</code></td>"
            f"<td>{escape(status)}</td><td>{escape(provider_code)}</td>"
            f'<td class="msg">{escape(message)}</td><td>{escape(latency)}</td>'
            f'<td class="cost" title="{escape(cost_title)}">{escape(_money(cost))}{why}</td></tr>'
        )
    total = job.final.cost.total if job.final else None
    foot = (
        f'<tfoot><tr><td colspan="8">total</td><td id="total-cost">{escape(_money(total))}</td>'
        "</tr></tfoot>"
        if job.final
        else ""
    )
    return (
        '<section id="attempts"><h2>Attempts</h2><table><thead><tr><th>#</th><th>target</th>'
        "<th>state</th><th>error</th><th>HTTP</th><th>provider code</th><th>provider message</th>"
        f"<th>latency</th><th>cost</th></tr></thead><tbody>{''.join(rows)}</tbody>{foot}"
        "</table></section>"
    )


def _no_attempt(job: Job) -> str:
    final = job.final
    if final is not None and final.error is not None:
        reason = final.error.message
    elif final is not None and final.outcome is not None:
        reason = final.outcome.detail
    else:
        reason = "the job has not been dispatched yet"
    return (
        '<div id="no-attempt" class="panel">No attempt was made: '
        f"{escape(_redact(reason, job))}</div>"
    )


def timeline_page(job: Job) -> str:
    """Render the page; everything is escaped, nothing is loaded from elsewhere."""
    start = job.created_at
    final = job.final
    headline = escape(job.status.value)
    if final is not None and final.provider:
        headline += f" via {escape(final.provider)} / {escape(final.model or '')}"
    if final is not None and final.error is not None:
        headline += (
            f" — {escape(final.error.code.value)}: {escape(_redact(final.error.message, job))}"
        )
    cost = ""
    if final is not None and final.cost.total is not None and final.cost.total.amount is not None:
        cost = f" · cost {escape(_money(final.cost.total))}"
    outcome = ""
    if final is not None and final.outcome is not None:
        o = final.outcome
        outcome = (
            f'<p id="outcome">Why it ended: <code>{escape(o.reason)}</code> — '
            f"{escape(_redact(o.detail, job))} ({o.attempts_used} of {o.attempts_allowed} "
            "attempts used)</p>"
        )
        if o.untried_targets:
            outcome += "<p>Not tried: " + ", ".join(
                f"{escape(t.provider)} / {escape(t.model)} ({escape(t.reason)})"
                for t in o.untried_targets
            )
            outcome += "</p>"
        if o.cancelled_by:
            outcome += f"<p>Cancelled by {escape(o.cancelled_by)}</p>"
    reasons = [str(e.data.get("reason", "")) for e in job.events if e.type == "routed"]
    picture = chart(job) if job.attempts else _no_attempt(job)
    states = states_after(job.events)
    events = "".join(
        "<tr>"
        f"<td>{event.seq}</td><td>{_ms(start, event.at):.0f} ms</td>"
        f"<td>{escape(event.type)}</td><td>{escape(state)}</td>"
        f"<td>{escape((event.attempt_id or '').rpartition('-')[2])}</td>"
        f'<td class="msg">{escape(_summary(event.data))}</td>'
        "</tr>"
        for event, state in zip(job.events, states, strict=True)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="referrer" content="no-referrer">
<title>Job {escape(job.job_id)} timeline</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #1d2330; max-width: 1100px; }}
h1 {{ font-size: 18px; margin: 0 0 4px; }} h2 {{ font-size: 16px; margin: 20px 0 6px; }}
h3 {{ font-size: 14px; margin: 10px 0 4px; }}
.state {{ font-size: 16px; margin: 0 0 8px; }}
svg {{ background: #f6f7f9; border: 1px solid #dde1e7; display: block; }}
svg text {{ font-family: system-ui, sans-serif; }}
.out, .gapl, .dl, .axis {{ paint-order: stroke; stroke: #f6f7f9; stroke-width: 4px; }}
.lbl {{ font-size: 12px; fill: #1d2330; }} .out {{ font-size: 12px; fill: #444; }}
.in {{ font-size: 12px; fill: #fff; }} .gapl {{ font-size: 12px; fill: #8a6a10; }}
.dl {{ font-size: 12px; fill: #b3261e; }}
.axis {{ font-size: 12px; fill: #666; }} .grid {{ stroke: #e3e6eb; }}
.tick {{ stroke: #99a; stroke-dasharray: 2 3; }}
.gap {{ fill: url(#hatch); opacity: 0.9; }} .deadline {{ stroke: #b3261e; stroke-width: 2;
  stroke-dasharray: 6 3; }}
.panel {{ padding: 16px; background: #fdf3f2; border: 1px solid #e5b5b0; border-radius: 4px; }}
dl.facts {{ display: grid; grid-template-columns: max-content auto; gap: 2px 12px; margin: 0; }}
dt {{ color: #555; }} dd {{ margin: 0; }}
table {{ border-collapse: collapse; margin-top: 8px; }}
td, th {{ border-bottom: 1px solid #e3e6eb; padding: 4px 10px; text-align: left; font-size: 13px;
  vertical-align: top; white-space: nowrap; }}
td small {{ color: #666; white-space: normal; display: block; max-width: 260px; }}
td.msg {{ max-width: 520px; overflow-wrap: anywhere; white-space: normal; }}
</style></head>
<body>
<h1>Job {escape(job.job_id)} <small>({escape(job.request_id)})</small></h1>
<p class="state" id="final-state">{headline}{cost} · {len(job.attempts)} attempt(s)</p>
{outcome}
{picture}
{attempts_section(job) if job.attempts else ""}
{routing_section(job.decisions, reasons)}
<section id="events"><h2>Events</h2>
<table><thead><tr><th>seq</th><th>t</th><th>event</th><th>state after</th><th>attempt</th>
<th>detail</th></tr></thead><tbody>{events}</tbody></table></section>
</body></html>
"""


def _summary(data: dict[str, object]) -> str:
    keys = ("provider", "to_provider", "reason", "delay_ms", "result", "attempts")
    parts = [f"{k}={data[k]}" for k in keys if k in data and data[k] not in (None, "")]
    error = data.get("error")
    if isinstance(error, dict) and "code" in error:
        parts.append(f"error={error['code']}")
        if error.get("http_status") is not None:
            parts.append(f"http_status={error['http_status']}")
    return ", ".join(parts)
