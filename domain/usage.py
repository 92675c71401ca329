"""Canonical token usage: one shape for every provider's usage report."""

from __future__ import annotations

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
