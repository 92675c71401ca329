"""Adapter for OpenAI and OpenAI-compatible chat-completions servers, through the `openai` SDK.

The SDK's own retries are off (`max_retries=0`): the control plane is the only retry loop, so one
`call` makes exactly one HTTP request.
"""

from __future__ import annotations

import time
from typing import Any, Literal, cast

import openai
from openai import AsyncOpenAI, omit
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionMessage, ChatCompletionMessageParam

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

#: Capability that asks for `response_format={"type": "json_object"}`.
JSON_MODE = "json_mode"

MaxTokensParam = Literal["max_tokens", "max_completion_tokens"]


class OpenAICompatibleProvider:
    """Call `/chat/completions` of an OpenAI-compatible server once per attempt."""

    kind = "openai_compatible"

    def __init__(
        self,
        name: str,
        base_url: str,
        api_key: str,
        timeout_s: float,
        default_max_output_tokens: int | None = None,
        *,
        max_tokens_param: MaxTokensParam = "max_tokens",
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if default_max_output_tokens is not None and default_max_output_tokens < 1:
            raise ValueError(
                f"default_max_output_tokens must be >= 1, got {default_max_output_tokens}"
            )
        self.name = name
        self._default_max_output_tokens = default_max_output_tokens
        self._max_tokens_param = max_tokens_param
        self._closed = False
        self._client = AsyncOpenAI(
            base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s
        )

    async def call(self, dispatch: Dispatch) -> Outcome:
        """Send one chat completion request and map whatever comes back to an outcome."""
        check_dispatch(self.name, self._closed, dispatch)
        request = dispatch.request
        messages = [
            cast("ChatCompletionMessageParam", {"role": m.role, "content": m.content})
            for m in request.messages
        ]
        limit = request.max_output_tokens or self._default_max_output_tokens
        json_mode = JSON_MODE in request.constraints.capabilities
        started = time.monotonic()
        try:
            raw = await self._client.chat.completions.with_raw_response.create(
                model=dispatch.model,
                messages=messages,
                max_tokens=limit if limit and self._max_tokens_param == "max_tokens" else omit,
                max_completion_tokens=(
                    limit if limit and self._max_tokens_param == "max_completion_tokens" else omit
                ),
                temperature=request.temperature if request.temperature is not None else omit,
                response_format={"type": "json_object"} if json_mode else omit,
            )
        except openai.APIStatusError as exc:
            return _status_failure(exc, elapsed_ms(started))
        except openai.APITimeoutError as exc:
            return Failed(raw_error("timeout", exc.message), elapsed_ms(started))
        except openai.APIConnectionError as exc:
            return Failed(raw_error("connection", describe_with_cause(exc)), elapsed_ms(started))
        except openai.APIResponseValidationError as exc:
            return Failed(
                raw_error(
                    "malformed",
                    exc.message,
                    http_status=exc.status_code,
                    body=response_text(exc.response),
                ),
                elapsed_ms(started),
            )
        except openai.APIError as exc:
            return Failed(raw_error("malformed", exc.message), elapsed_ms(started))
        latency_ms = elapsed_ms(started)

        body_text = response_text(raw.http_response)
        status = raw.http_response.status_code
        parsed: object = None
        parse_error: Exception | None = None
        try:
            parsed = raw.parse()
        except (openai.APIError, ValueError) as exc:
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
    if not isinstance(parsed, ChatCompletion):
        return f"response is not a chat completion object but {type(parsed).__name__}"
    choices: object = parsed.choices
    if not isinstance(choices, list) or not choices:
        return "response has no choices"
    message: object = getattr(choices[0], "message", None)
    if not isinstance(message, ChatCompletionMessage):
        return "choices[0] has no message"
    content: object = message.content
    if content is not None and not isinstance(content, str):
        return "choices[0].message.content is not a string"
    finish_reason: object = getattr(choices[0], "finish_reason", None)
    if finish_reason is not None and not isinstance(finish_reason, str):
        return "choices[0].finish_reason is not a string"
    usage: object = parsed.usage
    raw_usage: dict[str, Any] | None = None
    if usage is not None:
        if not isinstance(usage, CompletionUsage) or not is_token_count(
            usage.prompt_tokens, usage.completion_tokens
        ):
            return "usage lacks integer prompt_tokens and completion_tokens"
        raw_usage = usage.model_dump(mode="json", warnings=False)
    model: object = parsed.model
    return Completed(
        output=Output(text=content or "", finish_reason=finish_reason),
        raw_usage=raw_usage,
        usage_shape="openai_chat",
        latency_ms=latency_ms,
        model=model if isinstance(model, str) and model else fallback_model,
    )


def _status_failure(exc: openai.APIStatusError, latency_ms: int) -> Failed:
    """Map a 4xx/5xx answer, keeping status, body, provider code and Retry-After verbatim."""
    code = next((c for c in (exc.code, exc.type) if isinstance(c, str) and c), None)
    return Failed(
        raw_error(
            "http",
            exc.message,
            http_status=exc.status_code,
            code=code,
            body=response_text(exc.response),
            retry_after=exc.response.headers.get("retry-after"),
        ),
        latency_ms,
    )
