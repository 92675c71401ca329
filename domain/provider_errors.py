"""Map what a provider said on failure (status, error body, headers) to one canonical error.

Precedence for HTTP errors: wording that names a context-length overflow or a content filter
(on 400/413/422 only); then a specific code or type in the body (OpenAI `error.code`/`error.type`,
Anthropic `error.type`, Gemini `error.status` and ErrorInfo reason, Bedrock's error type); then
the HTTP status; then a generic body type (`invalid_request_error`, `server_error`, ...). A rate
limit or invalid request whose wording says the quota or credit is used up, and that names no
per-minute limit, becomes `quota_exhausted`. Nothing here raises on a garbage body.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from domain.errors import CanonicalError, ErrorCode, canonical_error
from domain.messages import RawProviderError

_BODY_LIMIT = 16_384
_MESSAGE_LIMIT = 1_000

_STATUS: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.AUTHENTICATION,
    402: ErrorCode.QUOTA_EXHAUSTED,
    403: ErrorCode.PERMISSION_DENIED,
    404: ErrorCode.MODEL_NOT_FOUND,
    408: ErrorCode.TIMEOUT,
    413: ErrorCode.REQUEST_TOO_LARGE,
    422: ErrorCode.INVALID_REQUEST,
    429: ErrorCode.RATE_LIMITED,
    500: ErrorCode.PROVIDER_INTERNAL,
    502: ErrorCode.PROVIDER_INTERNAL,
    503: ErrorCode.OVERLOADED,
    504: ErrorCode.TIMEOUT,
    524: ErrorCode.TIMEOUT,
    529: ErrorCode.OVERLOADED,
}

#: Body codes/types specific enough to override the HTTP status.
_SPECIFIC: dict[str, ErrorCode] = {
    # OpenAI error.code / error.type (and OpenAI-compatible servers)
    "context_length_exceeded": ErrorCode.CONTEXT_LENGTH_EXCEEDED,
    "insufficient_quota": ErrorCode.QUOTA_EXHAUSTED,
    "billing_hard_limit_reached": ErrorCode.QUOTA_EXHAUSTED,
    "rate_limit_exceeded": ErrorCode.RATE_LIMITED,
    "content_filter": ErrorCode.CONTENT_FILTERED,
    "content_policy_violation": ErrorCode.CONTENT_FILTERED,
    "model_not_found": ErrorCode.MODEL_NOT_FOUND,
    "invalid_api_key": ErrorCode.AUTHENTICATION,
    "unsupported_country_region_territory": ErrorCode.PERMISSION_DENIED,
    # Anthropic error.type
    "overloaded_error": ErrorCode.OVERLOADED,
    "rate_limit_error": ErrorCode.RATE_LIMITED,
    "authentication_error": ErrorCode.AUTHENTICATION,
    "permission_error": ErrorCode.PERMISSION_DENIED,
    "not_found_error": ErrorCode.MODEL_NOT_FOUND,
    "request_too_large": ErrorCode.REQUEST_TOO_LARGE,
    "billing_error": ErrorCode.QUOTA_EXHAUSTED,
    "timeout_error": ErrorCode.TIMEOUT,
    # Gemini error.status (google.rpc.Code names)
    "RESOURCE_EXHAUSTED": ErrorCode.RATE_LIMITED,
    "UNAVAILABLE": ErrorCode.OVERLOADED,
    "DEADLINE_EXCEEDED": ErrorCode.TIMEOUT,
    "PERMISSION_DENIED": ErrorCode.PERMISSION_DENIED,
    "UNAUTHENTICATED": ErrorCode.AUTHENTICATION,
    "NOT_FOUND": ErrorCode.MODEL_NOT_FOUND,
    # FAILED_PRECONDITION: the account or region is not entitled (e.g. billing not enabled).
    "FAILED_PRECONDITION": ErrorCode.PERMISSION_DENIED,
    "API_KEY_INVALID": ErrorCode.AUTHENTICATION,
    # Bedrock (x-amzn-ErrorType / __type)
    "ThrottlingException": ErrorCode.RATE_LIMITED,
    "ServiceQuotaExceededException": ErrorCode.QUOTA_EXHAUSTED,
    "ServiceUnavailableException": ErrorCode.OVERLOADED,
    "ModelNotReadyException": ErrorCode.OVERLOADED,
    "ModelTimeoutException": ErrorCode.TIMEOUT,
    "AccessDeniedException": ErrorCode.PERMISSION_DENIED,
    "ResourceNotFoundException": ErrorCode.MODEL_NOT_FOUND,
    "UnrecognizedClientException": ErrorCode.AUTHENTICATION,
}

#: Catch-all body types: used only when the HTTP status says nothing.
_GENERIC: dict[str, ErrorCode] = {
    "invalid_request_error": ErrorCode.INVALID_REQUEST,
    "INVALID_ARGUMENT": ErrorCode.INVALID_REQUEST,
    "ValidationException": ErrorCode.INVALID_REQUEST,
    "server_error": ErrorCode.PROVIDER_INTERNAL,
    "api_error": ErrorCode.PROVIDER_INTERNAL,
    "INTERNAL": ErrorCode.PROVIDER_INTERNAL,
    "UNKNOWN": ErrorCode.PROVIDER_INTERNAL,
    "ModelErrorException": ErrorCode.PROVIDER_INTERNAL,
    "InternalServerException": ErrorCode.PROVIDER_INTERNAL,
}

#: Statuses where wording about the input (its length, a filter) decides the code.
_REJECTED_INPUT = frozenset({None, 400, 413, 422})
_CONTEXT_RE = re.compile(
    r"context[_ ]length|context window|maximum context|prompt is too long|input is too long"
    r"|exceeds the maximum number of tokens|too many input tokens",
    re.IGNORECASE,
)
_FILTER_RE = re.compile(
    r"content[_ ]filter|content management policy|content[_ ]policy|safety system",
    re.IGNORECASE,
)
_PER_MINUTE_RE = re.compile(
    r"per ?min(ute)?\b|perminute|\b[rt]pm\b|e\.g\. check quota", re.IGNORECASE
)
_QUOTA_RE = re.compile(
    r"quota|billing|credit balance|insufficient[_ ]balance|per ?day|perday", re.IGNORECASE
)
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Read a retry hint as seconds: delta-seconds, an HTTP-date, or a duration like `1.5s`/`250ms`.

    A date in the past gives 0.0; negative or unreadable values give None.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    if re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+", text):
        factor = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        total = sum(float(n) * factor[unit] for n, unit in _DURATION_RE.findall(text))
        return total if math.isfinite(total) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now if now is not None else datetime.now(UTC)
    if reference.tzinfo is None:
        reference = reference.replace(tzinfo=UTC)
    return max((when - reference).total_seconds(), 0.0)


def retry_after_from_headers(headers: Mapping[str, str]) -> str | None:
    """Pick the retry hint of a response: `retry-after-ms` (as `<n>ms`), else `retry-after`."""
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis is not None and parse_retry_after(millis) is not None:
        return f"{millis.strip()}ms"
    return lowered.get("retry-after")


def raw_http_error(
    status: int, headers: Mapping[str, str], body: bytes | str | None, *, message: str = ""
) -> RawProviderError:
    """Capture a failed HTTP response as a `RawProviderError`, truncating an oversized body."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    amzn = lowered.get("x-amzn-errortype")
    return RawProviderError(
        kind="http",
        http_status=status,
        code=amzn.split(":", 1)[0] if amzn else None,
        message=message,
        body=text[:_BODY_LIMIT] if text is not None else None,
        retry_after=retry_after_from_headers(headers),
    )


def map_provider_error(
    raw: RawProviderError, *, provider_kind: str, now: datetime | None = None
) -> CanonicalError:
    """Map one failed attempt to the canonical error, with its default retry/fallback policy."""
    retry_after = parse_retry_after(raw.retry_after, now=now)
    if raw.kind == "timeout":
        return _error(ErrorCode.TIMEOUT, raw, provider_kind, raw.code, retry_after)
    if raw.kind == "connection":
        return _error(ErrorCode.CONNECTION_ERROR, raw, provider_kind, raw.code, retry_after)
    if raw.kind == "malformed":
        return _error(ErrorCode.MALFORMED_RESPONSE, raw, provider_kind, raw.code, retry_after)
    if raw.kind == "simulated":
        return _error(_simulated(raw.code), raw, provider_kind, raw.code, retry_after)

    body = _Body.parse(raw.body)
    provider_code = body.code or raw.code
    text = " ".join(t for t in (body.message, raw.message, *body.candidates(raw.code)) if t)
    text = " ".join([text, *body.hints])
    status = raw.http_status
    code: ErrorCode | None = None
    if status in _REJECTED_INPUT and _CONTEXT_RE.search(text):
        code = ErrorCode.CONTEXT_LENGTH_EXCEEDED
    elif status in _REJECTED_INPUT and _FILTER_RE.search(text):
        code = ErrorCode.CONTENT_FILTERED
    if code is None:
        code = next((_SPECIFIC[c] for c in body.candidates(raw.code) if c in _SPECIFIC), None)
    if code is None and status is not None:
        code = _STATUS.get(status)
    if code is None:
        code = next((_GENERIC[c] for c in body.candidates(raw.code) if c in _GENERIC), None)
    if code is None:
        code = ErrorCode.INVALID_REQUEST if status and 400 <= status < 500 else None
    code = code or ErrorCode.PROVIDER_INTERNAL
    if code in {ErrorCode.RATE_LIMITED, ErrorCode.INVALID_REQUEST} and _quota_used_up(text):
        code = ErrorCode.QUOTA_EXHAUSTED
    if retry_after is None:
        retry_after = parse_retry_after(body.retry_delay, now=now)
    message = body.message or raw.message
    return _error(code, raw, provider_kind, provider_code, retry_after, message=message)


def _simulated(code: str | None) -> ErrorCode:
    """Take a simulated outcome's code when it is canonical, else call it provider_internal."""
    try:
        return ErrorCode(code or "")
    except ValueError:
        return ErrorCode.PROVIDER_INTERNAL


def _quota_used_up(text: str) -> bool:
    """Tell a used-up quota or credit from a per-minute rate limit by the provider's wording."""
    return bool(_QUOTA_RE.search(text)) and not _PER_MINUTE_RE.search(text)


def _error(
    code: ErrorCode,
    raw: RawProviderError,
    provider_kind: str,
    provider_code: str | None,
    retry_after: float | None,
    *,
    message: str | None = None,
) -> CanonicalError:
    """Build the canonical error with a bounded, never-empty message."""
    text = message or raw.message
    if not text:
        status = f" HTTP {raw.http_status}" if raw.http_status is not None else ""
        text = f"{provider_kind}{status} {raw.kind} error"
    return canonical_error(
        code,
        text[:_MESSAGE_LIMIT],
        provider_code=provider_code,
        http_status=raw.http_status,
        retry_after_s=retry_after,
    )


class _Body:
    """The parts of an error body that matter, read defensively from any JSON (or none)."""

    __slots__ = ("code", "codes", "hints", "message", "retry_delay")

    def __init__(self) -> None:
        self.code: str | None = None  # the provider's own code, reported as provider_code
        self.codes: list[str] = []  # every code or type found, most specific first
        self.hints: list[str] = []  # extra wording (quota ids) used only for classification
        self.message: str = ""
        self.retry_delay: str | None = None

    def candidates(self, raw_code: str | None) -> list[str]:
        """List the codes to look up, most specific first."""
        return [*self.codes, raw_code] if raw_code else self.codes

    @classmethod
    def parse(cls, body: str | None) -> _Body:
        """Read OpenAI, Anthropic, Gemini, Bedrock, Mistral-style or plain-text error bodies."""
        result = cls()
        if not body:
            return result
        try:
            data: Any = json.loads(body)
        except (ValueError, RecursionError):
            data = None
        if isinstance(data, list) and data and isinstance(data[0], Mapping):
            data = data[0]  # Gemini over REST sometimes wraps the error in a list
        if not isinstance(data, Mapping):
            result.message = body.strip()[:_MESSAGE_LIMIT]
            return result
        error = data.get("error")
        if isinstance(error, str):  # {"error": "..."} from OpenAI-compatible servers
            result.message = error
            return result
        node: Mapping[str, Any] = error if isinstance(error, Mapping) else data
        result.message = _text(node.get("message")) or _text(node.get("detail"))
        status = node.get("status")
        if isinstance(status, str):  # Gemini: {"error": {"code": 429, "status": "..."}}
            result._read_google_details(node.get("details"))
            result.codes.append(status)
            result.code = status
            return result
        # OpenAI/Mistral: code then type; Anthropic: type; Bedrock: "__type" (a shape id).
        code = _text(node.get("code"))
        kind = _text(node.get("type"))
        amzn = _text(node.get("__type")).rsplit("#", 1)[-1]
        result.codes = [c for c in (code, kind, amzn) if c and c != "error"]
        result.code = result.codes[0] if result.codes else None
        return result

    def _read_google_details(self, details: Any) -> None:
        """Pick ErrorInfo reasons, QuotaFailure ids and the RetryInfo delay out of rpc details."""
        if not isinstance(details, list):
            return
        for item in details:
            if not isinstance(item, Mapping):
                continue
            if isinstance(reason := item.get("reason"), str):
                self.codes.append(reason)
            if isinstance(delay := item.get("retryDelay"), str):
                self.retry_delay = delay
            violations = item.get("violations")
            for violation in violations if isinstance(violations, list) else ():
                if isinstance(violation, Mapping) and isinstance(
                    q := violation.get("quotaId"), str
                ):
                    self.hints.append(q)


def _text(value: Any) -> str:
    """Return a string field, or "" when it is missing or not a string."""
    return value if isinstance(value, str) else ""
