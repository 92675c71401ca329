"""Price a canonical `Usage` as a `Cost`: genai-prices when it knows the model, else the catalogue.

Every amount is a Decimal and equals the exact sum of its breakdown parts ("input" for uncached
input, "cache_read", "cache_write", "output", and "other" for anything genai-prices prices that is
not a token, such as per-request fees). A price that is not known gives `amount=None` with a
reason, never zero. genai-prices is used offline: its bundled data snapshot, never a fetch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Context, Decimal, localcontext
from typing import TYPE_CHECKING

from domain.money import Cost, TokenPrices
from domain.usage import Usage

if TYPE_CHECKING:
    from genai_prices.types import ModelPrice, PriceCalculation

_MTOK = Decimal(1_000_000)
#: Wide enough that sums of token prices never round (28 digits is Decimal's default).
_EXACT = Context(prec=80)


def price_usage(
    usage: Usage,
    *,
    provider: str,
    model: str,
    catalogue_prices: TokenPrices | None,
    genai_provider_id: str | None = None,
    at: datetime | None = None,
    catalogue_version: str | None = None,
) -> Cost:
    """Price one attempt's usage, preferring genai-prices and falling back to the catalogue."""
    notes: list[str] = []
    input_tokens = _input_to_price(usage, notes)
    if genai_provider_id is not None:
        cost = _price_with_genai(
            usage, input_tokens, provider_id=genai_provider_id, model=model, at=at, notes=notes
        )
        if cost is not None:
            return cost
    if catalogue_prices is not None:
        return _price_with_catalogue(
            usage, input_tokens, catalogue_prices, catalogue_version, notes
        )
    notes.insert(0, f"no price known for {provider}/{model}")
    return Cost(amount=None, estimated=True, reason="; ".join(notes))


def estimate_request_cost(
    prices: TokenPrices, *, prompt_tokens: int, max_output_tokens: int
) -> Decimal:
    """Bound a request's cost before dispatch: the prompt at input rate, the full output budget."""
    with localcontext(_EXACT):
        return (
            Decimal(max(prompt_tokens, 0)) * prices.input_per_mtok
            + Decimal(max(max_output_tokens, 0)) * prices.output_per_mtok
        ) / _MTOK


def total_cost(costs: Sequence[Cost]) -> Cost | None:
    """Sum the costs of a job's billed attempts; None when no attempt was billed.

    Mixed currencies give `amount=None`. Attempts without a known price are left out of the sum:
    the total is then a lower bound, marked estimated, and `reason` says how many were left out;
    when no attempt has a known price the total amount is None.
    """
    if not costs:
        return None
    currencies = sorted({c.currency for c in costs})
    estimated = any(c.estimated for c in costs)
    source = _common(c.source for c in costs)
    version = _common(c.source_version for c in costs)
    if len(currencies) > 1:
        return Cost(
            amount=None,
            currency=costs[0].currency,
            estimated=True,
            source=source,
            source_version=version,
            reason=f"mixed currencies: {', '.join(currencies)}",
        )
    priced = [c for c in costs if c.amount is not None]
    unpriced = len(costs) - len(priced)
    reason = None
    if unpriced:
        reason = f"{unpriced} of {len(costs)} attempts have no known price"
        reason += "; amount is a lower bound" if priced else ""
    if not priced:
        return Cost(
            amount=None,
            currency=currencies[0],
            estimated=True,
            source=source,
            source_version=version,
            reason=reason,
        )
    with localcontext(_EXACT):
        amount = sum((c.amount for c in priced if c.amount is not None), Decimal(0))
        breakdown: dict[str, Decimal] = {}
        for c in priced:
            for key, part in c.breakdown.items():
                breakdown[key] = breakdown.get(key, Decimal(0)) + part
        if sum(breakdown.values(), Decimal(0)) != amount:
            breakdown = {}  # some attempt had no (or an inconsistent) breakdown: do not fake one
    return Cost(
        amount=amount,
        currency=currencies[0],
        estimated=estimated or unpriced > 0,
        source=source,
        source_version=version,
        reason=reason,
        breakdown=breakdown,
    )


def _common(values: Iterable[str | None]) -> str | None:
    """Return the one value all parts share, "mixed" when they differ, None when all are None."""
    distinct = {v for v in values if v is not None}
    if not distinct:
        return None
    return distinct.pop() if len(distinct) == 1 else "mixed"


def _input_to_price(usage: Usage, notes: list[str]) -> int:
    """Return the input count to price: raised (with a note) when the cache counts exceed it."""
    cached = usage.cache_read_tokens + usage.cache_write_tokens
    if cached > usage.input_tokens:
        notes.append(f"input_tokens {usage.input_tokens} raised to the cache counts' sum {cached}")
        return cached
    return usage.input_tokens


def _price_with_catalogue(
    usage: Usage, input_tokens: int, prices: TokenPrices, version: str | None, notes: list[str]
) -> Cost:
    """Price usage with the catalogue's per-million-token rates."""
    approximate = input_tokens != usage.input_tokens
    read, write = usage.cache_read_tokens, usage.cache_write_tokens
    read_rate, write_rate = prices.cache_read_per_mtok, prices.cache_write_per_mtok
    if read_rate is None:
        read_rate = prices.input_per_mtok
        if read:
            notes.append("cache_read priced at the input rate (no catalogue cache_read rate)")
            approximate = True
    if write_rate is None:
        write_rate = prices.input_per_mtok
        if write:
            notes.append("cache_write priced at the input rate (no catalogue cache_write rate)")
            approximate = True
    with localcontext(_EXACT):
        breakdown = {
            "input": Decimal(input_tokens - read - write) * prices.input_per_mtok / _MTOK,
            "cache_read": Decimal(read) * read_rate / _MTOK,
            "cache_write": Decimal(write) * write_rate / _MTOK,
            "output": Decimal(usage.output_tokens) * prices.output_per_mtok / _MTOK,
        }
        amount = sum(breakdown.values(), Decimal(0))
    return Cost(
        amount=amount,
        currency=prices.currency,
        estimated=usage.estimated or approximate,
        source="catalogue",
        source_version=version,
        reason="; ".join(notes) or None,
        breakdown=breakdown,
    )


def _price_with_genai(
    usage: Usage,
    input_tokens: int,
    *,
    provider_id: str,
    model: str,
    at: datetime | None,
    notes: list[str],
) -> Cost | None:
    """Price usage with genai-prices' bundled data; None (with a note) when it cannot."""
    import genai_prices

    approximate = input_tokens != usage.input_tokens
    read, write = usage.cache_read_tokens, usage.cache_write_tokens
    genai_usage = genai_prices.Usage(
        input_tokens=input_tokens,
        cache_read_tokens=read,
        cache_write_tokens=write,
        output_tokens=usage.output_tokens,
    )
    when = at if at is None or at.tzinfo is not None else at.replace(tzinfo=UTC)
    try:
        calc = genai_prices.calc_price(
            genai_usage, model, provider_id=provider_id, genai_request_timestamp=when
        )
    except (LookupError, ValueError, ArithmeticError) as exc:
        notes.append(f"genai-prices cannot price {provider_id}/{model}: {exc}")
        return None
    breakdown = _genai_breakdown(calc, input_tokens, read, write, notes)
    with localcontext(_EXACT):
        amount = sum(breakdown.values(), Decimal(0))
    version = genai_prices.__version__
    if calc.auto_update_timestamp is not None:
        version = f"{version}+data.{calc.auto_update_timestamp.isoformat()}"
    return Cost(
        amount=amount,
        currency="USD",
        estimated=usage.estimated or approximate,
        source="genai-prices",
        source_version=version,
        reason="; ".join(notes) or None,
        breakdown=breakdown,
    )


def _genai_breakdown(
    calc: PriceCalculation, input_tokens: int, read: int, write: int, notes: list[str]
) -> dict[str, Decimal]:
    """Split genai-prices' totals into our parts, keeping its input/output/total figures exact.

    Cache parts use the model's own cache rates (the input rate when it has none, as genai-prices
    does); "input" is genai's input price minus them; "other" is what has no token direction.
    """
    price: ModelPrice = calc.model_price
    read_part = _unit_price(price, "cache_read", read, input_tokens=input_tokens, notes=notes)
    write_part = _unit_price(price, "cache_write", write, input_tokens=input_tokens, notes=notes)
    with localcontext(_EXACT):
        parts = {
            "input": calc.input_price - read_part - write_part,
            "cache_read": read_part,
            "cache_write": write_part,
            "output": calc.output_price,
        }
        other = calc.total_price - calc.input_price - calc.output_price
    if other:
        parts["other"] = other
    return parts


def _unit_price(
    price: ModelPrice, label: str, count: int, *, input_tokens: int, notes: list[str]
) -> Decimal:
    """Price `count` tokens at the model's `label` rate (tiered by input), else its input rate."""
    from genai_prices.types import calc_unit_price

    rate = getattr(price, f"{label}_mtok")
    if rate is None:
        rate = price.input_mtok
        if count:
            notes.append(f"{label} priced at the input rate (no genai-prices {label} rate)")
    if rate is None or not count:
        return Decimal(0)
    with localcontext(_EXACT):
        return calc_unit_price(rate, count, input_tokens, 1_000_000)
