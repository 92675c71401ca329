"""The chat parts of a job request and of its answer: content parts, tools, tool calls, formats.

The shapes are OpenAI Chat Completions' (what most clients and gateways already speak); every
adapter maps them to what its provider's official SDK expects (`providers/`). Free-form JSON in
them (a tool's `parameters`, a `json_schema` response format's `schema`) is bounded like request
metadata (`domain.limits.TOOL_SCHEMA`). `domain.messages` builds its request and output from them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from domain.limits import TOOL_SCHEMA, check_tree

#: A function name, as both OpenAI and Anthropic accept it.
ToolName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
#: A JSON Schema given in a request (a JSON object), bounded.
JsonSchemaObject = Annotated[
    dict[str, Any], AfterValidator(lambda value: check_tree(value, TOOL_SCHEMA, name="schema"))
]

#: Image media types every adapter can pass on (OpenAI and Anthropic accept these four).
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
#: Longest `https://` image URL accepted (a data URL is bounded by the request size instead).
MAX_IMAGE_URL_CHARS = 8_192
_DATA_URL = re.compile(r"data:(image/(?:png|jpeg|gif|webp));base64,([A-Za-z0-9+/]+={0,2})")


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def parse_data_url(url: str) -> tuple[str, str] | None:
    """Return (media type, base64 data) of a `data:image/...;base64,...` URL, else None."""
    match = _DATA_URL.fullmatch(url)
    return None if match is None else (match.group(1), match.group(2))


def _image_url(value: str) -> str:
    if value.startswith("https://"):
        if len(value) > MAX_IMAGE_URL_CHARS:
            raise ValueError(f"an image URL is longer than {MAX_IMAGE_URL_CHARS} characters")
        return value
    if value.startswith("data:"):
        parsed = parse_data_url(value)
        if parsed is None or len(parsed[1]) % 4:
            raise ValueError(
                "a data URL must be data:<media type>;base64,<base64 data> with a media type of "
                + ", ".join(IMAGE_MEDIA_TYPES)
            )
        return value
    raise ValueError("image_url.url must be an https:// URL or a data:image/...;base64,... URL")


class TextPart(_Part):
    """A piece of text of a message."""

    type: Literal["text"]
    text: str = Field(max_length=2_000_000)


class ImageUrl(_Part):
    """An image by URL (`https://`) or inline (`data:image/png;base64,...`)."""

    url: Annotated[str, Field(min_length=1, max_length=2_000_000), AfterValidator(_image_url)]
    #: OpenAI's detail level; providers without one ignore it.
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Part):
    """An image of a user message; needs a model with the `vision` capability."""

    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionDefinition(_Part):
    """A function the model may call: its name, what it does, the JSON Schema of its arguments."""

    name: ToolName
    description: str | None = Field(default=None, max_length=16_384)
    #: JSON Schema of the arguments object; none means a function without arguments.
    parameters: JsonSchemaObject | None = None


class Tool(_Part):
    """A tool of a request (OpenAI's function-tool shape); needs the `tools` capability."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionCall(_Part):
    """The function a tool call calls and its arguments, as JSON text."""

    name: str = Field(min_length=1, max_length=256)
    arguments: str = Field(max_length=1_000_000)


class ToolCall(_Part):
    """A tool call of an assistant: in an answer (`Output.tool_calls`) or in a request's history."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolChoiceFunction(_Part):
    name: ToolName


class NamedToolChoice(_Part):
    """Make the model call this one function."""

    type: Literal["function"] = "function"
    function: ToolChoiceFunction


#: "auto" (the model decides), "none" (no tool call), "required" (at least one), or a function.
ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class ResponseFormatText(_Part):
    type: Literal["text"]


class ResponseFormatJsonObject(_Part):
    """Answer with one JSON object; needs the `json_mode` capability."""

    type: Literal["json_object"]


class JsonSchemaSpec(_Part):
    """A named JSON Schema the answer must follow (`schema` on the wire)."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        validate_by_alias=True,
        validate_by_name=False,
        serialize_by_alias=True,
    )

    name: ToolName
    schema_: JsonSchemaObject = Field(alias="schema")
    strict: bool | None = None


class ResponseFormatJsonSchema(_Part):
    """Answer with JSON following a schema; needs the `json_mode` capability."""

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
    Field(discriminator="type"),
]

#: The one vocabulary of `Output.finish_reason`, whatever the provider.
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "error"]
CANONICAL_FINISH_REASONS: frozenset[str] = frozenset(get_args(FinishReason))

#: Provider finish/stop reasons and what they mean in the canonical vocabulary (OpenAI's,
#: Anthropic's and a few OpenAI-compatible servers'). Anything else maps to None.
FINISH_REASONS: dict[str, FinishReason] = {
    # OpenAI chat completions (and compatible servers)
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
    "error": "error",
    # Anthropic messages
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def normalize_finish_reason(raw: str | None) -> FinishReason | None:
    """Map a provider's finish or stop reason to the canonical vocabulary (None if unknown)."""
    return None if raw is None else FINISH_REASONS.get(raw)
