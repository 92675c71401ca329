"""A provider that answers from the request's script or from seeded dice, never from the network.

A request's `simulate.outcomes[<provider>]` scripts the attempts on this provider: attempt n gets
the n-th outcome, the last one repeating. Without a script the provider answers "ok", or fails with
the profile's error code at the profile's error rate. Every random choice is drawn from a hash of
(seed, provider name, idempotency key), so re-delivering the same dispatch gives the same answer.

Answers follow the request like a real model's would, without a network: with tools and
`tool_choice` "required" or a named function (or the scripted outcome `tool_call` and any tools),
the answer is one call of that function (else the first tool) with arguments made up from its
schema, `finish_reason` "tool_calls" and no text; with `response_format` `json_object` or
`json_schema` the text is a JSON object (following the schema); otherwise it echoes the prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from domain.chat import ResponseFormatJsonObject, ResponseFormatJsonSchema, Tool
from domain.errors import ErrorCode
from domain.messages import Dispatch, JobRequest, Output, Simulate
from domain.usage import estimate_tokens
from providers.base import (
    Completed,
    Failed,
    NoAnswer,
    Outcome,
    check_dispatch,
    elapsed_ms,
    raw_error,
)

#: Characters of the prompt echoed in a simulated answer.
ECHO_CHARS = 40


@dataclass(frozen=True, slots=True)
class SimulationProfile:
    """Describe how an unscripted simulated model behaves: latency, jitter and error rate."""

    latency_ms: int
    latency_jitter_ms: int
    error_rate: float
    error_code: str = ErrorCode.PROVIDER_INTERNAL.value

    def __post_init__(self) -> None:
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms}")
        if self.latency_jitter_ms < 0:
            raise ValueError(f"latency_jitter_ms must be >= 0, got {self.latency_jitter_ms}")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be within [0, 1], got {self.error_rate}")
        if self.error_code not in {code.value for code in ErrorCode}:
            raise ValueError(f"error_code {self.error_code!r} is not a canonical error code")


@dataclass(frozen=True, slots=True)
class _Dice:
    """Two uniform draws fixed by a dispatch: one decides failure, one the latency jitter."""

    failure: float
    jitter: float

    @classmethod
    def roll(cls, seed: int, provider: str, idempotency_key: str) -> _Dice:
        digest = hashlib.sha256(f"{seed}\x00{provider}\x00{idempotency_key}".encode()).digest()
        scale = float(1 << 64)
        return cls(
            failure=int.from_bytes(digest[0:8], "big") / scale,
            jitter=int.from_bytes(digest[8:16], "big") / scale,
        )


class SimulatedProvider:
    """Answer dispatches from the request's script or from seeded dice, for tests and drills."""

    kind = "simulated"

    def __init__(
        self,
        name: str,
        profile: SimulationProfile,
        seed: int = 0,
        *,
        model_profiles: Mapping[str, SimulationProfile] | None = None,
        hang_margin_ms: int = 1_000,
    ) -> None:
        if hang_margin_ms < 0:
            raise ValueError(f"hang_margin_ms must be >= 0, got {hang_margin_ms}")
        self.name = name
        self._profile = profile
        self._model_profiles = dict(model_profiles or {})
        self._seed = seed
        self._hang_margin_ms = hang_margin_ms
        self._closed = False
        self._closing = asyncio.Event()

    async def call(self, dispatch: Dispatch) -> Outcome:
        """Play one attempt: sleep the simulated latency, then answer, fail or hang."""
        check_dispatch(self.name, self._closed, dispatch)
        started = time.monotonic()
        simulate = dispatch.request.simulate
        profile = self._model_profiles.get(dispatch.model, self._profile)
        dice = _Dice.roll(self._seed, self.name, dispatch.idempotency_key)
        outcome = self._outcome(dispatch, simulate, profile, dice)

        if outcome == "hang":
            await self._hang((dispatch.timeout_ms + self._hang_margin_ms) / 1000)
            return NoAnswer()

        await asyncio.sleep(self._latency_ms(simulate, profile, dice) / 1000)
        if outcome in ("ok", "duplicate", "tool_call"):
            return self._completed(
                dispatch,
                simulate,
                started,
                repeat=2 if outcome == "duplicate" else 1,
                call_tool=outcome == "tool_call",
            )
        return Failed(
            error=raw_error(
                "simulated", f"simulated {outcome} from {self.name}/{dispatch.model}", code=outcome
            ),
            latency_ms=elapsed_ms(started),
        )

    async def close(self) -> None:
        """Refuse further calls and wake any attempt still hanging."""
        self._closed = True
        self._closing.set()

    def _outcome(
        self, dispatch: Dispatch, simulate: Simulate | None, profile: SimulationProfile, dice: _Dice
    ) -> str:
        script = simulate.outcomes.get(self.name) if simulate is not None else None
        if script:
            return script[min(dispatch.provider_attempt_no, len(script)) - 1]
        return profile.error_code if dice.failure < profile.error_rate else "ok"

    @staticmethod
    def _latency_ms(simulate: Simulate | None, profile: SimulationProfile, dice: _Dice) -> int:
        if simulate is not None and simulate.latency_ms is not None:
            return simulate.latency_ms
        jitter = profile.latency_jitter_ms
        offset = min(int(dice.jitter * (2 * jitter + 1)), 2 * jitter) - jitter
        return max(0, profile.latency_ms + offset)

    async def _hang(self, seconds: float) -> None:
        """Sleep like a provider that never answers; cancellable, and cut short by `close`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    def _completed(
        self,
        dispatch: Dispatch,
        simulate: Simulate | None,
        started: float,
        *,
        repeat: int,
        call_tool: bool = False,
    ) -> Completed:
        request = dispatch.request
        prompt = request.prompt_text()
        echo = f"simulated answer from {self.name}/{dispatch.model} to: {prompt[:ECHO_CHARS]}"
        output = _answer(request, echo, dispatch.idempotency_key, call_tool=call_tool)
        text = output.generated_text()
        if simulate is not None and simulate.usage is not None:
            raw_usage: dict[str, Any] = dict(simulate.usage)
            usage_shape = "canonical"
        else:
            prompt_tokens = estimate_tokens(prompt)
            completion_tokens = estimate_tokens(text)
            raw_usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            usage_shape = "openai_chat"
        return Completed(
            output=output,
            raw_usage=raw_usage,
            usage_shape=usage_shape,
            latency_ms=elapsed_ms(started),
            model=dispatch.model,
            repeat=repeat,
        )


def _tool_to_call(request: JobRequest, *, call_tool: bool) -> Tool | None:
    """The tool a simulated answer calls, if it calls one."""
    if not request.tools:
        return None
    choice = request.tool_choice
    if choice is not None and not isinstance(choice, str):
        return next(t for t in request.tools if t.function.name == choice.function.name)
    if choice == "required" or (call_tool and choice != "none"):
        return request.tools[0]
    return None


def _answer(request: JobRequest, echo: str, key: str, *, call_tool: bool) -> Output:
    """What a simulated model answers: a tool call, JSON, or an echo of the prompt."""
    tool = _tool_to_call(request, call_tool=call_tool)
    if tool is not None:
        arguments = example_value(tool.function.parameters or {"type": "object"})
        call_id = "call_" + hashlib.sha256(key.encode()).hexdigest()[:24]
        return Output(
            text="",
            finish_reason="tool_calls",
            provider_finish_reason="tool_calls",
            tool_calls=[
                {
                    "id": call_id,
                    "function": {
                        "name": tool.function.name,
                        "arguments": orjson.dumps(arguments).decode(),
                    },
                }
            ],
        )
    fmt = request.response_format
    if isinstance(fmt, ResponseFormatJsonSchema):
        text = orjson.dumps(example_value(fmt.json_schema.schema_)).decode()
    elif isinstance(fmt, ResponseFormatJsonObject):
        text = orjson.dumps({"answer": echo}).decode()
    else:
        text = echo
    return Output(text=text, finish_reason="stop", provider_finish_reason="stop")


def example_value(schema: Any, depth: int = 0) -> Any:
    """A small value that follows a JSON Schema's common keywords (enum, const, type, required)."""
    if not isinstance(schema, dict) or depth > 8:
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return example_value(schema[key][0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        return {name: example_value(sub, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        return []
    if kind == "string":
        return "simulated"
    if kind == "integer":
        return 0
    if kind == "number":
        return 0.0
    if kind == "boolean":
        return False
    return None
