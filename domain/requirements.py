"""What a request needs of a model, derived from the request itself.

Routing sends a job only to targets whose catalogue entry lists every capability the request needs
(`config/catalogue.yaml` names them): the ones it asks for in `constraints.capabilities`, and the
ones its content implies, so that a request is never sent where it cannot be served:

| the request has | needs |
|---|---|
| `tools`, or tool calls / tool messages in its history | `tools` |
| an image content part | `vision` |
| `response_format` `json_object` or `json_schema` | `json_mode` |
| `constraints.capabilities: [...]` | each of them |

Capabilities only route: asking for `json_mode` in `constraints.capabilities` picks a model that
can answer in JSON, it does not make it do so (`response_format` does).
"""

from __future__ import annotations

from domain.chat import ResponseFormatJsonObject, ResponseFormatJsonSchema
from domain.messages import JobRequest

TOOLS = "tools"
VISION = "vision"
JSON_MODE = "json_mode"


def requirement_sources(request: JobRequest) -> dict[str, list[str]]:
    """Each capability the request needs, with what in the request needs it."""
    needs: dict[str, list[str]] = {}

    def need(capability: str, why: str) -> None:
        reasons = needs.setdefault(capability, [])
        if why not in reasons:
            reasons.append(why)

    if request.tools:
        need(TOOLS, "tools")
    if any(m.tool_call_id is not None or m.tool_calls for m in request.messages):
        need(TOOLS, "tool calls in messages")
    if any(m.images() for m in request.messages):
        need(VISION, "image content")
    if isinstance(request.response_format, ResponseFormatJsonObject | ResponseFormatJsonSchema):
        need(JSON_MODE, f"response_format {request.response_format.type}")
    for capability in request.constraints.capabilities:
        need(capability, "constraints.capabilities")
    return {capability: needs[capability] for capability in sorted(needs)}


def required_capabilities(request: JobRequest) -> set[str]:
    """Every capability a target must have to serve the request."""
    return set(requirement_sources(request))
