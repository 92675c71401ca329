"""Pricing of canonical usage: genai-prices, the catalogue fallback, and job totals."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from decimal import Context, Decimal, localcontext
from typing import Any

import genai_prices
import pytest
from genai_prices import data_snapshot
from genai_prices.types import PriceCalculation, TieredPrices
from hypothesis import given
from hypothesis import strategies as st

from domain.money import Cost, TokenPrices
from domain.pricing import estimate_request_cost, price_usage, total_cost
from domain.usage import Usage, normalize_usage

AT = datetime(2026, 6, 1, tzinfo=UTC)
CLAUDE = "claude-sonnet-4-5"
PRICES = TokenPrices(
    input_per_mtok=Decimal("3"),
    output_per_mtok=Decimal("15"),
    cache_read_per_mtok=Decimal("0.3"),
    cache_write_per_mtok=Decimal("3.75"),
)


def _exact_sum(parts: dict[str, Decimal]) -> Decimal:
    """Sum Decimals without any rounding."""
    with localcontext(Context(prec=100)):
        return sum(parts.values(), Decimal(0))


def _genai_total(usage: Usage, provider_id: str, model: str) -> Decimal:
    """Price the equivalent genai-prices usage with genai-prices' own calc_price."""
    equivalent = genai_prices.Usage(
        input_tokens=usage.input_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        output_tokens=usage.output_tokens,
    )
    calc = genai_prices.calc_price(
        equivalent, model, provider_id=provider_id, genai_request_timestamp=AT
    )
    return calc.total_price


def _base_rate(calc: PriceCalculation, part: str) -> Decimal:
    """Read a model's rate for a part below any tier threshold."""
    rate = getattr(calc.model_price, f"{part}_mtok")
    base: Decimal = rate.base if isinstance(rate, TieredPrices) else rate
    return base


def _assert_no_float(value: Any) -> None:
    """Fail when a float hides anywhere in a dumped Cost."""
    assert not isinstance(value, float)
    if isinstance(value, dict):
        for item in value.values():
            _assert_no_float(item)


def _usage(inp: int, out: int, read: int = 0, write: int = 0, *, estimated: bool = False) -> Usage:
    return Usage(
        input_tokens=inp,
        output_tokens=out,
        cache_read_tokens=read,
        cache_write_tokens=write,
        total_tokens=inp + out,
        estimated=estimated,
    )


def test_anthropic_cache_case_matches_genai_prices() -> None:
    raw = {
        "input_tokens": 100,
        "cache_read_input_tokens": 1000,
        "cache_creation_input_tokens": 500,
        "output_tokens": 50,
    }
    usage = normalize_usage(raw)
    cost = price_usage(
        usage,
        provider="anthropic",
        model=CLAUDE,
        catalogue_prices=None,
        genai_provider_id="anthropic",
        at=AT,
    )
    expected = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=1600, cache_read_tokens=1000, cache_write_tokens=500, output_tokens=50
        ),
        CLAUDE,
        provider_id="anthropic",
        genai_request_timestamp=AT,
    )
    assert cost.amount == expected.total_price
    assert cost.amount == _exact_sum(cost.breakdown)
    assert cost.breakdown["output"] == expected.output_price
    assert cost.source == "genai-prices"
    assert cost.source_version == genai_prices.__version__
    assert cost.estimated is False
    # The cache parts are priced at the model's own cache rates, not at the input rate.
    rates = {k: _base_rate(expected, k) for k in ("input", "cache_read", "cache_write")}
    assert cost.breakdown["input"] == 100 * rates["input"] / 1_000_000
    assert cost.breakdown["cache_read"] == 1000 * rates["cache_read"] / 1_000_000
    assert cost.breakdown["cache_write"] == 500 * rates["cache_write"] / 1_000_000
    assert len(set(rates.values())) == 3


def test_openai_cached_tokens_case_matches_genai_prices() -> None:
    raw = {
        "prompt_tokens": 2000,
        "completion_tokens": 300,
        "total_tokens": 2300,
        "prompt_tokens_details": {"cached_tokens": 1500},
    }
    usage = normalize_usage(raw)
    cost = price_usage(
        usage,
        provider="openai",
        model="gpt-4o",
        catalogue_prices=PRICES,
        genai_provider_id="openai",
        at=AT,
    )
    expected = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=2000, cache_read_tokens=1500, output_tokens=300),
        "gpt-4o",
        provider_id="openai",
        genai_request_timestamp=AT,
    )
    assert cost.amount == expected.total_price
    assert cost.amount == _exact_sum(cost.breakdown)
    assert cost.source == "genai-prices"


def test_genai_prices_is_used_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("pricing tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    cost = price_usage(
        _usage(10, 10),
        provider="openai",
        model="gpt-4o-mini",
        catalogue_prices=None,
        genai_provider_id="openai",
    )
    assert cost.amount is not None
    assert data_snapshot.get_snapshot().from_auto_update is False


def test_unknown_model_has_no_amount_and_a_reason() -> None:
    cost = price_usage(
        _usage(10, 10),
        provider="acme",
        model="acme-large",
        catalogue_prices=None,
        genai_provider_id="openai",
    )
    assert cost.amount is None
    assert cost.estimated is True
    assert cost.reason is not None
    assert cost.reason.startswith("no price known for acme/acme-large")


def test_unknown_genai_provider_without_catalogue_has_no_amount() -> None:
    cost = price_usage(
        _usage(1, 1), provider="x", model="y", catalogue_prices=None, genai_provider_id="nope"
    )
    assert cost.amount is None
    assert cost.reason is not None


def test_catalogue_is_used_when_genai_prices_does_not_know_the_model() -> None:
    cost = price_usage(
        _usage(1600, 50, read=1000, write=500),
        provider="acme",
        model="acme-large",
        catalogue_prices=PRICES,
        genai_provider_id="openai",
        catalogue_version="cat-7",
    )
    assert cost.source == "catalogue"
    assert cost.source_version == "cat-7"
    assert cost.breakdown == {
        "input": Decimal(100) * 3 / 1_000_000,
        "cache_read": Decimal(1000) * Decimal("0.3") / 1_000_000,
        "cache_write": Decimal(500) * Decimal("3.75") / 1_000_000,
        "output": Decimal(50) * 15 / 1_000_000,
    }
    assert cost.amount == _exact_sum(cost.breakdown)
    assert cost.estimated is False


def test_catalogue_without_cache_rates_uses_input_rate_and_says_so() -> None:
    prices = TokenPrices(input_per_mtok=Decimal("2"), output_per_mtok=Decimal("8"))
    cost = price_usage(
        _usage(1000, 0, read=400, write=100), provider="p", model="m", catalogue_prices=prices
    )
    assert cost.amount == Decimal(1000) * 2 / 1_000_000
    assert cost.breakdown["cache_read"] == Decimal(400) * 2 / 1_000_000
    assert cost.reason is not None
    assert "cache_read priced at the input rate" in cost.reason
    assert "cache_write priced at the input rate" in cost.reason
    assert cost.estimated is True


def test_no_genai_provider_id_means_catalogue_only() -> None:
    cost = price_usage(_usage(10, 10), provider="openai", model="gpt-4o", catalogue_prices=PRICES)
    assert cost.source == "catalogue"


def test_estimated_usage_gives_estimated_cost() -> None:
    cost = price_usage(
        _usage(10, 10, estimated=True),
        provider="openai",
        model="gpt-4o",
        catalogue_prices=None,
        genai_provider_id="openai",
    )
    assert cost.estimated is True


def test_inconsistent_cache_counts_raise_input_and_mark_estimate() -> None:
    usage = _usage(10, 5, read=100, write=0)
    cost = price_usage(
        usage, provider="openai", model="gpt-4o", catalogue_prices=None, genai_provider_id="openai"
    )
    assert cost.amount is not None
    assert cost.estimated is True
    assert cost.reason is not None


_counts = st.integers(min_value=0, max_value=10_000_000)
_rates = st.decimals(min_value=0, max_value=1000, places=4, allow_nan=False, allow_infinity=False)


@st.composite
def _usages(draw: st.DrawFn) -> Usage:
    read, write, uncached, out = draw(_counts), draw(_counts), draw(_counts), draw(_counts)
    return _usage(read + write + uncached, out, read, write, estimated=draw(st.booleans()))


@given(
    usage=_usages(),
    prices=st.builds(
        TokenPrices,
        input_per_mtok=_rates,
        output_per_mtok=_rates,
        cache_read_per_mtok=st.none() | _rates,
        cache_write_per_mtok=st.none() | _rates,
    ),
)
def test_catalogue_cost_equals_sum_of_priced_parts(usage: Usage, prices: TokenPrices) -> None:
    cost = price_usage(usage, provider="p", model="m", catalogue_prices=prices)
    assert cost.amount is not None
    assert cost.amount == _exact_sum(cost.breakdown)
    read_rate = prices.cache_read_per_mtok
    write_rate = prices.cache_write_per_mtok
    uncached = usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens
    with localcontext(Context(prec=100)):
        expected = (
            uncached * prices.input_per_mtok
            + usage.cache_read_tokens * (prices.input_per_mtok if read_rate is None else read_rate)
            + usage.cache_write_tokens
            * (prices.input_per_mtok if write_rate is None else write_rate)
            + usage.output_tokens * prices.output_per_mtok
        ) / 1_000_000
    assert cost.amount == expected
    _assert_no_float(cost.model_dump())


@given(
    usage=_usages(),
    target=st.sampled_from(
        [
            ("anthropic", CLAUDE),
            ("anthropic", "claude-sonnet-4-20250514"),
            ("openai", "gpt-4o"),
            ("google", "gemini-2.5-pro"),
            ("aws", "anthropic.claude-sonnet-4-20250514-v1:0"),
        ]
    ),
)
def test_genai_cost_equals_sum_of_priced_parts(usage: Usage, target: tuple[str, str]) -> None:
    provider_id, model = target
    cost = price_usage(
        usage,
        provider=provider_id,
        model=model,
        catalogue_prices=None,
        genai_provider_id=provider_id,
        at=AT,
    )
    assert cost.amount == _exact_sum(cost.breakdown)
    assert cost.amount == _genai_total(usage, provider_id, model)
    assert all(part >= 0 for part in cost.breakdown.values())
    assert cost.estimated is usage.estimated
    _assert_no_float(cost.model_dump())


def test_estimate_request_cost() -> None:
    amount = estimate_request_cost(PRICES, prompt_tokens=1000, max_output_tokens=2000)
    assert amount == Decimal("0.003") + Decimal("0.03")
    assert isinstance(amount, Decimal)
    assert estimate_request_cost(PRICES, prompt_tokens=-5, max_output_tokens=0) == 0


def _cost(amount: str | None, currency: str = "USD", **kw: Any) -> Cost:
    parts = {"input": Decimal(amount)} if amount is not None else {}
    return Cost(
        amount=None if amount is None else Decimal(amount),
        currency=currency,
        estimated=kw.pop("estimated", amount is None),
        breakdown=parts,
        **kw,
    )


def test_total_of_nothing_is_none() -> None:
    assert total_cost([]) is None


def test_total_sums_amounts_and_breakdowns() -> None:
    total = total_cost([_cost("0.10", source="catalogue"), _cost("0.25", source="catalogue")])
    assert total is not None
    assert total.amount == Decimal("0.35")
    assert total.breakdown == {"input": Decimal("0.35")}
    assert total.estimated is False
    assert total.reason is None
    assert total.source == "catalogue"


def test_total_is_estimated_if_any_part_is() -> None:
    total = total_cost([_cost("0.10"), _cost("0.20", estimated=True)])
    assert total is not None
    assert total.estimated is True


def test_mixed_currencies_have_no_amount() -> None:
    total = total_cost([_cost("1", "USD"), _cost("1", "EUR")])
    assert total is not None
    assert total.amount is None
    assert total.estimated is True
    assert total.reason == "mixed currencies: EUR, USD"


def test_unpriced_attempt_makes_total_a_lower_bound() -> None:
    total = total_cost([_cost("0.5"), _cost(None, reason="no price known for a/b")])
    assert total is not None
    assert total.amount == Decimal("0.5")
    assert total.estimated is True
    assert total.reason == "1 of 2 attempts have no known price; amount is a lower bound"


def test_all_unpriced_total_has_no_amount() -> None:
    total = total_cost([_cost(None), _cost(None)])
    assert total is not None
    assert total.amount is None
    assert total.estimated is True


def test_total_drops_breakdown_when_parts_do_not_add_up() -> None:
    bare = Cost(amount=Decimal("1"), estimated=False)
    total = total_cost([bare, _cost("2")])
    assert total is not None
    assert total.amount == Decimal("3")
    assert total.breakdown == {}


def test_no_float_in_serialized_costs() -> None:
    cost = price_usage(
        _usage(1234, 567, read=200),
        provider="openai",
        model="gpt-4o",
        catalogue_prices=None,
        genai_provider_id="openai",
    )
    total = total_cost([cost, cost])
    assert total is not None
    for item in (cost, total):
        _assert_no_float(item.model_dump())
        dumped = item.model_dump(mode="json")
        assert isinstance(dumped["amount"], str)
        assert all(isinstance(v, str) for v in dumped["breakdown"].values())
