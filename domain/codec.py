"""Parse raw bytes into canonical messages: the one place JSON meets the models.

Old schema versions are upcast dict -> dict before validation. Every failure is a `DecodeError`
carrying a stable reason, so agents can dead-letter it instead of crashing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from domain.commands import Command
from domain.messages import CancelRequest, JobRequest, ProviderResult

M = TypeVar("M", bound=BaseModel)

#: Upcasters per message kind: from schema version N to N+1. Version 1 is current everywhere.
UPCASTERS: dict[str, dict[int, Callable[[dict[str, Any]], dict[str, Any]]]] = {}
CURRENT_VERSION = 1


class DecodeError(ValueError):
    """A record that cannot become a message; `reason` is a stable dead-letter reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def load_json(payload: bytes | None, *, max_bytes: int | None = None) -> dict[str, Any]:
    if payload is None:
        raise DecodeError("empty", "record has no value")
    if max_bytes is not None and len(payload) > max_bytes:
        raise DecodeError("oversize", f"{len(payload)} bytes is over the limit of {max_bytes}")
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("not_json", str(exc)) from None
    if not isinstance(data, dict):
        raise DecodeError("schema", f"expected a JSON object, got {type(data).__name__}")
    return data


def upcast(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    version = data.get("schema_version", CURRENT_VERSION)
    if not isinstance(version, int) or version < 1:
        raise DecodeError("schema", f"schema_version must be a positive integer, got {version!r}")
    if version > CURRENT_VERSION:
        raise DecodeError("schema", f"schema_version {version} is newer than this worker knows")
    steps = UPCASTERS.get(kind, {})
    while version < CURRENT_VERSION:
        if version not in steps:
            raise DecodeError("schema", f"no upcaster for {kind} version {version}")
        data = steps[version](data)
        version += 1
    data["schema_version"] = CURRENT_VERSION
    return data


def validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise DecodeError("schema", _summary(exc)) from None


def _summary(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:8]:
        where = ".".join(str(p) for p in error["loc"]) or "(root)"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def field_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Render validation errors for API clients: location, message, type."""
    return [
        {"loc": [str(p) for p in error["loc"]], "msg": error["msg"], "type": error["type"]}
        for error in exc.errors()
    ]


def decode_intake(payload: bytes | None, *, max_bytes: int) -> JobRequest | CancelRequest:
    """Parse a `cp.intake` record: a job request, or a cancel request when `type` is cancel."""
    data = load_json(payload, max_bytes=max_bytes)
    if data.get("type") == "cancel":
        return validate(CancelRequest, upcast("cancel_request", data))
    return validate(JobRequest, upcast("job_request", data))


def decode_result(payload: bytes | None, *, max_bytes: int) -> ProviderResult:
    return validate(
        ProviderResult, upcast("provider_result", load_json(payload, max_bytes=max_bytes))
    )


_COMMAND: TypeAdapter[Command] = TypeAdapter(Command)


def decode_command(payload: bytes | None) -> Command:
    data = load_json(payload)
    try:
        return _COMMAND.validate_python(upcast("command", data))
    except ValidationError as exc:
        raise DecodeError("schema", _summary(exc)) from None


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode()
