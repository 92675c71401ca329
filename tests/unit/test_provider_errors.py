"""Mapping of real-world provider failures to canonical errors, and retry hints."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import ERROR_POLICY, ErrorCode
from domain.messages import RawProviderError
from domain.provider_errors import (
    map_provider_error,
    parse_retry_after,
    raw_http_error,
    retry_after_from_headers,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "provider_errors"
FIXTURE_FILES = sorted(FIXTURES.glob("*.json"))
#: The clock every fixture is evaluated at (HTTP-date retry hints are relative to it).
NOW = datetime(2026, 10, 21, 7, 28, 0, tzinfo=UTC)


def _raw_from_fixture(case: dict[str, Any]) -> RawProviderError:
    """Build what a provider worker would capture for the fixture's response."""
    if case["kind"] != "http":
        return RawProviderError(
            kind=case["kind"], code=case.get("code"), message=case.get("message", "")
        )
    body = case["body"]
    text = body if body is None or isinstance(body, str) else json.dumps(body)
    return raw_http_error(case["status"], case["headers"], text)


def test_there_are_fixtures_for_every_provider_kind() -> None:
    kinds = {json.loads(p.read_text())["provider_kind"] for p in FIXTURE_FILES}
    assert {"openai", "anthropic", "gemini", "bedrock", "simulated"} <= kinds


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=[p.stem for p in FIXTURE_FILES])
def test_fixture_maps_to_expected_code(path: Path) -> None:
    case = json.loads(path.read_text())
    expected = case["expected"]
    error = map_provider_error(
        _raw_from_fixture(case), provider_kind=case["provider_kind"], now=NOW
    )
    assert error.code == ErrorCode(expected["code"])
    policy = ERROR_POLICY[error.code]
    assert (error.retryable, error.fallback) == (policy.retryable, policy.fallback)
    if "provider_code" in expected:
        assert error.provider_code == expected["provider_code"]
    if "retry_after_s" in expected:
        assert error.retry_after_s == pytest.approx(expected["retry_after_s"])
    if case["kind"] == "http":
        assert error.http_status == case["status"]
    assert 0 < len(error.message) <= 1000


def test_gemini_quota_wording_per_day_is_quota_but_per_minute_is_rate_limit() -> None:
    def gemini(quota_id: str) -> RawProviderError:
        body = {
            "error": {
                "code": 429,
                "message": "You exceeded your current quota.",
                "status": "RESOURCE_EXHAUSTED",
                "details": [{"violations": [{"quotaId": quota_id}]}],
            }
        }
        return raw_http_error(429, {}, json.dumps(body))

    per_day = map_provider_error(gemini("RequestsPerDayPerProject"), provider_kind="gemini")
    per_minute = map_provider_error(gemini("RequestsPerMinutePerProject"), provider_kind="gemini")
    assert per_day.code is ErrorCode.QUOTA_EXHAUSTED
    assert per_minute.code is ErrorCode.RATE_LIMITED


def test_openai_429_with_quota_wording_is_quota_exhausted() -> None:
    body = {"error": {"message": "You exceeded your current quota", "type": "requests"}}
    error = map_provider_error(raw_http_error(429, {}, json.dumps(body)), provider_kind="openai")
    assert error.code is ErrorCode.QUOTA_EXHAUSTED


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, ErrorCode.INVALID_REQUEST),
        (401, ErrorCode.AUTHENTICATION),
        (403, ErrorCode.PERMISSION_DENIED),
        (404, ErrorCode.MODEL_NOT_FOUND),
        (408, ErrorCode.TIMEOUT),
        (413, ErrorCode.REQUEST_TOO_LARGE),
        (418, ErrorCode.INVALID_REQUEST),
        (429, ErrorCode.RATE_LIMITED),
        (500, ErrorCode.PROVIDER_INTERNAL),
        (502, ErrorCode.PROVIDER_INTERNAL),
        (503, ErrorCode.OVERLOADED),
        (504, ErrorCode.TIMEOUT),
        (529, ErrorCode.OVERLOADED),
        (599, ErrorCode.PROVIDER_INTERNAL),
    ],
)
def test_bare_status_mapping(status: int, code: ErrorCode) -> None:
    error = map_provider_error(RawProviderError(kind="http", http_status=status), provider_kind="x")
    assert error.code is code
    assert error.http_status == status
    assert error.message


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("timeout", ErrorCode.TIMEOUT),
        ("connection", ErrorCode.CONNECTION_ERROR),
        ("malformed", ErrorCode.MALFORMED_RESPONSE),
    ],
)
def test_transport_kinds(kind: str, code: ErrorCode) -> None:
    raw = RawProviderError.model_validate({"kind": kind, "message": "boom"})
    assert map_provider_error(raw, provider_kind="openai").code is code


@pytest.mark.parametrize("code", list(ErrorCode))
def test_simulated_canonical_codes_pass_through(code: ErrorCode) -> None:
    raw = RawProviderError(kind="simulated", code=code.value)
    assert map_provider_error(raw, provider_kind="simulated").code is code


@pytest.mark.parametrize("code", [None, "hang", "Overloaded", ""])
def test_simulated_unknown_codes_are_provider_internal(code: str | None) -> None:
    raw = RawProviderError(kind="simulated", code=code)
    assert map_provider_error(raw, provider_kind="simulated").code is ErrorCode.PROVIDER_INTERNAL


def test_retry_after_header_is_carried() -> None:
    raw = RawProviderError(kind="http", http_status=429, retry_after="12")
    assert map_provider_error(raw, provider_kind="anthropic").retry_after_s == 12.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("250ms", 0.25),
        ("2s", 2.0),
        ("6m0s", 360.0),
        ("1h", 3600.0),
        ("Wed, 21 Oct 2026 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2026 07:27:00 GMT", 0.0),
        (None, None),
        ("", None),
        ("-1", None),
        ("-0.5", None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
        ("1e400", None),
        ("1" * 400 + "s", None),
        ("Wed, 99 Foo 2026 99:99:99 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


def test_parse_retry_after_date_uses_the_clock_by_default() -> None:
    future = (datetime.now(UTC) + timedelta(hours=1)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    seconds = parse_retry_after(future)
    assert seconds is not None
    assert 3500 < seconds <= 3600


def test_retry_after_from_headers_prefers_milliseconds() -> None:
    assert retry_after_from_headers({"Retry-After-Ms": "1500", "Retry-After": "2"}) == "1500ms"
    assert retry_after_from_headers({"Retry-After": "2"}) == "2"
    assert retry_after_from_headers({"retry-after-ms": "junk", "retry-after": "3"}) == "3"
    assert retry_after_from_headers({}) is None


def test_raw_http_error_truncates_and_decodes_the_body() -> None:
    raw = raw_http_error(500, {}, b"\xff" + b"x" * 20_000)
    assert raw.body is not None
    assert len(raw.body) == 16_384
    assert map_provider_error(raw, provider_kind="openai").code is ErrorCode.PROVIDER_INTERNAL


def test_deeply_nested_json_does_not_crash() -> None:
    raw = raw_http_error(400, {}, "[" * 8000 + "]" * 8000)
    assert map_provider_error(raw, provider_kind="openai").code is ErrorCode.INVALID_REQUEST


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["error", "type", "code", "message", "status", "details", "reason", "retryDelay"]
            )
            | st.text(max_size=5),
            children,
            max_size=5,
        )
    ),
    max_leaves=25,
)


@given(
    status=st.none() | st.integers(min_value=100, max_value=999),
    body=st.none() | st.text(max_size=300) | _json.map(json.dumps),
    retry_after=st.none() | st.text(max_size=30),
    code=st.none() | st.text(max_size=20),
    kind=st.sampled_from(["http", "timeout", "connection", "malformed", "simulated"]),
)
def test_any_failure_maps_without_raising(
    status: int | None, body: str | None, retry_after: str | None, code: str | None, kind: str
) -> None:
    raw = RawProviderError.model_validate(
        {
            "kind": kind,
            "http_status": status,
            "code": code,
            "body": body,
            "retry_after": retry_after,
        }
    )
    error = map_provider_error(raw, provider_kind="any", now=NOW)
    assert error.code in ErrorCode
    assert error.message
    assert error.retry_after_s is None or error.retry_after_s >= 0
