"""The OpenAPI 3.1 document of the HTTP API, with schemas generated from the canonical models."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel

from api.openai_openapi import openai_paths, openai_schemas
from domain.messages import FinalResponse, JobEvent, JobRequest

REF = "#/components/schemas/{model}"


def _schemas(*models: type[BaseModel], mode: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


_PROBLEM = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
}
_LINKS = {"type": "object", "additionalProperties": {"type": "string"}}
_ACCEPTED = {
    "type": "object",
    "required": ["job_id", "state", "links"],
    "properties": {
        "job_id": {"type": "string"},
        "state": {"type": "string"},
        "created": {"type": "boolean"},
        "final": {"type": "boolean"},
        "cancel_requested": {"type": "boolean"},
        "links": _LINKS,
    },
}
_STATUS = {
    "type": "object",
    "required": ["job_id", "request_id", "tenant_id", "state", "attempts", "transitions", "links"],
    "properties": {
        "job_id": {"type": "string"},
        "request_id": {"type": "string"},
        "tenant_id": {"type": "string"},
        "state": {"type": "string"},
        "terminal": {"type": "boolean"},
        "created_at": {"type": "string"},
        "updated_at": {"type": "string"},
        "deadline_at": {"type": ["string", "null"]},
        "transitions": {"type": "object", "additionalProperties": {"type": "string"}},
        "attempts": {"type": "array", "items": {"type": "object"}},
        "routing": {"type": ["object", "null"]},
        "error": {"type": ["object", "null"]},
        "links": _LINKS,
    },
}
_EVENTS = {
    "type": "object",
    "required": ["job_id", "state", "events", "last_seq"],
    "properties": {
        "job_id": {"type": "string"},
        "state": {"type": "string"},
        "events": {"type": "array", "items": {"$ref": REF.format(model="JobEvent")}},
        "last_seq": {"type": "integer"},
        "ignored_events": {"type": "integer"},
    },
}


_LIST = {
    "type": "object",
    "required": ["items", "next_cursor"],
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["job_id", "request_id", "state", "created_at", "updated_at", "links"],
                "properties": {
                    "job_id": {"type": "string"},
                    "request_id": {"type": "string"},
                    "state": {"type": "string"},
                    "terminal": {"type": "boolean"},
                    "created_at": {"type": "string"},
                    "updated_at": {"type": "string"},
                    "provider": {"type": ["string", "null"]},
                    "model": {"type": ["string", "null"]},
                    "links": _LINKS,
                },
            },
        },
        "next_cursor": {"type": ["string", "null"]},
    },
}
_LIST_PARAMS = [
    {
        "name": "state",
        "in": "query",
        "required": False,
        "description": "A job state, `open` or `terminal`; several comma-separated",
        "schema": {"type": "string"},
    },
    {
        "name": "since",
        "in": "query",
        "required": False,
        "description": "created_at at or after this RFC 3339 time",
        "schema": {"type": "string", "format": "date-time"},
    },
    {
        "name": "until",
        "in": "query",
        "required": False,
        "description": "created_at before this RFC 3339 time",
        "schema": {"type": "string", "format": "date-time"},
    },
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
    },
    {
        "name": "cursor",
        "in": "query",
        "required": False,
        "description": "next_cursor of the previous page",
        "schema": {"type": "string"},
    },
]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problems(*codes: int) -> dict[str, Any]:
    titles = {
        401: "No or unknown API key",
        403: "Expired or invalid signed link",
        404: "No such job for this tenant",
        409: "Conflict",
        413: "Body too large",
        415: "Not application/json",
        422: "Invalid input",
        500: "Server error",
        503: "Rebalancing: retry after the Retry-After header",
    }
    return {
        str(code): {
            "description": titles[code],
            "content": {
                "application/problem+json": {"schema": {"$ref": REF.format(model="Problem")}}
            },
        }
        for code in codes
    }


_JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": 128},
}


@cache
def openapi_document() -> dict[str, Any]:
    """Build the document once per process."""
    schemas = _schemas(JobRequest, mode="validation")
    # Over HTTP the tenant comes from the API key: the body must not name one.
    request_schema = schemas["JobRequest"]
    request_schema["properties"].pop("tenant_id", None)
    request_schema["description"] = (
        "A canonical job request. Over HTTP the tenant is the API key's: leave tenant_id out."
    )
    schemas.update(_schemas(FinalResponse, JobEvent, mode="serialization"))
    schemas.update(
        Problem=_PROBLEM,
        Accepted=_ACCEPTED,
        JobStatusView=_STATUS,
        JobEventsView=_EVENTS,
        JobListView=_LIST,
    )
    schemas.update(openai_schemas())
    ref = REF.format
    read = _problems(401, 404, 422, 500, 503)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Prompt Gateway control plane",
            "version": "1",
            "description": "Submit prompt jobs, read their status, final result and timeline.",
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/jobs": {
                "get": {
                    "summary": "The caller's jobs, newest first, from every partition",
                    "description": "Pages of `limit` job summaries; pass `next_cursor` as "
                    "`cursor` for the next page (null on the last). A partition no worker "
                    "serves right now answers 503 with `missing_partitions`, never a page "
                    "with a gap. Retired jobs are not listed.",
                    "parameters": _LIST_PARAMS,
                    "responses": {
                        "200": _json({"$ref": ref(model="JobListView")}, "A page"),
                        **_problems(401, 422, 500, 503),
                    },
                },
                "post": {
                    "summary": "Submit a job (tenant from the API key)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": ref(model="JobRequest")}}
                        },
                    },
                    "responses": {
                        "202": _json({"$ref": ref(model="Accepted")}, "Accepted (or the same job)"),
                        **_problems(401, 409, 413, 415, 422, 500, 503),
                    },
                },
            },
            "/jobs/by-request/{request_id}": {
                "get": {
                    "summary": "The status of the caller's job for a request_id",
                    "description": "The job id is derived from (tenant, request_id): what a "
                    "Kafka producer, given no job id, reads its job by. The same answers as "
                    "GET /jobs/{job_id}: 410 once the job retired.",
                    "parameters": [
                        {
                            "name": "request_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 128},
                        }
                    ],
                    "responses": {
                        "200": _json({"$ref": ref(model="JobStatusView")}, "Status"),
                        **read,
                    },
                }
            },
            "/jobs/{job_id}": {
                "get": {
                    "summary": "Job status, transitions, attempts and routing",
                    "description": "`links.timeline_signed` is a short-lived link to the timeline "
                    "page that needs no API key (CP_LINK_TTL_S).",
                    "parameters": [_JOB_ID],
                    "responses": {
                        "200": _json({"$ref": ref(model="JobStatusView")}, "Status"),
                        **read,
                    },
                }
            },
            "/jobs/{job_id}/result": {
                "get": {
                    "summary": "The final canonical response; 202 while not final",
                    "parameters": [
                        _JOB_ID,
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "number", "minimum": 0, "maximum": 30},
                        },
                    ],
                    "responses": {
                        "200": _json({"$ref": ref(model="FinalResponse")}, "Final response"),
                        "202": _json({"$ref": ref(model="Accepted")}, "Not final yet"),
                        **read,
                    },
                }
            },
            "/jobs/{job_id}/events": {
                "get": {
                    "summary": "The job's immutable timeline, ordered by seq",
                    "parameters": [
                        _JOB_ID,
                        {
                            "name": "after",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 0},
                        },
                    ],
                    "responses": {
                        "200": _json({"$ref": ref(model="JobEventsView")}, "Events"),
                        **read,
                    },
                }
            },
            "/jobs/{job_id}/timeline": {
                "get": {
                    "summary": "The timeline as a self-contained HTML page",
                    "description": "Send the API key as a bearer header, or open the "
                    "short-lived signed link `links.timeline_signed` of GET /jobs/{job_id} (no key "
                    "in the URL); an expired or invalid link is 403.",
                    "parameters": [
                        _JOB_ID,
                        {
                            "name": "exp",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"},
                        },
                        {
                            "name": "sig",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "The page",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        },
                        **read,
                        **_problems(403),
                    },
                }
            },
            "/jobs/{job_id}/cancel": {
                "post": {
                    "summary": "Cancel a job that is not final",
                    "parameters": [_JOB_ID],
                    "responses": {
                        "202": _json({"$ref": ref(model="Accepted")}, "Cancel requested"),
                        **_problems(401, 404, 409, 500, 503),
                    },
                }
            },
            "/providers": {
                "get": {
                    "summary": "The catalogue with live provider health",
                    "responses": {"200": _json({"type": "object"}, "Providers"), **_problems(401)},
                }
            },
            "/healthz": {
                "get": {
                    "summary": "The process is up",
                    "security": [],
                    "responses": {"200": _json({"type": "object"}, "Up")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Broker reachable, partitions assigned, tables recovered",
                    "security": [],
                    "responses": {
                        "200": _json({"type": "object"}, "Ready"),
                        "503": _json({"type": "object"}, "Not ready"),
                    },
                }
            },
            **openai_paths(),
        },
    }
