"""Completion webhooks, the pure part: signatures, callback URL checks, retry schedule, decide."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from domain.commands import CancelJob, CreateJob, RecordWebhook
from domain.decide import MAX_WEBHOOK_EVENTS, Context, decide
from domain.ids import job_id_for
from domain.job import Job
from domain.messages import JobRequest, WebhookDelivery
from domain.outbox import render
from domain.webhooks import (
    backoff_s,
    delivery_id,
    parse_allowed_hosts,
    parse_secrets,
    refusal,
    schedule,
    sign,
    verify,
)
from tests.unit.test_decide import CTX

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TENANT = "tenant-a"
#: The example secret and message of the Standard Webhooks spec's reference implementations.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


# -- signatures -----------------------------------------------------------------------------------


def reference_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks algorithm, written out independently of domain.webhooks."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def test_the_signature_is_the_standard_webhooks_one() -> None:
    body = b'{"test": 2432232314}'
    got = sign(SPEC_SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert got == reference_signature(SPEC_SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    # The spec's published test vector for this secret, id, timestamp and body.
    assert got == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_a_plain_text_secret_signs_with_its_utf8_bytes() -> None:
    body = b"{}"
    mac = hmac.new(b"s3cret", b"whd_j.5.{}", hashlib.sha256).digest()
    assert sign("s3cret", "whd_j", 5, body) == "v1," + base64.b64encode(mac).decode()


def test_verify_accepts_a_fresh_signature_and_refuses_tampering_and_stale_times() -> None:
    body = b'{"a":1}'
    headers = {
        "webhook-id": "whd_x",
        "webhook-timestamp": "1000",
        "webhook-signature": "v1,bogus " + sign(SPEC_SECRET, "whd_x", 1000, body),
    }
    assert verify(SPEC_SECRET, headers, body, now=1010)
    assert not verify(SPEC_SECRET, headers, b'{"a":2}', now=1010)
    assert not verify(SPEC_SECRET, {**headers, "webhook-id": "whd_y"}, body, now=1010)
    assert not verify(SPEC_SECRET, headers, body, now=1000 + 301)


def test_secrets_parse_as_tenant_pairs() -> None:
    assert parse_secrets("a=x, b = whsec_y\n# c=z\nd=e=f") == {"a": "x", "b": "whsec_y", "d": "e=f"}
    with pytest.raises(ValueError, match="tenant=secret"):
        parse_secrets("nosecret")


# -- callback URLs --------------------------------------------------------------------------------


def request(**fields: Any) -> JobRequest:
    return JobRequest.model_validate(
        {"request_id": "r-1", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://hooks.example.com/x", "https"),
        ("https://user:pw@hooks.example.com/x", "credentials"),
        ("https://user@hooks.example.com/x", "credentials"),
        ("https:///path", "no host"),
        ("https://hooks.example.com/x#frag", "fragment"),
        ("https://hooks.example.com/a b", "spaces"),
        ("https://hooks.example.com:99999/x", "not a valid URL"),
        ("javascript:alert(1)", "https"),
    ],
)
def test_a_malformed_callback_url_is_refused_by_the_request_model(url: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        request(callback_url=url)


def test_callback_url_changes_the_fingerprint_only_when_set() -> None:
    plain = request()
    assert "callback_url" not in plain.model_dump(exclude_none=True)
    with_url = request(callback_url="https://hooks.example.com/x")
    assert plain.fingerprint() != with_url.fingerprint()
    assert plain.fingerprint() == request(callback_url=None).fingerprint()


RULES = parse_allowed_hosts("*.example.com, hooks.acme.io, http://127.0.0.1, 10.1.2.3, *")


def test_no_allowed_hosts_refuses_every_callback_naming_the_setting() -> None:
    why = refusal("https://hooks.example.com/x", parse_allowed_hosts(""))
    assert why is not None and "CP_WEBHOOK_ALLOWED_HOSTS" in why


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://a.example.com/x", True),
        ("https://hooks.acme.io/x", True),
        ("http://hooks.acme.io/x", False),  # plain http needs an http:// entry
        ("http://127.0.0.1:8080/hook", True),  # named exactly, with http
        ("https://127.0.0.2/hook", False),  # loopback: a glob (*) does not let it through
        ("https://10.1.2.3/hook", True),  # private, named exactly
        ("https://10.1.2.4/hook", False),
        ("https://169.254.169.254/latest/meta-data", False),  # cloud metadata: link-local
        ("https://[::1]/hook", False),
        ("https://192.168.0.1/hook", False),
        ("https://8.8.8.8/hook", True),  # a public address matches the * entry
    ],
)
def test_the_allow_list(url: str, allowed: bool) -> None:
    assert (refusal(url, RULES) is None) is allowed, refusal(url, RULES)


def test_a_host_not_listed_is_refused() -> None:
    rules = parse_allowed_hosts("*.example.com")
    why = refusal("https://example.org/x", rules)
    assert why is not None and "not allowed by CP_WEBHOOK_ALLOWED_HOSTS" in why
    assert refusal("https://evil.example.com.attacker.net/x", rules) is not None


# -- retry schedule -------------------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap() -> None:
    waits = [backoff_s(n, base_s=5, max_s=3600) for n in range(1, 12)]
    assert waits == [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600]


def test_the_default_schedule_is_bounded_by_the_max_age() -> None:
    times = schedule(base_s=5, max_s=3600, max_age_s=86400)
    assert times[:4] == [0, 5, 15, 35]
    assert times[-1] <= 86400 < times[-1] + 3600
    assert len(times) == 33


# -- decide ---------------------------------------------------------------------------------------


def created(ctx: Context = CTX, **fields: Any) -> Job:
    req = request(tenant_id=TENANT, **fields)
    decision = decide(
        None,
        CreateJob(
            command_id="c-1",
            job_id=job_id_for(TENANT, req.request_id),
            at=T0,
            tenant_id=TENANT,
            fingerprint=req.fingerprint(),
            request=req,
        ),
        ctx,
    )
    assert decision.job is not None
    return decision.job


def cancelled(job: Job) -> tuple[Job, list[str]]:
    decision = decide(job, CancelJob(command_id="x-1", job_id=job.job_id, at=T0), CTX)
    assert decision.job is not None
    return decision.job, [e.topic for e in decision.publish]


def test_a_job_with_a_callback_owes_one_webhook_when_it_ends() -> None:
    url = "https://hooks.example.com/done"
    job = created(callback_url=url)
    assert all(e.topic != "webhook" for e in job.outbox)
    done, topics = cancelled(job)
    assert topics.count("webhook") == 1
    [entry] = [e for e in done.outbox if e.topic == "webhook"]
    message = render(done, entry)
    assert isinstance(message, WebhookDelivery)
    assert message.delivery_id == delivery_id(job.job_id) == f"whd_{job.job_id}"
    assert (message.callback_url, message.tenant_id) == (url, TENANT)
    assert message.response == done.final


def test_a_job_without_a_callback_owes_none() -> None:
    _, topics = cancelled(created())
    assert "webhook" not in topics and "responses" in topics


def attempt(job: Job, n: int, outcome: str, **fields: Any) -> RecordWebhook:
    return RecordWebhook(
        command_id=f"webhook:{n}:{outcome}",
        job_id=job.job_id,
        at=T0 + timedelta(seconds=n),
        delivery_id=delivery_id(job.job_id),
        attempt=n,
        outcome=outcome,
        **fields,
    )


def test_each_webhook_attempt_becomes_a_timeline_event_of_the_finished_job() -> None:
    done, _ = cancelled(created(callback_url="https://hooks.example.com/x"))
    first = decide(done, attempt(done, 1, "failed", status_code=500, latency_ms=3), CTX)
    assert first.job is not None
    [event] = first.job.events[len(done.events) :]
    assert (event.type, event.state) == ("webhook_failed", "CANCELLED")
    assert event.data["status_code"] == 500 and event.data["attempt"] == 1
    assert [e.topic for e in first.publish] == ["events"]
    again = decide(first.job, attempt(done, 1, "failed", status_code=500), CTX)
    assert again.outcome == "duplicate_command"
    second = decide(first.job, attempt(done, 2, "delivered", status_code=204), CTX)
    assert second.job is not None and second.job.events[-1].type == "webhook_delivered"
    assert second.job.status == done.status and second.job.final == done.final


def test_a_webhook_attempt_for_a_retired_or_unfinished_job_changes_nothing() -> None:
    job = created(callback_url="https://hooks.example.com/x")
    gone = decide(None, attempt(job, 1, "delivered"), CTX)
    assert (gone.job, gone.outcome, gone.dead_letter) == (None, "noop", None)
    assert decide(job, attempt(job, 1, "delivered"), CTX).outcome == "noop"


def test_failed_webhook_attempts_past_the_cap_are_only_counted() -> None:
    done, _ = cancelled(created(callback_url="https://hooks.example.com/x"))
    job = done
    for n in range(1, MAX_WEBHOOK_EVENTS + 3):
        decision = decide(job, attempt(job, n, "failed", status_code=503), CTX)
        assert decision.job is not None
        job = decision.job
    assert sum(e.type == "webhook_failed" for e in job.events) == MAX_WEBHOOK_EVENTS
    assert job.ignored_events == done.ignored_events + 2
    final = decide(job, attempt(job, 99, "gave_up"), CTX).job
    assert final is not None and final.events[-1].type == "webhook_gave_up"


def test_the_readme_verification_snippet_accepts_our_signatures() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    part = readme.split("### Completion webhooks", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", part, re.S)
    assert match, "the Completion webhooks section has no Python verification example"
    scope: dict[str, Any] = {}
    exec(compile(match.group(1), "README.md", "exec"), scope)
    now = int(time.time())
    body = b'{"job_id":"j"}'
    for secret in (SPEC_SECRET, "plain-text-secret"):
        headers = {
            "webhook-id": "whd_j",
            "webhook-timestamp": str(now),
            "webhook-signature": sign(secret, "whd_j", now, body),
        }
        assert scope["verify"](secret, headers, body)
        assert not scope["verify"](secret, headers, body + b" ")
