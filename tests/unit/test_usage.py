"""Normalization of every provider's usage report into the canonical `Usage`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import genai_prices
import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.usage import USAGE_SHAPES, Usage, detect_usage_shape, estimate_tokens, normalize_usage

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "usage"
FIXTURE_FILES = sorted(FIXTURES.glob("*.json"))


def _load(path: Path) -> dict[str, Any]:
    """Read one usage fixture."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _assert_consistent(usage: Usage) -> None:
    """Check the invariants every normalized usage keeps."""
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.cache_read_tokens + usage.cache_write_tokens <= usage.input_tokens
    assert usage.reasoning_tokens <= usage.output_tokens


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=[p.stem for p in FIXTURE_FILES])
def test_fixture_normalizes_to_expected_counts(path: Path) -> None:
    case = _load(path)
    usage = normalize_usage(case["raw"])
    counts = usage.model_dump(include=set(case["expected"]))
    assert counts == case["expected"]
    assert usage.source == case["shape"]
    assert usage.estimated is False
    assert usage.raw == case["raw"]
    _assert_consistent(usage)


NAMED_SHAPE_CASES = [p for p in FIXTURE_FILES if _load(p)["shape"] in USAGE_SHAPES]


@pytest.mark.parametrize("path", NAMED_SHAPE_CASES, ids=[p.stem for p in NAMED_SHAPE_CASES])
def test_fixture_forced_shape_matches_detection(path: Path) -> None:
    case = _load(path)
    assert normalize_usage(case["raw"], shape=case["shape"]) == normalize_usage(case["raw"])


GENAI_CASES = [p for p in FIXTURE_FILES if "genai_prices" in _load(p)]


@pytest.mark.parametrize("path", GENAI_CASES, ids=[p.stem for p in GENAI_CASES])
def test_normalization_agrees_with_genai_prices_extractors(path: Path) -> None:
    """Our canonical counts are what genai-prices itself extracts from the same response."""
    case = _load(path)
    spec = case["genai_prices"]
    raw = case["raw"]
    if spec["provider_id"] == "google":
        response = {"modelVersion": spec["model"], "usageMetadata": raw.get("usageMetadata", raw)}
    else:
        response = {"model": spec["model"], "usage": raw}
    extracted = genai_prices.extract_usage(
        response, provider_id=spec["provider_id"], api_flavor=spec["api_flavor"]
    ).usage
    usage = normalize_usage(raw)
    assert usage.input_tokens == extracted.reported_value("input_tokens")
    assert usage.output_tokens == extracted.reported_value("output_tokens")
    assert usage.cache_read_tokens == extracted.reported_value("cache_read_tokens")
    assert usage.cache_write_tokens == extracted.reported_value("cache_write_tokens")


def test_anthropic_cache_counts_are_added_to_input() -> None:
    raw = {
        "input_tokens": 100,
        "cache_read_input_tokens": 1000,
        "cache_creation_input_tokens": 500,
        "output_tokens": 50,
    }
    usage = normalize_usage(raw)
    assert (usage.input_tokens, usage.cache_read_tokens, usage.cache_write_tokens) == (
        1600,
        1000,
        500,
    )
    assert usage.total_tokens == 1650
    assert usage.source == "anthropic"


def test_anthropic_cache_write_from_ttl_breakdown_only() -> None:
    raw = {
        "input_tokens": 10,
        "cache_creation": {"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 200},
        "output_tokens": 5,
    }
    usage = normalize_usage(raw)
    assert (usage.input_tokens, usage.cache_write_tokens) == (510, 500)


def test_openai_chat_cached_tokens_stay_inside_prompt() -> None:
    raw = {
        "prompt_tokens": 2000,
        "completion_tokens": 300,
        "total_tokens": 2300,
        "prompt_tokens_details": {"cached_tokens": 1500},
    }
    usage = normalize_usage(raw)
    assert (usage.input_tokens, usage.cache_read_tokens, usage.output_tokens) == (2000, 1500, 300)
    assert usage.source == "openai_chat"


def test_gemini_inner_dict_and_wrapper_agree() -> None:
    inner = {"promptTokenCount": 100, "candidatesTokenCount": 20, "thoughtsTokenCount": 30}
    wrapped = normalize_usage({"usageMetadata": inner})
    direct = normalize_usage(inner)
    assert wrapped.model_dump(exclude={"raw"}) == direct.model_dump(exclude={"raw"})
    assert (direct.output_tokens, direct.reasoning_tokens) == (50, 30)


def test_gemini_tool_use_prompt_tokens_count_as_input() -> None:
    usage = normalize_usage(
        {"promptTokenCount": 100, "toolUsePromptTokenCount": 40, "candidatesTokenCount": 7}
    )
    assert usage.input_tokens == 140


def test_openai_usage_wrapped_in_a_response_is_found() -> None:
    usage = normalize_usage(
        {"id": "chatcmpl-1", "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    )
    assert (usage.input_tokens, usage.output_tokens, usage.source) == (7, 3, "openai_chat")


@pytest.mark.parametrize("raw", [None, {}])
def test_missing_usage_is_estimated_from_text(raw: dict[str, Any] | None) -> None:
    usage = normalize_usage(raw, prompt_text="hello world, how are you?", output_text="fine")
    assert usage.estimated is True
    assert usage.input_tokens == estimate_tokens("hello world, how are you?")
    assert usage.output_tokens == estimate_tokens("fine")
    assert usage.source == "estimate"
    assert usage.raw == (None if raw is None else {})


def test_unrecognizable_usage_is_estimated_and_kept() -> None:
    raw = {"foo": 1, "bar": {"baz": 2}}
    usage = normalize_usage(raw, prompt_text="abcdefgh", output_text="abcd")
    assert usage.estimated is True
    assert (usage.input_tokens, usage.output_tokens) == (2, 1)
    assert usage.source == "unknown"
    assert usage.raw == raw


def test_missing_output_is_estimated_but_reported_input_kept() -> None:
    usage = normalize_usage({"prompt_tokens": 50}, output_text="x" * 40)
    assert (usage.input_tokens, usage.output_tokens, usage.estimated) == (50, 10, True)


def test_missing_input_is_recovered_from_total() -> None:
    usage = normalize_usage({"completion_tokens": 30, "total_tokens": 130})
    assert (usage.input_tokens, usage.output_tokens, usage.estimated) == (100, 30, False)


@pytest.mark.parametrize("bad", [-5, "lots", 1.5, True, None, [3], {"n": 1}, float("nan")])
def test_garbage_counts_are_treated_as_missing(bad: Any) -> None:
    usage = normalize_usage(
        {"prompt_tokens": bad, "completion_tokens": 4}, prompt_text="twelve bytes"
    )
    assert usage.input_tokens == 3
    assert usage.output_tokens == 4
    assert usage.estimated is True


def test_garbage_sub_counts_are_ignored_or_clamped() -> None:
    usage = normalize_usage(
        {
            "prompt_tokens": 10,
            "completion_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 99},
            "completion_tokens_details": {"reasoning_tokens": "many"},
        }
    )
    assert (usage.cache_read_tokens, usage.reasoning_tokens, usage.estimated) == (10, 0, False)


def test_integral_floats_and_digit_strings_are_counts() -> None:
    usage = normalize_usage({"input_tokens": 12.0, "output_tokens": "7"})
    assert (usage.input_tokens, usage.output_tokens, usage.estimated) == (12, 7, False)


def test_forced_shape_overrides_detection() -> None:
    raw = {"input_tokens": 100, "output_tokens": 10, "cache_read_input_tokens": 50}
    assert normalize_usage(raw).input_tokens == 150
    forced = normalize_usage(raw, shape="openai_responses")
    assert (forced.input_tokens, forced.cache_read_tokens, forced.source) == (
        100,
        0,
        "openai_responses",
    )


def test_unknown_forced_shape_uses_generic_counts() -> None:
    usage = normalize_usage({"tokens_in": 9, "tokens_out": 2}, shape="acme")
    assert (usage.input_tokens, usage.output_tokens, usage.source) == (9, 2, "acme")


def test_raw_is_a_plain_copy() -> None:
    raw: dict[str, Any] = {"prompt_tokens": 1, "completion_tokens": 1, "details": {"a": (1, 2)}}
    usage = normalize_usage(raw)
    raw["details"]["a"] = "changed"
    assert usage.raw == {"prompt_tokens": 1, "completion_tokens": 1, "details": {"a": [1, 2]}}


def test_non_string_keys_do_not_crash() -> None:
    usage = normalize_usage({1: 2, "prompt_tokens": 3, "completion_tokens": 4})  # type: ignore[dict-item]
    assert usage.raw == {"1": 2, "prompt_tokens": 3, "completion_tokens": 4}


def test_detect_usage_shape_rules() -> None:
    assert detect_usage_shape({"promptTokenCount": 1}) == "gemini"
    assert detect_usage_shape({"inputTokens": 1}) == "bedrock_converse"
    assert detect_usage_shape({"input_tokens": 1, "cache_read_input_tokens": 0}) == "anthropic"
    assert detect_usage_shape({"prompt_tokens": 1}) == "openai_chat"
    assert detect_usage_shape({"input_tokens": 1, "input_tokens_details": {}}) == "openai_responses"
    assert detect_usage_shape({"input_tokens": 1, "output_tokens": 2}) == "canonical"
    assert detect_usage_shape({"nothing": 1}) is None


_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**9),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
_keys = st.sampled_from(
    [
        "prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
        "cached_tokens", "input_tokens", "output_tokens", "cache_read_input_tokens",
        "cache_creation_input_tokens", "cache_creation", "usageMetadata", "promptTokenCount",
        "candidatesTokenCount", "thoughtsTokenCount", "cachedContentTokenCount", "inputTokens",
        "outputTokens", "cacheReadInputTokens", "cacheWriteInputTokens", "usage",
        "reasoning_tokens", "cache_read_tokens", "cache_write_tokens", "other",
    ]
)  # fmt: skip
_json_like = st.recursive(
    _json_leaf,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_keys, children, max_size=6),
    max_leaves=20,
)


@given(
    raw=st.dictionaries(_keys, _json_like, max_size=8),
    shape=st.sampled_from([None, "nonsense", *sorted(USAGE_SHAPES)]),
    prompt=st.text(max_size=50),
)
def test_any_report_normalizes_without_crashing(
    raw: dict[str, Any], shape: str | None, prompt: str
) -> None:
    usage = normalize_usage(raw, shape=shape, prompt_text=prompt, output_text="out")
    _assert_consistent(usage)
    assert usage.raw is not None
