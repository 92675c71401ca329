"""The OpenAI-compatible front door's part of the OpenAPI document (api/openapi.py merges it)."""

from __future__ import annotations

from typing import Any

from api.openai_shapes import AUTO_MODEL, DEFAULT_WAIT_S, MAX_WAIT_S, MIN_WAIT_S

REF = "#/components/schemas/{model}"

_NULLABLE_STRING = {"type": ["string", "null"]}
_OBJECT = {"type": "object"}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": _NULLABLE_STRING,
                "code": _NULLABLE_STRING,
                "job_id": {"type": "string", "description": "the job the request ran as"},
            },
        }
    },
}
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": _OBJECT},
                {"type": "null"},
            ]
        },
        "tool_call_id": {"type": "string"},
        "tool_calls": {"type": "array", "items": _OBJECT},
    },
}
_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "description": "OpenAI's chat completion request (non-streaming). Parameters the gateway "
    "cannot honour are a 400 naming them, unless their value changes nothing (n=1, "
    "presence_penalty=0...). `models`, `preference` and `constraints` are the gateway's own.",
    "properties": {
        "model": {
            "type": "string",
            "minLength": 1,
            "description": f"`{AUTO_MODEL}` (the routing policy chooses), `<provider>/<model>` "
            "or `<model>`: see GET /v1/models; an unknown model is a 404",
        },
        "models": {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "minItems": 1,
            "description": "more models to fall back to, in order, after `model`",
        },
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        "max_tokens": {"type": ["integer", "null"], "minimum": 1},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "seed": {"type": ["integer", "null"]},
        "stop": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                {"type": "null"},
            ]
        },
        "tools": {"type": "array", "items": _OBJECT},
        "tool_choice": {"anyOf": [{"type": "string"}, _OBJECT]},
        "response_format": _OBJECT,
        "user": {"type": "string"},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "stream": {"type": "boolean", "description": "only false: no streaming"},
        "n": {"type": "integer", "description": "only 1"},
        "preference": {"type": "string", "enum": ["cost", "latency", "reliability", "balanced"]},
        "constraints": {"$ref": REF.format(model="Constraints")},
    },
}
_USAGE = {
    "type": ["object", "null"],
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "prompt_tokens_details": _OBJECT,
        "completion_tokens_details": _OBJECT,
    },
}
_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string", "description": "chatcmpl-<job_id>"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string", "description": "the <provider>/<model> that answered"},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason"],
                "properties": {
                    "index": {"type": "integer"},
                    "message": {
                        "type": "object",
                        "required": ["role"],
                        "properties": {
                            "role": {"const": "assistant"},
                            "content": _NULLABLE_STRING,
                            "refusal": _NULLABLE_STRING,
                            "tool_calls": {"type": "array", "items": _OBJECT},
                            "annotations": {"type": "array"},
                        },
                    },
                    "finish_reason": {"type": "string"},
                    "logprobs": {"type": "null"},
                },
            },
        },
        "usage": _USAGE,
        "system_fingerprint": _NULLABLE_STRING,
    },
}
_MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
}
_MODEL_LIST = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": {"$ref": REF.format(model="OpenAIModel")}},
    },
}

_TITLES = {
    400: "Invalid request (the parameter is named in `param`)",
    401: "No or unknown API key",
    404: "Unknown model (`model_not_found`)",
    409: "Idempotency-Key already used with another request",
    410: "The job of this Idempotency-Key left the store",
    413: "Body too large",
    415: "Not application/json",
    429: "Rate limited or out of quota at every provider tried",
    500: "Server error",
    502: "The providers failed",
    503: "Rebalancing (retry after Retry-After) or providers overloaded",
    504: "The job is still running after the wait (`job_still_running`), or timed out",
}


def _errors(*codes: int) -> dict[str, Any]:
    return {
        str(code): {
            "description": _TITLES[code],
            "content": {"application/json": {"schema": {"$ref": REF.format(model="OpenAIError")}}},
        }
        for code in codes
    }


def _ok(schema: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=schema)}}},
    }
    if headers:
        answer["headers"] = headers
    return answer


def openai_schemas() -> dict[str, Any]:
    return {
        "ChatCompletionRequest": _REQUEST,
        "ChatCompletion": _COMPLETION,
        "OpenAIModel": _MODEL,
        "OpenAIModelList": _MODEL_LIST,
        "OpenAIError": _ERROR,
    }


def openai_paths() -> dict[str, Any]:
    job_id_header = {
        "X-Job-Id": {"description": "the job the completion ran as", "schema": {"type": "string"}}
    }
    return {
        "/v1/chat/completions": {
            "post": {
                "summary": "OpenAI-compatible chat completion (non-streaming), run as a job",
                "description": "Submits a job and waits for its final response. Errors are "
                "OpenAI's {error: {message, type, param, code}}, with the job id in X-Job-Id.",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "names the job: the same key and body is the same job",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                    },
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "description": f"seconds to wait for the answer (default "
                        f"{DEFAULT_WAIT_S:g}); a longer job is a 504 naming it",
                        "schema": {"type": "number", "minimum": MIN_WAIT_S, "maximum": MAX_WAIT_S},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": REF.format(model="ChatCompletionRequest")},
                            "example": {
                                "model": AUTO_MODEL,
                                "messages": [{"role": "user", "content": "Say hello"}],
                            },
                        }
                    },
                },
                "responses": {
                    "200": _ok("ChatCompletion", "The answer", job_id_header),
                    **_errors(400, 401, 404, 409, 410, 413, 415, 429, 500, 502, 503, 504),
                },
            }
        },
        "/v1/models": {
            "get": {
                "summary": "OpenAI-compatible model list: `auto` and every <provider>/<model>",
                "responses": {
                    "200": _ok("OpenAIModelList", "The models"),
                    **_errors(401),
                },
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "One model of the list",
                "parameters": [
                    {
                        "name": "model",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1},
                    }
                ],
                "responses": {
                    "200": _ok("OpenAIModel", "The model"),
                    **_errors(400, 401, 404),
                },
            }
        },
    }
