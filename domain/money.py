"""Money without floats: decimal amounts, an explicit currency, and whether it is an estimate."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer


def _to_decimal(value: Any) -> Decimal:
    if isinstance(value, bool | float):
        raise ValueError("money amounts are decimal strings, not floats")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int | str):
        try:
            result = Decimal(str(value).strip())
        except InvalidOperation as exc:
            raise ValueError(f"not a decimal amount: {value!r}") from exc
    else:
        raise ValueError(f"not a decimal amount: {value!r}")
    if not result.is_finite():
        raise ValueError("amount must be finite")
    return result


DecimalStr = Annotated[
    Decimal,
    BeforeValidator(_to_decimal),
    PlainSerializer(lambda d: format(d, "f"), return_type=str, when_used="always"),
]

Currency = Annotated[str, Field(min_length=3, max_length=3, pattern=r"^[A-Z]{3}$")]


class Money(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    amount: DecimalStr = Field(ge=0)
    currency: Currency = "USD"


class TokenPrices(BaseModel):
    """Prices per million tokens of one model, as a catalogue declares them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    currency: Currency = "USD"
    input_per_mtok: DecimalStr = Field(ge=0)
    output_per_mtok: DecimalStr = Field(ge=0)
    cache_read_per_mtok: DecimalStr | None = Field(default=None, ge=0)
    cache_write_per_mtok: DecimalStr | None = Field(default=None, ge=0)


class Cost(BaseModel):
    """What an attempt or a job cost; `amount` is None only when no price is known (see reason)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    amount: DecimalStr | None
    currency: Currency = "USD"
    estimated: bool
    source: str | None = None
    source_version: str | None = None
    reason: str | None = None
    breakdown: dict[str, DecimalStr] = Field(default_factory=dict)
