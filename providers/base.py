"""What one provider attempt can end in, and the contract every provider adapter fulfils.

Adapters never raise for provider problems: HTTP errors, timeouts, refused connections and
unparseable answers all come back as `Failed` carrying a `RawProviderError`. They raise only for
programmer errors (a dispatch meant for another provider, a call after `close`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import ValidationError

from domain.chat import ToolCall, normalize_finish_reason
from domain.messages import Dispatch, Output, RawProviderError

ErrorKind = Literal["http", "timeout", "connection", "malformed", "simulated"]

#: Most bytes of a provider's response body kept in a `RawProviderError`.
MAX_BODY_BYTES = 16_384
#: Most bytes of a provider's error message kept in a `RawProviderError`.
MAX_MESSAGE_BYTES = 2_048


@dataclass(frozen=True, slots=True)
class Completed:
    """The provider answered; `repeat` > 1 asks the worker to publish the completion again."""

    output: Output
    raw_usage: dict[str, Any] | None
    usage_shape: str | None
    latency_ms: int
    model: str
    repeat: int = 1

    def __post_init__(self) -> None:
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms}")
        if self.repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {self.repeat}")


@dataclass(frozen=True, slots=True)
class Failed:
    """The attempt failed; `error` is what the provider said, before canonical mapping."""

    error: RawProviderError
    latency_ms: int

    def __post_init__(self) -> None:
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms}")


@dataclass(frozen=True, slots=True)
class NoAnswer:
    """The provider never answered (a simulated hang): publish nothing, let the timeout fire."""


Outcome = Completed | Failed | NoAnswer


@runtime_checkable
class ProviderAdapter(Protocol):
    """Call one provider for one attempt; a worker owns one adapter per provider name."""

    name: str
    kind: str

    async def call(self, dispatch: Dispatch) -> Outcome:
        """Run one attempt and report how it ended, never raising for provider problems."""
        ...

    async def close(self) -> None:
        """Release connections; the adapter must not be called afterwards."""
        ...


def truncate_utf8(text: str, limit: int) -> str:
    """Cut `text` to at most `limit` UTF-8 bytes without splitting a character."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", errors="ignore")


def elapsed_ms(started: float) -> int:
    """Return whole milliseconds since `started`, a `time.monotonic()` reading."""
    return max(0, int((time.monotonic() - started) * 1000))


def raw_error(
    kind: ErrorKind,
    message: str,
    *,
    http_status: int | None = None,
    code: str | None = None,
    body: str | None = None,
    retry_after: str | None = None,
) -> RawProviderError:
    """Build a `RawProviderError` with message and body cut to their size limits."""
    return RawProviderError(
        kind=kind,
        http_status=http_status,
        code=code,
        message=truncate_utf8(message, MAX_MESSAGE_BYTES),
        body=truncate_utf8(body, MAX_BODY_BYTES) if body is not None else None,
        retry_after=retry_after,
    )


def check_dispatch(adapter_name: str, closed: bool, dispatch: Dispatch) -> None:
    """Raise if the adapter is closed or the dispatch is addressed to another provider."""
    if closed:
        raise RuntimeError(f"provider adapter {adapter_name!r} is closed")
    if dispatch.provider != adapter_name:
        raise ValueError(
            f"dispatch {dispatch.attempt_id} is for provider {dispatch.provider!r}, "
            f"not {adapter_name!r}"
        )


class HttpResponse(Protocol):
    """The part of an SDK's (httpx) response used to report a provider's body."""

    @property
    def is_closed(self) -> bool: ...

    @property
    def is_stream_consumed(self) -> bool: ...

    @property
    def text(self) -> str: ...


def response_text(response: HttpResponse) -> str | None:
    """Return the body text of a response the SDK has read, else None."""
    if response.is_closed and not response.is_stream_consumed:
        return None
    return response.text


def describe_with_cause(exc: BaseException) -> str:
    """Describe an SDK error together with the low-level exception it wrapped."""
    cause = exc.__cause__
    return f"{exc} ({type(cause).__name__}: {cause})" if cause is not None else str(exc)


def is_token_count(*values: object) -> bool:
    """Tell whether every value is a non-negative int (and not a bool)."""
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def normalized_output(
    *,
    text: str,
    provider_finish_reason: str | None,
    tool_calls: list[dict[str, Any]] | None = None,
    refusal: str | None = None,
) -> Output | str:
    """Build the one answer shape of every provider, or say why the answer cannot be one.

    `finish_reason` is the canonical one of the provider's reason (kept as
    `provider_finish_reason`); a refusal always finishes as "content_filter", tool calls as
    "tool_calls" when the provider gave no reason.
    """
    finish = normalize_finish_reason(provider_finish_reason)
    if refusal is not None:
        finish = "content_filter"
    elif finish is None and tool_calls and provider_finish_reason is None:
        finish = "tool_calls"
    try:
        return Output(
            text=text,
            finish_reason=finish,
            provider_finish_reason=truncate_utf8(provider_finish_reason, 64)
            if provider_finish_reason is not None
            else None,
            tool_calls=[ToolCall.model_validate(call) for call in tool_calls or ()],
            refusal=refusal,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "output"
        return f"answer does not fit the canonical output: {where}: {first['msg']}"


def parsed_outcome(
    parsed: object,
    parse_error: Exception | None,
    *,
    status: int,
    body_text: str | None,
    latency_ms: int,
    to_completed: Callable[[object], Completed | str],
) -> Outcome:
    """Turn a parsed (or unparseable) 200 answer into Completed, or a malformed Failed."""
    if parse_error is not None:
        reason = f"unparseable response body: {parse_error}"
        return Failed(
            raw_error("malformed", reason, http_status=status, body=body_text), latency_ms
        )
    result = to_completed(parsed)
    if isinstance(result, str):
        return Failed(
            raw_error("malformed", result, http_status=status, body=body_text), latency_ms
        )
    return result
