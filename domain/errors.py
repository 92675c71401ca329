"""Canonical error codes, their retry and fallback policy, and the error every provider maps to."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    CONTENT_FILTERED = "content_filtered"
    AUTHENTICATION = "authentication"
    PERMISSION_DENIED = "permission_denied"
    MODEL_NOT_FOUND = "model_not_found"
    REQUEST_TOO_LARGE = "request_too_large"
    QUOTA_EXHAUSTED = "quota_exhausted"
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    OVERLOADED = "overloaded"
    PROVIDER_INTERNAL = "provider_internal"
    CONNECTION_ERROR = "connection_error"
    MALFORMED_RESPONSE = "malformed_response"
    NO_ELIGIBLE_TARGET = "no_eligible_target"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    DISPATCH_FAILED = "dispatch_failed"


@dataclass(frozen=True, slots=True)
class ErrorPolicy:
    """Default handling of a code: retry the same target, or move on to the next one."""

    retryable: bool
    fallback: bool


ERROR_POLICY: dict[ErrorCode, ErrorPolicy] = {
    # The request itself is wrong: no provider will do better.
    ErrorCode.INVALID_REQUEST: ErrorPolicy(retryable=False, fallback=False),
    ErrorCode.REQUEST_TOO_LARGE: ErrorPolicy(retryable=False, fallback=False),
    # Another model may have a bigger window or a different filter.
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: ErrorPolicy(retryable=False, fallback=True),
    ErrorCode.CONTENT_FILTERED: ErrorPolicy(retryable=False, fallback=True),
    # Our credentials or entitlement at that provider: retrying it cannot help.
    ErrorCode.AUTHENTICATION: ErrorPolicy(retryable=False, fallback=True),
    ErrorCode.PERMISSION_DENIED: ErrorPolicy(retryable=False, fallback=True),
    ErrorCode.MODEL_NOT_FOUND: ErrorPolicy(retryable=False, fallback=True),
    ErrorCode.QUOTA_EXHAUSTED: ErrorPolicy(retryable=False, fallback=True),
    # Transient at that provider.
    ErrorCode.RATE_LIMITED: ErrorPolicy(retryable=True, fallback=True),
    ErrorCode.TIMEOUT: ErrorPolicy(retryable=True, fallback=True),
    ErrorCode.OVERLOADED: ErrorPolicy(retryable=True, fallback=True),
    ErrorCode.PROVIDER_INTERNAL: ErrorPolicy(retryable=True, fallback=True),
    ErrorCode.CONNECTION_ERROR: ErrorPolicy(retryable=True, fallback=True),
    ErrorCode.MALFORMED_RESPONSE: ErrorPolicy(retryable=True, fallback=True),
    # Decided by the control plane itself: terminal.
    ErrorCode.NO_ELIGIBLE_TARGET: ErrorPolicy(retryable=False, fallback=False),
    ErrorCode.DEADLINE_EXCEEDED: ErrorPolicy(retryable=False, fallback=False),
    ErrorCode.CANCELLED: ErrorPolicy(retryable=False, fallback=False),
    # The control plane could not apply a command to the job (a bug, or an injected fault).
    ErrorCode.INTERNAL: ErrorPolicy(retryable=False, fallback=False),
    # The attempt's dispatch could not be sent (no dispatch topic for its provider): the same
    # target would fail the same way, another provider may not.
    ErrorCode.DISPATCH_FAILED: ErrorPolicy(retryable=False, fallback=True),
}


class CanonicalError(BaseModel):
    """The one error shape clients see, whatever the provider said."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    code: ErrorCode
    message: str
    retryable: bool
    fallback: bool
    provider_code: str | None = None
    http_status: int | None = None
    retry_after_s: float | None = None


def canonical_error(
    code: ErrorCode,
    message: str,
    *,
    provider_code: str | None = None,
    http_status: int | None = None,
    retry_after_s: float | None = None,
) -> CanonicalError:
    """Build a canonical error carrying the default policy of its code."""
    policy = ERROR_POLICY[code]
    return CanonicalError(
        code=code,
        message=message,
        retryable=policy.retryable,
        fallback=policy.fallback,
        provider_code=provider_code,
        http_status=http_status,
        retry_after_s=retry_after_s,
    )
