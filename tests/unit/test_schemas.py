"""The committed JSON Schemas in schemas/ match the models, and example payloads fit both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from domain import schemas
from domain.messages import (
    CancelRequest,
    DeadLetter,
    Dispatch,
    FinalResponse,
    HealthRecord,
    JobEvent,
    JobRequest,
    ProviderCancel,
    ProviderResult,
    WebhookDelivery,
)

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "schemas"
REGENERATE = "schemas/ is out of date: run `python -m domain.schemas` and commit the result"

EXPECTED_FILES: dict[str, type[BaseModel]] = {
    "job_request.v1.json": JobRequest,
    "cancel_request.v1.json": CancelRequest,
    "dispatch.v1.json": Dispatch,
    "provider_cancel.v1.json": ProviderCancel,
    "provider_result.v1.json": ProviderResult,
    "job_event.v1.json": JobEvent,
    "final_response.v1.json": FinalResponse,
    "dead_letter.v1.json": DeadLetter,
    "webhook_delivery.v1.json": WebhookDelivery,
    "health_record.v1.json": HealthRecord,
}

AT = "2026-01-01T00:00:00Z"
REQUEST: dict[str, Any] = {
    "request_id": "r-1",
    "tenant_id": "tenant-a",
    "messages": [{"role": "user", "content": "Say hello."}],
    "constraints": {"capabilities": ["chat"], "max_cost": {"amount": "0.01", "currency": "USD"}},
    "preference": "cost",
    "deadline_ms": 60000,
}
COST: dict[str, Any] = {"amount": "0.0000015", "currency": "USD", "estimated": False}

EXAMPLES: dict[str, dict[str, Any]] = {
    "job_request.v1.json": REQUEST,
    "cancel_request.v1.json": {"type": "cancel", "job_id": "job_x", "reason": "no longer needed"},
    "dispatch.v1.json": {
        "job_id": "job_x",
        "attempt_id": "job_x-a1",
        "attempt_no": 1,
        "provider_attempt_no": 1,
        "tenant_id": "tenant-a",
        "provider": "sim-fast",
        "model": "swift-mini-sim",
        "idempotency_key": "job_x:job_x-a1",
        "request": REQUEST,
        "dispatched_at": AT,
        "timeout_ms": 30000,
    },
    "provider_cancel.v1.json": {
        "job_id": "job_x",
        "attempt_id": "job_x-a1",
        "idempotency_key": "job_x:job_x-a1",
        "reason": "cancelled by client",
    },
    "provider_result.v1.json": {
        "type": "failed",
        "event_id": "ev-1",
        "job_id": "job_x",
        "attempt_id": "job_x-a1",
        "provider": "sim-fast",
        "model": "swift-mini-sim",
        "occurred_at": AT,
        "error": {"kind": "http", "http_status": 429, "retry_after": "3"},
    },
    "job_event.v1.json": {
        "job_id": "job_x",
        "tenant_id": "tenant-a",
        "seq": 1,
        "type": "created",
        "at": AT,
        "state": "CREATED",
        "data": {"request_id": "r-1"},
    },
    "final_response.v1.json": {
        "job_id": "job_x",
        "request_id": "r-1",
        "tenant_id": "tenant-a",
        "state": "COMPLETED",
        "output": {"text": "hello", "finish_reason": "stop"},
        "provider": "sim-fast",
        "model": "swift-mini-sim",
        "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
        "cost": {
            "total": COST,
            "attempts": [
                {
                    "attempt_id": "job_x-a1",
                    "provider": "sim-fast",
                    "model": "swift-mini-sim",
                    "cost": COST,
                }
            ],
        },
        "error": None,
        "attempts": 1,
        "created_at": AT,
        "finished_at": AT,
    },
    "dead_letter.v1.json": {
        "reason": "not_json",
        "detail": "unexpected character",
        "topic": "cp.intake",
        "partition": 0,
        "offset": 42,
        "payload_b64": "e30=",
        "payload_size": 2,
        "at": AT,
    },
}
EXAMPLES["webhook_delivery.v1.json"] = {
    "delivery_id": "whd_job_x",
    "job_id": "job_x",
    "tenant_id": "tenant-a",
    "callback_url": "https://hooks.example.com/jobs",
    "response": EXAMPLES["final_response.v1.json"],
}

EXAMPLES["health_record.v1.json"] = {
    "provider": "sim-cheap",
    "ok": False,
    "latency_ms": 120,
    "at": AT,
    "job_id": "job_x",
    "worker": "http://127.0.0.1:6066",
}


def _load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_every_boundary_message_is_exported() -> None:
    assert set(schemas.MESSAGES.values()) == set(EXPECTED_FILES.values())
    assert set(schemas.schemas()) == set(EXPECTED_FILES)


def test_export_writes_one_file_per_message(tmp_path: Path) -> None:
    written = schemas.export(tmp_path / "out")
    assert sorted(p.name for p in written) == sorted(EXPECTED_FILES)
    assert all(p.parent == tmp_path / "out" for p in written)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(EXPECTED_FILES)


def test_export_is_stable_text(tmp_path: Path) -> None:
    first = {p.name: p.read_text(encoding="utf-8") for p in schemas.export(tmp_path / "a")}
    second = {p.name: p.read_text(encoding="utf-8") for p in schemas.export(tmp_path / "b")}
    assert first == second
    for name, text in first.items():
        assert text.endswith("}\n"), name
        assert not text.endswith("\n\n"), name
        data = json.loads(text)
        assert text == json.dumps(data, indent=2, sort_keys=True) + "\n", name


def test_committed_schemas_match_a_fresh_export(tmp_path: Path) -> None:
    fresh = {p.name: p.read_text(encoding="utf-8") for p in schemas.export(tmp_path)}
    committed_names = sorted(p.name for p in COMMITTED.glob("*.json"))
    assert committed_names == sorted(fresh), REGENERATE
    for name, text in fresh.items():
        assert (COMMITTED / name).read_text(encoding="utf-8") == text, f"{name}: {REGENERATE}"


def test_main_writes_into_the_given_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert schemas.main([str(tmp_path / "cli")]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(EXPECTED_FILES)
    assert "job_request.v1.json" in capsys.readouterr().out


def test_main_defaults_to_schemas_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert schemas.main([]) == 0
    assert sorted(p.name for p in (tmp_path / "schemas").iterdir()) == sorted(EXPECTED_FILES)
    capsys.readouterr()


def test_main_rejects_extra_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert schemas.main(["a", "b"]) == 2
    assert "usage" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_schema_file_names_the_model_and_its_required_fields(name: str) -> None:
    model = EXPECTED_FILES[name]
    schema = _load(COMMITTED / name)
    assert schema["title"] == model.__name__
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False  # extra="forbid" on every message
    required = {
        field.alias or key for key, field in model.model_fields.items() if field.is_required()
    }
    assert set(schema.get("required", [])) == required
    assert set(schema["properties"]) == {
        field.alias or key for key, field in model.model_fields.items()
    }
    assert "schema_version" in schema["properties"]


@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_example_payload_fits_model_and_schema(name: str) -> None:
    model: type[BaseModel] = EXPECTED_FILES[name]
    payload = EXAMPLES[name]
    message = model.model_validate(payload)
    schema = _load(COMMITTED / name)
    # Without a JSON Schema validator installed, check the payload against the schema's surface:
    # every required field present, no field the schema does not declare.
    assert set(schema.get("required", [])) <= set(payload)
    assert set(payload) <= set(schema["properties"])
    # A serialized message validates again and fits the same schema surface.
    dumped = message.model_dump(mode="json")
    assert model.model_validate(dumped) == message
    assert set(dumped) <= set(schema["properties"])


def test_example_with_unknown_field_is_rejected() -> None:
    schema = _load(COMMITTED / "job_event.v1.json")
    payload = {**EXAMPLES["job_event.v1.json"], "surprise": True}
    assert "surprise" not in schema["properties"]
    with pytest.raises(ValidationError):
        JobEvent.model_validate(payload)


def test_money_amounts_are_decimal_strings_in_the_schema() -> None:
    text = (COMMITTED / "final_response.v1.json").read_text(encoding="utf-8")
    schema = json.loads(text)
    cost = schema["$defs"]["Cost"]["properties"]["amount"]
    kinds = json.dumps(cost)
    assert '"string"' in kinds
    response = FinalResponse.model_validate(EXAMPLES["final_response.v1.json"])
    dumped = response.model_dump(mode="json")
    assert dumped["cost"]["total"]["amount"] == "0.0000015"
