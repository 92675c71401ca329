"""The timeline page's HTML for each kind of job: routing, errors, costs, gaps, labels."""

from __future__ import annotations

import re
from html import unescape

import pytest

from api.timeline import Layout, chart, gaps, states_after, text_width, timeline_page
from tests.support.timeline_cases import (
    SECRET_PROMPT,
    deadline_job,
    failed_job,
    fallback_job,
    no_target_job,
)


def section(html: str, name: str) -> str:
    match = re.search(rf'<section id="{name}">(.*?)</section>', html, re.S)
    assert match, f"no section {name}"
    return unescape(match.group(1))


def test_routing_candidates_with_score_breakdown_and_exclusions() -> None:
    job = fallback_job()
    routing = section(timeline_page(job), "routing")
    decision = job.decisions[0]
    assert "Decision 1 (initial)" in routing
    for candidate in decision.candidates:
        assert f"{candidate.provider} / {candidate.model}" in routing
        assert f"{candidate.score:.3f}" in routing
        assert f"{candidate.breakdown.latency:.3f}" in routing
    assert "sim-cheap / thrift-nano-sim ✓" in routing
    for excluded in decision.excluded:
        assert f"{excluded.provider} / {excluded.model}" in routing
        assert excluded.reason in routing
    assert "fallback plan" in routing
    assert "score</th><th>cost</th><th>latency</th><th>reliability" in routing


def test_attempt_errors_show_code_http_status_and_provider_message() -> None:
    html = timeline_page(failed_job())
    attempts = section(html, "attempts")
    assert "rate_limited" in attempts and "429" in attempts
    assert "overloaded" in attempts and "503" in attempts
    assert "authentication" in attempts and "401" in attempts
    assert "invalid_api_key" in attempts
    assert "rate limit reached for requests" in attempts
    assert "the engine is currently overloaded" in attempts


def test_the_request_text_never_appears_even_when_a_provider_echoes_it() -> None:
    html = timeline_page(fallback_job())
    assert SECRET_PROMPT not in unescape(html)
    assert "[request text redacted]" in unescape(html)


def test_cost_per_attempt_and_total() -> None:
    job = fallback_job()
    attempts = section(timeline_page(job), "attempts")
    assert job.final is not None and job.final.cost.total is not None
    total = job.final.cost.total.amount
    assert total is not None and total > 0
    assert f'<td id="total-cost">{format(total, "f")} USD' in attempts
    winner = job.attempts[-1]
    assert winner.cost is not None and winner.cost.amount is not None
    assert f"{format(winner.cost.amount, 'f')} USD" in attempts
    assert attempts.count("0 USD</td>") >= 2  # the refused attempts billed nothing


def test_an_unknown_cost_says_why() -> None:
    attempts = section(timeline_page(deadline_job()), "attempts")
    assert "unknown<small>cancelled while running: the provider may have billed" in attempts


def test_backoff_gaps_are_shaded_and_labelled() -> None:
    job = fallback_job()
    (gap,) = gaps(job)
    first, second = job.attempts[0], job.attempts[1]
    assert (gap.start, gap.end) == (first.finished_at, second.dispatched_at)
    assert gap.label == "backoff 174 ms"
    svg = chart(job)
    assert 'class="gap"' in svg
    assert ">backoff 174 ms</text>" in svg


def test_fallback_without_waiting_draws_no_gap() -> None:
    job = fallback_job()
    assert job.attempts[2].dispatched_at == job.attempts[1].finished_at
    assert len(gaps(job)) == 1


def test_the_state_after_attempt_failed_is_what_the_step_left() -> None:
    job = fallback_job()
    pairs = list(zip([e.type for e in job.events], states_after(job.events), strict=True))
    failed = [state for kind, state in pairs if kind == "attempt_failed"]
    assert failed == ["RETRYING", "ROUTED"]
    assert "<td>attempt_failed</td><td>STARTED</td>" not in timeline_page(job)
    assert "<td>attempt_failed</td><td>RETRYING</td>" in timeline_page(job)


def test_no_attempt_shows_a_panel_instead_of_an_empty_chart() -> None:
    html = timeline_page(no_target_job())
    assert '<div id="no-attempt" class="panel">No attempt was made: ' in html
    assert "no_eligible_target" in html
    assert "<svg" not in html
    assert "1 ms" not in html
    routing = section(html, "routing")
    assert "nothing: no eligible target" in routing
    assert "capability_missing" in routing
    assert "required capabilities" in routing and "teleportation" in routing


def test_the_outcome_reason_is_shown() -> None:
    html = unescape(timeline_page(failed_job()))
    assert 'id="outcome">Why it ended: <code>attempt_budget_exhausted</code>' in html


def test_deadline_job_marks_the_deadline_and_keeps_its_label_clear() -> None:
    svg = chart(deadline_job())
    assert 'class="deadline"' in svg
    assert ">deadline</text>" in svg
    assert '<text x="264.0" y="45.0" class="in">cancelled · deadline passed</text>' in svg


TEXT = re.compile(
    r'<text x="([\d.]+)" y="([\d.]+)" class="(\w+)"(?: text-anchor="(\w+)")?>(.*?)</text>'
)


@pytest.mark.parametrize("case", [fallback_job, deadline_job, failed_job])
def test_no_two_chart_texts_overlap(case: object) -> None:
    assert callable(case)
    svg = chart(case())
    boxes = []
    for x, y, _, anchor, text in TEXT.findall(svg):
        width = text_width(unescape(text))
        x0 = float(x) - (width if anchor == "end" else width / 2 if anchor == "middle" else 0)
        boxes.append((x0, float(y) - 12, x0 + width, float(y) + 4, unescape(text)))
        assert x0 >= 0 and x0 + width <= 960, text
    layout = Layout()
    for box in boxes:
        assert layout.free(box[:4]), f"{box[4]!r} overlaps another label"
        layout.take(box[:4])


def test_text_width_is_conservative_for_the_widest_glyphs() -> None:
    # DejaVu Sans at 12 px: 'm' advances 11.7 px, 'W' 11.9, digits 7.6, 'i' 3.3.
    assert text_width("mmmm") >= 4 * 11.7
    assert text_width("WWWW") >= 4 * 11.9
    assert text_width("0123456789") >= 10 * 7.64
