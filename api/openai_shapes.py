"""The OpenAI Chat Completions shapes of the front door (api/openai_front.py), without the app.

Pure functions from an OpenAI request body to a canonical `JobRequest`, from a `FinalResponse` to
a `ChatCompletion` or an OpenAI error, and the catalogue as OpenAI's model list, so that each is
testable without a worker. Errors are OpenAI's `{"error": {message, type, param, code}}` shape:
OpenAI clients (the official SDK first) parse that, not problem+json.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from api.problems import Problem
from domain.catalogue import Catalogue
from domain.messages import FinalResponse, JobRequest

#: The model id that lets the routing policy choose (no pin).
AUTO_MODEL = "auto"
#: Who "owns" the `auto` model in the model list.
GATEWAY = "prompt-gateway"
#: Default and longest wait for a completion's final response (seconds, `?wait=N`).
DEFAULT_WAIT_S = 60.0
MIN_WAIT_S = 1.0
MAX_WAIT_S = 300.0
#: Response headers naming the job a completion ran as.
JOB_ID_HEADER = "X-Job-Id"
#: A non-standard header the official SDKs obey: "false" stops their automatic retries.
SHOULD_RETRY_HEADER = "x-should-retry"

_IDENTIFIER = re.compile(r"^[A-Za-z0-9._:@/\-]{1,128}$")


class OpenAIError(Exception):
    """Raise from a /v1 view to answer with an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        code: str | None = None,
        param: str | None = None,
        job_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or error_type(status)
        self.code = code
        self.param = param
        self.job_id = job_id
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        if self.job_id is not None:
            error["job_id"] = self.job_id
        return {"error": error}

    def response(self) -> web.Response:
        headers = dict(self.headers)
        if self.job_id is not None:
            headers.update(job_headers(self.job_id))
        return web.Response(
            status=self.status,
            body=orjson.dumps(self.body()),
            content_type="application/json",
            headers=headers,
        )


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        405: "invalid_request_error",
        409: "conflict_error",
        410: "not_found_error",
        413: "invalid_request_error",
        415: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")


def from_problem(problem: Problem) -> OpenAIError:
    """The same answer (status, headers, message) in OpenAI's shape."""
    job_id = problem.extra.get("job_id")
    # The shared helpers answer bad input with 422; OpenAI answers it with 400.
    status = 400 if problem.status == 422 else problem.status
    return OpenAIError(
        status,
        problem.detail,
        code=problem.kind.replace("-", "_"),
        job_id=job_id if isinstance(job_id, str) else None,
        headers=problem.headers,
    )


def job_headers(job_id: str) -> dict[str, str]:
    """Where a completion's job can be read: its id (also as the SDK's request id) and URL."""
    return {JOB_ID_HEADER: job_id, "X-Request-Id": job_id, "Location": f"/jobs/{job_id}"}


# -- request ---------------------------------------------------------------------------------------


def request_id_for(idempotency_key: str) -> str:
    """A client's Idempotency-Key as a request_id: itself when it is an identifier, else a hash."""
    if _IDENTIFIER.match(idempotency_key):
        return idempotency_key
    return "idem-" + hashlib.sha256(idempotency_key.encode("utf-8", "surrogateescape")).hexdigest()


def wait_seconds(raw: str | None) -> float:
    """The `?wait=N` of a completion: how long it waits for the job's final response."""
    if raw is None:
        return DEFAULT_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not MIN_WAIT_S <= value <= MAX_WAIT_S:
        raise OpenAIError(
            400,
            f"wait must be a number of seconds between {MIN_WAIT_S:g} and {MAX_WAIT_S:g}",
            param="wait",
            code="invalid_wait",
        )
    return value


#: OpenAI parameters whose value maps to a JobRequest field of the same name.
_SAME_NAME = ("temperature", "top_p", "seed", "stop", "tools", "tool_choice", "response_format")
#: The gateway's own parameters (send them with the SDK's `extra_body`).
_EXTENSIONS = ("simulate", "preference", "constraints", "deadline_ms", "attempt_timeout_ms")
#: OpenAI parameters accepted only at a value that changes nothing here (None is always fine).
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v == 1 and not isinstance(v, bool),
    "stream": lambda v: v is False,
    "presence_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "frequency_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "logprobs": lambda v: v is False,
    "parallel_tool_calls": lambda v: isinstance(v, bool),
    "store": lambda v: v is False,
    "service_tier": lambda v: v in ("auto", "default"),
    "logit_bias": lambda v: v == {},
    # A caching hint: providers that support it key their cache on it; the answer is the same.
    "prompt_cache_key": lambda v: isinstance(v, str),
}
#: Where a JobRequest field came from in the OpenAI body, to name it in errors.
_PARAM_OF = {"max_output_tokens": "max_tokens", "model": "model"}


def job_request(
    data: Mapping[str, Any],
    *,
    tenant: str,
    request_id: str,
    catalogue: Catalogue,
    unavailable: Collection[str] = (),
) -> JobRequest:
    """Map an OpenAI chat completion request to the canonical job request (OpenAIError if not).

    `unavailable` names enabled providers this worker cannot route to (no API key).
    """
    given = {k: v for k, v in data.items() if v is not None}  # null means "not given" in OpenAI
    if given.get("stream") is True:
        raise OpenAIError(
            400,
            "stream=true is not supported: this gateway answers chat completions whole "
            "(leave stream out or false)",
            param="stream",
            code="stream_not_supported",
        )
    if "n" in given and not _NEUTRAL["n"](given["n"]):
        raise OpenAIError(400, "n must be 1: one choice per completion", param="n", code="n")
    unknown = sorted(
        k
        for k in given
        if k not in _SAME_NAME
        and k not in _EXTENSIONS
        and k not in _NEUTRAL
        and k
        not in (
            "messages",
            "model",
            "models",
            "max_tokens",
            "max_completion_tokens",
            "metadata",
            "user",
            "safety_identifier",
        )
    )
    if unknown:
        raise OpenAIError(
            400,
            f"unrecognized request argument supplied: {unknown[0]}",
            param=unknown[0],
            code="unknown_parameter",
        )
    for name, neutral in _NEUTRAL.items():
        if name in given and not neutral(given[name]):
            raise OpenAIError(
                400,
                f"{name}={given[name]!r} is not supported by this gateway",
                param=name,
                code="unsupported_parameter",
            )
    if "model" not in given:
        raise OpenAIError(400, "you must provide a model parameter", param="model", code=None)
    pins = [_pin(given["model"], catalogue, "model", unavailable)]
    extra = given.get("models")
    if extra is not None:
        if not isinstance(extra, list) or not extra:
            raise OpenAIError(400, "models must be a non-empty list of model ids", param="models")
        pins += [
            _pin(value, catalogue, f"models[{i}]", unavailable) for i, value in enumerate(extra)
        ]
    chosen = list(dict.fromkeys(p for p in pins if p is not None))

    job: dict[str, Any] = {"request_id": request_id, "tenant_id": tenant}
    messages = given.get("messages")
    job["messages"] = (
        [_message(m) for m in messages] if isinstance(messages, list) else messages or []
    )
    if chosen:
        job["model"] = chosen[0] if len(chosen) == 1 else chosen
    tokens = given.get("max_completion_tokens", given.get("max_tokens"))
    if tokens is not None:
        job["max_output_tokens"] = tokens
    for name in (*_SAME_NAME, *_EXTENSIONS):
        if name in given:
            job[name] = given[name]
    user = given.get("user", given.get("safety_identifier"))
    if user is not None:
        job["user"] = user
    if "metadata" in given:
        job["metadata"] = given["metadata"]
    try:
        return JobRequest.model_validate(job)
    except ValidationError as exc:
        raise invalid(exc, tokens_param=_tokens_param(given)) from None


def _tokens_param(given: Mapping[str, Any]) -> str:
    return "max_completion_tokens" if "max_completion_tokens" in given else "max_tokens"


def _message(message: Any) -> Any:
    """An OpenAI message as a canonical ChatMessage dict (validation says what is wrong)."""
    if not isinstance(message, dict):
        return message
    out = {k: v for k, v in message.items() if v is not None}
    if out.get("role") == "developer":  # OpenAI's newer name for the system role
        out["role"] = "system"
    if out.get("role") == "assistant" and "content" not in out and out.get("tool_calls"):
        out["content"] = ""  # an assistant turn that only called tools
    return out


def _pin(
    value: Any, catalogue: Catalogue, param: str, unavailable: Collection[str] = ()
) -> str | None:
    """A requested model id as a pin (None for `auto`); an id no target answers to is a 404."""
    if not isinstance(value, str) or not value:
        raise OpenAIError(400, f"{param} must be a model id string", param=param)
    if value == AUTO_MODEL:
        return None
    matches = [(p, m) for p, m in catalogue.targets() if value in (m.name, f"{p.name}/{m.name}")]
    if not matches:
        raise OpenAIError(
            404,
            f"The model `{value}` does not exist on this gateway; GET /v1/models lists the "
            f"models it serves (or use `{AUTO_MODEL}` to let the routing policy choose)",
            param=param,
            code="model_not_found",
        )
    if not any(_serves(p.name, p.enabled, unavailable) for p, _ in matches):
        why = (
            "is disabled" if not any(p.enabled for p, _ in matches) else "has no API key configured"
        )
        raise OpenAIError(
            404,
            f"The model `{value}` is in the catalogue but its provider {why} on this gateway; "
            "GET /v1/models lists the models it serves",
            param=param,
            code="model_not_found",
        )
    return value


def _serves(provider: str, enabled: bool, unavailable: Collection[str]) -> bool:
    return enabled and provider not in unavailable


def invalid(exc: ValidationError, *, tokens_param: str = "max_tokens") -> OpenAIError:
    """A 400 naming the first invalid parameter as the client sent it, every error in the text."""
    problems = []
    params = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        params.append(_param(loc, tokens_param))
        problems.append(f"{params[-1] or 'body'}: {error['msg'].removeprefix('Value error, ')}")
    shown = "; ".join(problems[:5]) + (
        f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    )
    return OpenAIError(
        400, f"invalid request: {shown}", param=params[0] if params else None, code="invalid_value"
    )


def _param(loc: list[str], tokens_param: str) -> str | None:
    if not loc:
        return None
    head = {"max_output_tokens": tokens_param}.get(loc[0], loc[0])
    if head == "messages" and len(loc) > 1 and loc[1].isdigit():
        field = f".{loc[2]}" if len(loc) > 2 and loc[2].isidentifier() else ""
        return f"messages[{loc[1]}]{field}"
    return head


# -- responses -------------------------------------------------------------------------------------


def served_model(final: FinalResponse) -> str | None:
    """The model that answered, as a model id of the list: "<provider>/<model>"."""
    if final.provider and final.model:
        return f"{final.provider}/{final.model}"
    return final.model


def completion_body(final: FinalResponse) -> dict[str, Any]:
    """A COMPLETED job's final response as an OpenAI ChatCompletion."""
    output = final.output
    text = output.text if output is not None else ""
    tool_calls = [call.model_dump(mode="json") for call in output.tool_calls] if output else []
    refusal = output.refusal if output is not None else None
    message: dict[str, Any] = {
        "role": "assistant",
        # OpenAI sends null content for an answer that is only tool calls or a refusal.
        "content": None if not text and (tool_calls or refusal) else text,
        "refusal": refusal,
        "annotations": [],
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    finish = output.finish_reason if output is not None else None
    usage = final.usage
    return {
        "id": f"chatcmpl-{final.job_id}",
        "object": "chat.completion",
        "created": int(final.created_at.timestamp()),
        "model": served_model(final) or AUTO_MODEL,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish or ("tool_calls" if tool_calls else "stop"),
                "logprobs": None,
            }
        ],
        "usage": None
        if usage is None
        else {
            "prompt_tokens": usage.input_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens},
            "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        },
        "system_fingerprint": None,
    }


#: Canonical error code of a failed job -> (HTTP status, OpenAI error type).
_FAILURES: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"),
    "context_length_exceeded": (400, "invalid_request_error"),
    "content_filtered": (400, "invalid_request_error"),
    "no_eligible_target": (400, "invalid_request_error"),
    "request_too_large": (413, "invalid_request_error"),
    "quota_exhausted": (429, "insufficient_quota"),
    "rate_limited": (429, "rate_limit_error"),
    "cancelled": (409, "cancelled"),
    "overloaded": (503, "overloaded_error"),
    "timeout": (504, "timeout_error"),
    "deadline_exceeded": (504, "timeout_error"),
    # The gateway's own credentials, entitlement or catalogue at the provider: not the client's.
    "authentication": (502, "upstream_error"),
    "permission_denied": (502, "upstream_error"),
    "model_not_found": (502, "upstream_error"),
    "provider_internal": (502, "upstream_error"),
    "connection_error": (502, "upstream_error"),
    "malformed_response": (502, "upstream_error"),
    "dispatch_failed": (500, "server_error"),
    "internal": (500, "server_error"),
}


def failure(final: FinalResponse, *, idempotent: bool) -> OpenAIError:
    """A job that ended without an answer (FAILED, EXPIRED, CANCELLED) as an OpenAI error."""
    error = final.error
    code = error.code.value if error is not None else "internal"
    status, type_ = _FAILURES.get(code, (502, "upstream_error"))
    reason = error.message if error is not None else "no error recorded"
    headers: dict[str, str] = {}
    if error is not None and error.retry_after_s is not None and status == 429:
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    # The job already had its retries and fallbacks. Sent again with the same key it is the same
    # (failed) job, so an SDK retry cannot help; without a key a retry is a new job, worth it only
    # when the error may pass.
    retry = not idempotent and error is not None and error.retryable
    headers[SHOULD_RETRY_HEADER] = "true" if retry else "false"
    return OpenAIError(
        status,
        f"job {final.job_id} {final.state.lower()}: {code}: {reason} "
        f"(its attempts and timeline: GET /jobs/{final.job_id})",
        type_=type_,
        code=code,
        job_id=final.job_id,
        headers=headers,
    )


def still_running(job_id: str, state: str, waited_s: float, *, idempotent: bool) -> OpenAIError:
    """The job outlived the wait: 504 naming the job to poll.

    With an Idempotency-Key a retry joins the same job and waits again, so the SDK may retry;
    without one a retry would start a second job, so it must not.
    """
    again = (
        "; the same request with the same Idempotency-Key waits for it again"
        if idempotent
        else "; send an Idempotency-Key to make a retry wait for this job instead of starting one"
    )
    return OpenAIError(
        504,
        f"job {job_id} is still running (state {state}) after {waited_s:g} s; "
        f"poll GET /jobs/{job_id}/result{again}",
        type_="timeout_error",
        code="job_still_running",
        job_id=job_id,
        headers={SHOULD_RETRY_HEADER: "true" if idempotent else "false"},
    )


def model_list(catalogue: Catalogue, unavailable: Collection[str] = ()) -> dict[str, Any]:
    """OpenAI's model list: `auto`, then every target routing may choose here."""
    data = [model_object(AUTO_MODEL, GATEWAY)]
    data += [
        model_object(f"{spec.name}/{model.name}", spec.name)
        for spec, model in catalogue.targets()
        if _serves(spec.name, spec.enabled, unavailable)
    ]
    return {"object": "list", "data": data}


def model_object(model_id: str, owner: str) -> dict[str, Any]:
    # The catalogue has no creation dates: 0 says so (clients only display it).
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owner}


def find_model(
    model_id: str, catalogue: Catalogue, unavailable: Collection[str] = ()
) -> dict[str, Any]:
    """One model of the list by id (a bare model name too); 404 when there is none."""
    pin = _pin(model_id, catalogue, "model", unavailable)
    if pin is None:
        return model_object(AUTO_MODEL, GATEWAY)
    owner = next(
        p.name
        for p, m in catalogue.targets()
        if _serves(p.name, p.enabled, unavailable) and pin in (m.name, f"{p.name}/{m.name}")
    )
    return model_object(pin, owner)
