"""Whatever intake accepts is stored, read back and rendered without error (property tests).

Before the bounds of domain.limits, a request whose metadata nested 240-252 levels deep was
accepted and then every read of its job failed: the state codec wrote what it could not read.
Here arbitrary JSON (and raw bytes no encoder writes) goes through the intake decoder; what it
accepts goes through the job core's whole path of encodings, and what it refuses is refused with
a DecodeError, never another exception.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.render import events_body, status_body
from api.timeline import timeline_page
from domain.catalogue import load_catalogue
from domain.codec import DecodeError, decode_intake
from domain.commands import CreateJob
from domain.decide import Context, decide
from domain.limits import METADATA, check_tree
from domain.messages import JobRequest
from domain.outbox import render
from domain.policy import load_policy
from tables.jobs import decode_request, decode_row, encode_request, encode_row

CONFIG = Path(__file__).resolve().parents[2] / "config"
CTX = Context(
    catalogue=load_catalogue(CONFIG / "catalogue.yaml"),
    policy=load_policy(CONFIG / "policy.yaml"),
)
MAX_BYTES = 900_000

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6), st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=60,
)


def body(metadata: Any, **fields: Any) -> dict[str, Any]:
    return {
        "request_id": "r-1",
        "tenant_id": "tenant-a",
        "messages": [{"role": "user", "content": "Say hello."}],
        "metadata": metadata,
        **fields,
    }


def nested(levels: int, leaf: bytes = b"1") -> bytes:
    return b'{"a":' * levels + leaf + b"}" * levels


def accepted_path(request: JobRequest) -> None:
    """Everything the job core and the API do with an accepted request: none of it may raise."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    create = CreateJob(
        command_id="c-1",
        job_id="job-1",
        at=at,
        tenant_id="tenant-a",
        fingerprint=request.fingerprint(),
        request=request,
    )
    job = decide(None, create, CTX).job
    assert job is not None
    # The command itself crosses cp.commands.
    assert CreateJob.model_validate_json(create.model_dump_json()) == create
    stored_request = decode_request(encode_request(request))
    assert stored_request == request
    again = decode_row(encode_row(job), stored_request)
    assert again.request == job.request and again.events == job.events
    for entry in job.outbox:
        orjson.loads(render(job, entry).model_dump_json())
    orjson.dumps(status_body(again))
    orjson.dumps(events_body(again, 0))
    timeline_page(again)


def intake(raw: bytes) -> JobRequest | None:
    try:
        request = decode_intake(raw, max_bytes=MAX_BYTES)
    except DecodeError:
        return None
    assert isinstance(request, JobRequest)
    return request


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metadata=st.dictionaries(st.text(max_size=20), json_values, max_size=8))
def test_any_metadata_intake_accepts_reads_back_and_renders(metadata: dict[str, Any]) -> None:
    try:
        raw = orjson.dumps(body(metadata))
    except TypeError:  # an integer orjson cannot write: a producer could not send it either
        return
    request = intake(raw)
    if request is not None:
        accepted_path(request)


@settings(max_examples=60, deadline=None)
@given(levels=st.integers(min_value=1, max_value=1200), leaf=st.sampled_from([b"1", b"[]", b"{}"]))
def test_deep_metadata_is_refused_at_the_door_or_read_back_whole(levels: int, leaf: bytes) -> None:
    raw = orjson.dumps(body({}))[: -len(b"{}}")] + nested(levels, leaf) + b"}"
    request = intake(raw)
    if request is None:
        return
    assert levels <= METADATA.max_depth
    accepted_path(request)


@pytest.mark.parametrize("levels", [17, 240, 252, 253, 254, 300])
def test_metadata_past_the_depth_limit_is_refused_naming_the_limit(levels: int) -> None:
    raw = orjson.dumps(body({}))[: -len(b"{}}")] + nested(levels) + b"}"
    with pytest.raises(DecodeError) as refused:
        decode_intake(raw, max_bytes=MAX_BYTES)
    assert refused.value.reason == "schema"
    assert "deeper than 16 levels (limit)" in refused.value.detail


@pytest.mark.parametrize(
    "raw_metadata",
    [
        b'{"s": "\\ud800"}',  # a lone surrogate: valid JSON escape, not a valid string
        b'{"n": 1e400}',
        b'{"n": ' + b"9" * 500 + b"}",
        b'{"n": -9223372036854775809}',
        b'{"s": "\xff\xfe"}',
    ],
    ids=["lone-surrogate", "float-overflow", "long-int", "int-below-int64", "invalid-utf8"],
)
def test_odd_json_is_refused_or_read_back(raw_metadata: bytes) -> None:
    raw = orjson.dumps(body({}))[: -len(b"{}}")] + raw_metadata + b"}"
    request = intake(raw)
    if request is not None:
        accepted_path(request)


@pytest.mark.parametrize(
    ("value", "limit"),
    [
        ({"k": "x" * (METADATA.max_string_chars + 1)}, "string longer"),
        ({"k" * (METADATA.max_key_chars + 1): 1}, "key longer"),
        ({"l": list(range(METADATA.max_nodes + 1))}, "more than 2000 values"),
        ({"n": 2**63}, "64-bit"),
        ({"n": float("inf")}, "not finite"),
        ({"b": b"bytes"}, "not JSON"),
    ],
)
def test_check_tree_names_the_limit(value: Any, limit: str) -> None:
    with pytest.raises(ValueError, match=limit):
        check_tree(value, METADATA, name="metadata")


def test_check_tree_walks_a_tree_deeper_than_the_interpreter_stack() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(100_000):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(ValueError, match="deeper than 16"):
        check_tree(deep, METADATA, name="metadata")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("constraints", {"capabilities": ["x" * 65]}),
        ("constraints", {"providers": {"deny": ["sim-fast"] * 65}}),
        ("simulate", {"outcomes": {f"p{i}": ["ok"] for i in range(17)}}),
        ("simulate", {"usage": {f"k{i}": 1 for i in range(33)}}),
        ("simulate", {"usage": {"input_tokens": 10**13}}),
    ],
)
def test_every_free_form_field_is_bounded(field: str, value: Any) -> None:
    with pytest.raises(DecodeError) as refused:
        decode_intake(orjson.dumps({**body({}), field: value}), max_bytes=MAX_BYTES)
    assert refused.value.reason == "schema"
