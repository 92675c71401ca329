"""Adapter for OpenAI and OpenAI-compatible chat-completions servers, through the `openai` SDK.

The SDK's own retries are off (`max_retries=0`): the control plane is the only retry loop, so one
`call` makes exactly one HTTP request.

The canonical request is Chat Completions' own shape, so it maps one to one: messages (text or
content parts, tool calls, tool results), `tools`, `tool_choice`, `response_format`, `stop`,
`top_p`, `seed` and `user` go to `chat.completions.create` as they are. `constraints.capabilities`
only routes: `json_mode` there does not set `response_format` (the request's `response_format`
does). The answer's text, tool calls, refusal and finish reason come back as one `Output`.
"""

from __future__ import annotations

import time
from typing import Any, Literal, cast

import openai
from openai import AsyncOpenAI, Omit, omit
from openai.types import CompletionUsage
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionMessageParam,
    ChatCompletionToolChoiceOptionParam,
    ChatCompletionToolUnionParam,
)
from openai.types.chat.completion_create_params import ResponseFormat

from domain.messages import ChatMessage, Dispatch, JobRequest
from providers.base import (
    Completed,
    Failed,
    Outcome,
    check_dispatch,
    describe_with_cause,
    elapsed_ms,
    is_token_count,
    normalized_output,
    parsed_outcome,
    raw_error,
    response_text,
)

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
        messages = [_message(m) for m in request.messages]
        limit = request.max_output_tokens or self._default_max_output_tokens
        tools, tool_choice, response_format = _tool_params(request)
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
                tools=tools,
                tool_choice=tool_choice,
                response_format=response_format,
                stop=request.stop if request.stop is not None else omit,
                top_p=request.top_p if request.top_p is not None else omit,
                seed=request.seed if request.seed is not None else omit,
                user=request.user if request.user is not None else omit,
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


def _message(message: ChatMessage) -> ChatCompletionMessageParam:
    """A canonical message as Chat Completions takes it (the same shape, None fields left out)."""
    body: dict[str, Any] = message.model_dump(mode="json", exclude_none=True)
    if message.tool_calls and message.content == "":
        body["content"] = None  # an assistant turn that only called tools
    return cast("ChatCompletionMessageParam", body)


def _tool_params(
    request: JobRequest,
) -> tuple[
    list[ChatCompletionToolUnionParam] | Omit,
    ChatCompletionToolChoiceOptionParam | Omit,
    ResponseFormat | Omit,
]:
    """`tools`, `tool_choice` and `response_format` of the request, each omitted when unset."""
    tools: list[ChatCompletionToolUnionParam] | Omit = omit
    if request.tools:
        tools = [
            cast("ChatCompletionToolUnionParam", t.model_dump(mode="json", exclude_none=True))
            for t in request.tools
        ]
    choice: ChatCompletionToolChoiceOptionParam | Omit = omit
    if isinstance(request.tool_choice, str):
        choice = request.tool_choice
    elif request.tool_choice is not None:
        choice = cast(
            "ChatCompletionToolChoiceOptionParam", request.tool_choice.model_dump(mode="json")
        )
    response_format: ResponseFormat | Omit = omit
    if request.response_format is not None:
        response_format = cast(
            "ResponseFormat", request.response_format.model_dump(mode="json", exclude_none=True)
        )
    return tools, choice, response_format


def _tool_calls(message: ChatCompletionMessage) -> list[dict[str, Any]] | str:
    """The function tool calls of an answer as canonical dicts, or why they are malformed."""
    calls: list[dict[str, Any]] = []
    raw_calls: object = message.tool_calls
    if raw_calls is None:
        return calls
    if not isinstance(raw_calls, list):
        return "choices[0].message.tool_calls is not a list"
    for index, call in enumerate(raw_calls):
        function: object = getattr(call, "function", None)
        name: object = getattr(function, "name", None)
        arguments: object = getattr(function, "arguments", None)
        if getattr(call, "type", None) != "function" or not isinstance(name, str):
            return f"tool_calls[{index}] is not a function call"
        if not isinstance(arguments, str):
            return f"tool_calls[{index}].function.arguments is not a string"
        call_id: object = getattr(call, "id", None)
        calls.append(
            {
                "id": call_id if isinstance(call_id, str) and call_id else f"call_{index}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    return calls


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
    refusal: object = message.refusal
    if refusal is not None and not isinstance(refusal, str):
        return "choices[0].message.refusal is not a string"
    tool_calls = _tool_calls(message)
    if isinstance(tool_calls, str):
        return tool_calls
    output = normalized_output(
        text=content or "",
        provider_finish_reason=finish_reason,
        tool_calls=tool_calls,
        refusal=refusal,
    )
    if isinstance(output, str):
        return output
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
        output=output,
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
