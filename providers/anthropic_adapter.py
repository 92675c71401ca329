"""Adapter for Anthropic's Messages API (`/v1/messages`), through the `anthropic` SDK.

The SDK's own retries are off (`max_retries=0`): the control plane is the only retry loop, so one
`call` makes exactly one HTTP request.

How the canonical (Chat Completions shaped) request maps to `messages.create`:

- system messages are joined into `system`; a `tool` message becomes a `tool_result` block of a
  user turn (consecutive results share one turn); an assistant's `tool_calls` become `tool_use`
  blocks (arguments parsed back into `input`); a tool message without `tool_call_id` goes as user
  text.
- image parts become `image` blocks: an https URL as a `url` source, a data URL as `base64`
  (`detail` has no equivalent and is dropped).
- `tools` become `{name, description, input_schema}`; `tool_choice` "auto" → `{"type": "auto"}`,
  "required" → `{"type": "any"}`, "none" → `{"type": "none"}`, a function → `{"type": "tool",
  "name": ...}`.
- `response_format` `json_schema` → `output_config.format` (Anthropic's structured outputs);
  `json_object` has no native form: an instruction to answer with one JSON object is appended to
  `system`. Routing sends either only to models with the `json_mode` capability, which the shipped
  catalogue does not give Anthropic's models.
- `stop` → `stop_sequences`, `user` → `metadata.user_id`; `temperature` and `top_p` only when the
  provider's models accept sampling parameters (`send_temperature`); `seed` has no equivalent and
  is dropped.

The answer: text blocks joined into `text`, `tool_use` blocks into `tool_calls` (input as JSON
text), `stop_reason` normalized (end_turn and stop_sequence → stop, max_tokens → length, tool_use
→ tool_calls, refusal → content_filter with the answer's text as `refusal`).
"""

from __future__ import annotations

import time
from typing import Any, cast

import anthropic
import orjson
from anthropic import AsyncAnthropic, Omit, omit
from anthropic.types import (
    Message,
    MessageParam,
    MetadataParam,
    OutputConfigParam,
    ToolChoiceParam,
    ToolParam,
    Usage,
)

from domain.chat import (
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    TextPart,
    parse_data_url,
)
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

#: Anthropic accepts temperatures in [0, 1]; canonical requests allow up to 2.
MAX_TEMPERATURE = 1.0
#: Appended to `system` for `response_format: json_object`, which Anthropic has no mode for.
JSON_OBJECT_INSTRUCTION = "Answer with a single JSON object and nothing else."
#: The `refusal` of a refused answer that has no text.
REFUSED = "the provider refused to answer (stop_reason: refusal)"


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
        system_parts = [m.text() for m in request.messages if m.role == "system"]
        if isinstance(request.response_format, ResponseFormatJsonObject):
            system_parts.append(JSON_OBJECT_INSTRUCTION)
        system = "\n\n".join(system_parts)
        messages = _messages(request)
        # SDK 1.x+ dropped `temperature` and `top_p` (newer models reject them with a 400); send
        # them only when this provider's models still accept them, through the request body.
        extra_body: dict[str, Any] = {}
        if self._send_temperature and request.temperature is not None:
            extra_body["temperature"] = min(request.temperature, MAX_TEMPERATURE)
        if self._send_temperature and request.top_p is not None:
            extra_body["top_p"] = request.top_p
        stop = [request.stop] if isinstance(request.stop, str) else request.stop
        started = time.monotonic()
        try:
            raw = await self._client.messages.with_raw_response.create(
                model=dispatch.model,
                messages=messages,
                max_tokens=request.max_output_tokens or self._default_max_output_tokens,
                system=system or omit,
                tools=_tools(request),
                tool_choice=_tool_choice(request),
                output_config=_output_config(request),
                stop_sequences=stop if stop is not None else omit,
                metadata=(
                    MetadataParam(user_id=request.user) if request.user is not None else omit
                ),
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


def _content(message: ChatMessage) -> str | list[dict[str, Any]]:
    """A message's content as Anthropic takes it: the text, or text and image blocks."""
    if isinstance(message.content, str):
        return message.content
    blocks: list[dict[str, Any]] = []
    for part in message.content:
        if isinstance(part, TextPart):
            blocks.append({"type": "text", "text": part.text})
            continue
        url = part.image_url.url
        inline = parse_data_url(url)
        source = (
            {"type": "url", "url": url}
            if inline is None
            else {"type": "base64", "media_type": inline[0], "data": inline[1]}
        )
        blocks.append({"type": "image", "source": source})
    return blocks


def _messages(request: JobRequest) -> list[MessageParam]:
    """The conversation without its system messages, in Anthropic's user/assistant turns."""
    turns: list[dict[str, Any]] = []
    for m in request.messages:
        if m.role == "system":
            continue
        if m.role == "tool" and m.tool_call_id is not None:
            result = {"type": "tool_result", "tool_use_id": m.tool_call_id, "content": _content(m)}
            last = turns[-1] if turns else None
            if last is not None and last["role"] == "user" and last.get("tool_results"):
                last["content"].append(result)
            else:
                turns.append({"role": "user", "content": [result], "tool_results": True})
            continue
        content = _content(m)
        if m.role == "assistant" and m.tool_calls:
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            content = [b for b in blocks if b.get("text") != ""] + [
                {
                    "type": "tool_use",
                    "id": call.id,
                    "name": call.function.name,
                    "input": orjson.loads(call.function.arguments),
                }
                for call in m.tool_calls
            ]
        # Anthropic has no "tool" role outside tool_result blocks: a tool message without the
        # call it answers goes as user text.
        turns.append({"role": "assistant" if m.role == "assistant" else "user", "content": content})
    return [cast("MessageParam", {"role": t["role"], "content": t["content"]}) for t in turns]


def _tools(request: JobRequest) -> list[ToolParam] | Omit:
    if not request.tools:
        return omit
    tools: list[ToolParam] = []
    for tool in request.tools:
        function = tool.function
        param = ToolParam(
            name=function.name,
            input_schema=function.parameters or {"type": "object", "properties": {}},
        )
        if function.description is not None:
            param["description"] = function.description
        tools.append(param)
    return tools


def _tool_choice(request: JobRequest) -> ToolChoiceParam | Omit:
    choice = request.tool_choice
    if choice is None:
        return omit
    if choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    return {"type": "tool", "name": choice.function.name}


def _output_config(request: JobRequest) -> OutputConfigParam | Omit:
    if isinstance(request.response_format, ResponseFormatJsonSchema):
        schema = request.response_format.json_schema.schema_
        return {"format": {"type": "json_schema", "schema": schema}}
    return omit


def _completed(parsed: object, latency_ms: int, *, fallback_model: str) -> Completed | str:
    """Turn a parsed 200 answer into `Completed`, or say why it is malformed."""
    if not isinstance(parsed, Message):
        return f"response is not a message object but {type(parsed).__name__}"
    content: object = parsed.content
    if not isinstance(content, list):
        return "response has no content list"
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in content:
        kind = getattr(block, "type", None)
        if kind == "tool_use":
            call = _tool_call(block)
            if isinstance(call, str):
                return call
            tool_calls.append(call)
            continue
        if kind != "text":
            continue  # thinking and other blocks carry no answer
        text: object = getattr(block, "text", None)
        if not isinstance(text, str):
            return "a text block has no string text"
        texts.append(text)
    stop_reason: object = parsed.stop_reason
    if stop_reason is not None and not isinstance(stop_reason, str):
        return "stop_reason is not a string"
    answer = "".join(texts)
    refusal = None
    if stop_reason == "refusal":
        answer, refusal = "", answer or REFUSED
    output = normalized_output(
        text=answer, provider_finish_reason=stop_reason, tool_calls=tool_calls, refusal=refusal
    )
    if isinstance(output, str):
        return output
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
        output=output,
        raw_usage=raw_usage,
        usage_shape="anthropic",
        latency_ms=latency_ms,
        model=model if isinstance(model, str) and model else fallback_model,
    )


def _tool_call(block: object) -> dict[str, Any] | str:
    """A `tool_use` block as a canonical tool call (input as JSON text), or why it is malformed."""
    call_id: object = getattr(block, "id", None)
    name: object = getattr(block, "name", None)
    arguments: object = getattr(block, "input", None)
    if not isinstance(call_id, str) or not isinstance(name, str):
        return "a tool_use block has no string id and name"
    if not isinstance(arguments, dict):
        return "a tool_use block's input is not an object"
    try:
        text = orjson.dumps(arguments).decode()
    except TypeError as exc:
        return f"a tool_use block's input is not JSON: {exc}"
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


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
