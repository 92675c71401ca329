"""Canonical token usage: one shape for every provider's usage report."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Usage(BaseModel):
    """Token counts; `input_tokens` always includes cached input (read and written)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    cache_read_tokens: int = Field(default=0, ge=0)
    cache_write_tokens: int = Field(default=0, ge=0)
    reasoning_tokens: int = Field(default=0, ge=0)
    total_tokens: int = Field(ge=0)
    estimated: bool = False
    source: str = "unknown"
    raw: dict[str, Any] | None = None


def estimate_tokens(text: str) -> int:
    """Estimate tokens of a text without a tokenizer: one token per 4 UTF-8 bytes, rounded up.

    BPE tokenizers average close to 4 bytes a token on English prose; the result is always marked
    estimated wherever it is used.
    """
    size = len(text.encode("utf-8"))
    return (size + 3) // 4


# --- Normalization of provider usage reports ----------------------------------------------------
#
# Rules (the same ones genai-prices' own extractors follow):
# * canonical `input_tokens` includes cache reads and cache writes; providers whose input count
#   excludes them (Anthropic, Bedrock Converse) get them added back;
# * canonical `output_tokens` includes reasoning/thinking tokens (OpenAI already counts them inside
#   completion/output tokens; Gemini reports `thoughtsTokenCount` apart, so it is added);
#   `reasoning_tokens` is the part of the output that was reasoning;
# * `total_tokens` is always recomputed as input + output; the provider's own total stays in `raw`
#   and is used only to recover a missing input or output count;
# * counts that are missing, negative or not integers are ignored; a count still missing after
#   that is estimated from the text and the usage is marked `estimated`;
# * sub-counts are clamped so that cache_read + cache_write <= input and reasoning <= output.

USAGE_SHAPES = frozenset(
    {"openai_chat", "openai_responses", "anthropic", "gemini", "bedrock_converse", "canonical"}
)

_WRAPPERS = ("usage", "usageMetadata", "usage_metadata", "billed_units")
_GENERIC_INPUT = ("input_tokens", "prompt_tokens", "inputTokens", "promptTokenCount",
                  "prompt_eval_count", "input_token_count", "tokens_in")  # fmt: skip
_GENERIC_OUTPUT = ("output_tokens", "completion_tokens", "outputTokens", "candidatesTokenCount",
                   "eval_count", "output_token_count", "tokens_out")  # fmt: skip


@dataclass(slots=True)
class _Counts:
    input: int | None = None
    output: int | None = None
    total: int | None = None
    cache_read: int = 0
    cache_write: int = 0
    reasoning: int = 0


def _count(value: Any) -> int | None:
    """Read one token count, treating negatives and non-integers as missing."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())  # protobuf JSON renders int64 counts as strings
    return None


def _get(data: Mapping[str, Any], *path: str) -> int | None:
    """Read a count at a nested path, or None when any step is missing or not a mapping."""
    node: Any = data
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return _count(node)


def _add(*values: int | None) -> int | None:
    """Sum the counts that are present; None when the first (the base count) is missing."""
    if values[0] is None:
        return None
    return sum(v for v in values if v is not None)


def _plain(value: Any) -> Any:
    """Copy a JSON-like value into plain dicts and lists with string keys."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _unwrap(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """Step into a `usage`-like wrapper when the counts are not at the top level."""
    for key in _WRAPPERS:
        inner = raw.get(key)
        if isinstance(inner, Mapping) and inner:
            return inner
    return raw


def detect_usage_shape(raw: Mapping[str, Any]) -> str | None:
    """Guess which provider shape a usage report has, or None when nothing is recognizable."""
    data = _unwrap(raw)
    keys = set(data)
    if keys & {"promptTokenCount", "candidatesTokenCount", "totalTokenCount", "thoughtsTokenCount",
               "cachedContentTokenCount"}:  # fmt: skip
        return "gemini"
    if keys & {"inputTokens", "outputTokens", "cacheReadInputTokens", "cacheWriteInputTokens"}:
        return "bedrock_converse"
    if keys & {"cache_read_input_tokens", "cache_creation_input_tokens", "cache_creation"}:
        return "anthropic"
    if keys & {"prompt_tokens", "completion_tokens", "prompt_tokens_details"}:
        return "openai_chat"
    if keys & {"input_tokens_details", "output_tokens_details"}:
        return "openai_responses"
    if keys & {"input_tokens", "output_tokens"}:
        # Without cache or detail fields every shape using these names means the same thing.
        return "canonical"
    return None


def _parse_openai_chat(d: Mapping[str, Any]) -> _Counts:
    return _Counts(
        input=_get(d, "prompt_tokens"),
        output=_get(d, "completion_tokens"),
        total=_get(d, "total_tokens"),
        cache_read=_get(d, "prompt_tokens_details", "cached_tokens") or 0,
        reasoning=_get(d, "completion_tokens_details", "reasoning_tokens") or 0,
    )


def _parse_openai_responses(d: Mapping[str, Any]) -> _Counts:
    return _Counts(
        input=_get(d, "input_tokens"),
        output=_get(d, "output_tokens"),
        total=_get(d, "total_tokens"),
        cache_read=_get(d, "input_tokens_details", "cached_tokens") or 0,
        reasoning=_get(d, "output_tokens_details", "reasoning_tokens") or 0,
    )


def _parse_anthropic(d: Mapping[str, Any]) -> _Counts:
    read = _get(d, "cache_read_input_tokens") or 0
    write = _get(d, "cache_creation_input_tokens")
    if write is None:  # only the per-TTL breakdown was reported
        write = (_get(d, "cache_creation", "ephemeral_5m_input_tokens") or 0) + (
            _get(d, "cache_creation", "ephemeral_1h_input_tokens") or 0
        )
    return _Counts(
        input=_add(_get(d, "input_tokens"), read, write),
        output=_get(d, "output_tokens"),
        cache_read=read,
        cache_write=write,
    )


def _parse_gemini(d: Mapping[str, Any]) -> _Counts:
    thoughts = _get(d, "thoughtsTokenCount") or 0
    candidates = _get(d, "candidatesTokenCount")
    # Thinking is billed as output; tool-use prompt tokens are billed as input. Proto3 JSON omits
    # zero counts, so a missing candidates count next to thoughts means no visible output.
    output = (candidates or 0) + thoughts if candidates is not None or thoughts else None
    return _Counts(
        input=_add(_get(d, "promptTokenCount"), _get(d, "toolUsePromptTokenCount")),
        output=output,
        total=_get(d, "totalTokenCount"),
        cache_read=_get(d, "cachedContentTokenCount") or 0,
        reasoning=thoughts,
    )


def _parse_bedrock(d: Mapping[str, Any]) -> _Counts:
    # AWS: inputTokens counts only the uncached input; cache reads/writes are reported apart
    # (genai-prices' Bedrock extractor adds them back the same way).
    read = _get(d, "cacheReadInputTokens") or 0
    write = _get(d, "cacheWriteInputTokens") or 0
    return _Counts(
        input=_add(_get(d, "inputTokens"), read, write),
        output=_get(d, "outputTokens"),  # totalTokens is not used: its cache semantics vary
        cache_read=read,
        cache_write=write,
    )


def _parse_canonical(d: Mapping[str, Any]) -> _Counts:
    return _Counts(
        input=_get(d, "input_tokens"),
        output=_get(d, "output_tokens"),
        total=_get(d, "total_tokens"),
        cache_read=_get(d, "cache_read_tokens") or 0,
        cache_write=_get(d, "cache_write_tokens") or 0,
        reasoning=_get(d, "reasoning_tokens") or 0,
    )


def _parse_generic(d: Mapping[str, Any]) -> _Counts:
    def first(names: tuple[str, ...]) -> int | None:
        for name in names:
            if (value := _get(d, name)) is not None:
                return value
        return None

    return _Counts(input=first(_GENERIC_INPUT), output=first(_GENERIC_OUTPUT))


_PARSERS: dict[str, Callable[[Mapping[str, Any]], _Counts]] = {
    "openai_chat": _parse_openai_chat,
    "openai_responses": _parse_openai_responses,
    "anthropic": _parse_anthropic,
    "gemini": _parse_gemini,
    "bedrock_converse": _parse_bedrock,
    "canonical": _parse_canonical,
}


def normalize_usage(
    raw: Mapping[str, Any] | None,
    *,
    shape: str | None = None,
    prompt_text: str = "",
    output_text: str = "",
) -> Usage:
    """Turn a provider's usage report into a canonical `Usage`, estimating what is missing.

    `shape` forces a parser (one of `USAGE_SHAPES`); None detects it from the keys. An unknown
    shape name or an unrecognizable report falls back to any recognizable input/output counts.
    """
    data: Mapping[str, Any] = _unwrap(raw) if isinstance(raw, Mapping) else {}
    plain = _plain(raw) if isinstance(raw, Mapping) else None
    if shape is None:
        shape = detect_usage_shape(data) if data else None
    source = shape if shape is not None else ("unknown" if data else "estimate")
    parser = _PARSERS.get(shape or "", _parse_generic)
    counts = parser(data) if data else _Counts()

    # Recover one missing side from the provider's total before estimating anything.
    if counts.input is None and counts.output is not None and counts.total is not None:
        counts.input = counts.total - counts.output if counts.total >= counts.output else None
    if counts.output is None and counts.input is not None and counts.total is not None:
        counts.output = counts.total - counts.input if counts.total >= counts.input else None

    estimated = counts.input is None or counts.output is None
    if counts.input is not None:
        input_tokens = counts.input
    else:  # an estimate never undercuts the cache counts the provider did report
        input_tokens = max(estimate_tokens(prompt_text), counts.cache_read + counts.cache_write)
    output_tokens = counts.output if counts.output is not None else estimate_tokens(output_text)
    cache_read = min(counts.cache_read, input_tokens)
    cache_write = min(counts.cache_write, input_tokens - cache_read)
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=min(counts.reasoning, output_tokens),
        total_tokens=input_tokens + output_tokens,
        estimated=estimated,
        source=source,
        raw=plain,
    )
