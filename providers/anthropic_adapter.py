"""Adapter for Anthropic's Messages API (`/v1/messages`), through the `anthropic` SDK.

The SDK's own retries are off (`max_retries=0`): the control plane is the only retry loop, so one
`call` makes exactly one HTTP request.
"""

from __future__ import annotations

import time
from typing import Any, cast

import anthropic
from anthropic import AsyncAnthropic, omit
from anthropic.types import Message, MessageParam, Usage

from domain.messages import Dispatch, Output
from providers.base import (
    Completed,
    Failed,
    Outcome,
    check_dispatch,
    describe_with_cause,
    elapsed_ms,
    is_token_count,
    parsed_outcome,
    raw_error,
    response_text,
)

#: Anthropic accepts temperatures in [0, 1]; canonical requests allow up to 2.
MAX_TEMPERATURE = 1.0


class AnthropicProvider:
    """Call Anthropic's `/v1/messages` once per attempt."""

    kind = "anthropic"

    def __init__(
        self,
        name: str,
        api_key: str,
        base_url: str | None,
        timeout_s: float,
        default_max_output_tokens: int,
        *,
        send_temperature: bool = False,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if default_max_output_tokens < 1:
            raise ValueError(
                f"default_max_output_tokens must be >= 1, got {default_max_output_tokens}"
            )
        self.name = name
        self._default_max_output_tokens = default_max_output_tokens
        self._send_temperature = send_temperature
        self._closed = False
        self._client = AsyncAnthropic(
            api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_s
        )

    async def call(self, dispatch: Dispatch) -> Outcome:
        """Send one Messages request and map whatever comes back to an outcome."""
        check_dispatch(self.name, self._closed, dispatch)
        request = dispatch.request
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        # Anthropic has no "tool" role outside tool_result blocks: pass tool output as user text.
        messages = [
            cast(
                "MessageParam",
                {"role": "assistant" if m.role == "assistant" else "user", "content": m.content},
            )
            for m in request.messages
            if m.role != "system"
        ]
        # SDK 1.x+ dropped `temperature` (newer models reject it with a 400); send it only when
        # this provider's models still accept it, through the request body.
        extra_body: dict[str, Any] = {}
        if self._send_temperature and request.temperature is not None:
            extra_body["temperature"] = min(request.temperature, MAX_TEMPERATURE)
        started = time.monotonic()
        try:
            raw = await self._client.messages.with_raw_response.create(
                model=dispatch.model,
                messages=messages,
                max_tokens=request.max_output_tokens or self._default_max_output_tokens,
                system=system or omit,
                extra_body=extra_body or None,
            )
        except anthropic.APIStatusError as exc:
            return _status_failure(exc, elapsed_ms(started))
        except anthropic.APITimeoutError as exc:
            return Failed(raw_error("timeout", exc.message), elapsed_ms(started))
        except anthropic.APIConnectionError as exc:
            return Failed(raw_error("connection", describe_with_cause(exc)), elapsed_ms(started))
        except anthropic.APIResponseValidationError as exc:
            return Failed(
                raw_error(
                    "malformed",
                    exc.message,
                    http_status=exc.status_code,
                    body=response_text(exc.response),
                ),
                elapsed_ms(started),
            )
        except anthropic.APIError as exc:
            return Failed(raw_error("malformed", exc.message), elapsed_ms(started))
        latency_ms = elapsed_ms(started)

        body_text = response_text(raw.http_response)
        status = raw.http_response.status_code
        parsed: object = None
        parse_error: Exception | None = None
        try:
            parsed = await raw.parse()
        except (anthropic.APIError, ValueError) as exc:
            parse_error = exc
        return parsed_outcome(
            parsed,
            parse_error,
            status=status,
            body_text=body_text,
            latency_ms=latency_ms,
            to_completed=lambda p: _completed(p, latency_ms, fallback_model=dispatch.model),
        )

    async def close(self) -> None:
        """Close the SDK's HTTP connections; the adapter must not be called afterwards."""
        self._closed = True
        await self._client.close()


def _completed(parsed: object, latency_ms: int, *, fallback_model: str) -> Completed | str:
    """Turn a parsed 200 answer into `Completed`, or say why it is malformed."""
    if not isinstance(parsed, Message):
        return f"response is not a message object but {type(parsed).__name__}"
    content: object = parsed.content
    if not isinstance(content, list):
        return "response has no content list"
    texts: list[str] = []
    for block in content:
        if getattr(block, "type", None) != "text":
            continue  # thinking, tool_use and other blocks carry no answer text
        text: object = getattr(block, "text", None)
        if not isinstance(text, str):
            return "a text block has no string text"
        texts.append(text)
    stop_reason: object = parsed.stop_reason
    if stop_reason is not None and not isinstance(stop_reason, str):
        return "stop_reason is not a string"
    usage: object = parsed.usage
    raw_usage: dict[str, Any] | None = None
    if usage is not None:
        if not isinstance(usage, Usage) or not is_token_count(
            usage.input_tokens, usage.output_tokens
        ):
            return "usage lacks integer input_tokens and output_tokens"
        raw_usage = usage.model_dump(mode="json", warnings=False)
    model: object = parsed.model
    return Completed(
        output=Output(text="".join(texts), finish_reason=stop_reason),
        raw_usage=raw_usage,
        usage_shape="anthropic",
        latency_ms=latency_ms,
        model=model if isinstance(model, str) and model else fallback_model,
    )


def _status_failure(exc: anthropic.APIStatusError, latency_ms: int) -> Failed:
    """Map a 4xx/5xx answer (529 is `overloaded_error`), keeping body and Retry-After verbatim."""
    error_type: object = exc.type
    code = error_type if isinstance(error_type, str) and error_type else None
    api_message: object = exc.api_message
    message = f"Error code: {exc.status_code}"
    if isinstance(api_message, str) and api_message:
        message += f" - {api_message}"
    return Failed(
        raw_error(
            "http",
            message,
            http_status=exc.status_code,
            code=code,
            body=response_text(exc.response),
            retry_after=exc.response.headers.get("retry-after"),
        ),
        latency_ms,
    )
