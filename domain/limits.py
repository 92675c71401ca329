"""Bounds on the free-form parts of what crosses the boundary (request metadata, raw usage).

What the control plane accepts it must be able to store, read back and render: a JSON tree nested
deeper than the state codec can read, or an integer it cannot write, is refused at the door with
the limit named, never discovered later as an unreadable job. The walk is iterative, so a tree
deep enough to exhaust the interpreter's stack is refused like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

#: The JSON integers every codec of the pipeline reads and writes exactly (signed 64-bit).
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True, slots=True)
class TreeLimits:
    """How big one free-form JSON value may be."""

    max_depth: int
    max_nodes: int
    max_key_chars: int
    max_string_chars: int
    #: The value as compact JSON: it is echoed in messages that have a size limit of their own.
    max_bytes: int


#: `metadata` of a job request: echoed in the final response and kept with the job.
METADATA = TreeLimits(
    max_depth=16, max_nodes=2_000, max_key_chars=256, max_string_chars=16_384, max_bytes=65_536
)
#: `raw_usage` of a provider result: a provider's usage object, normalized by domain.usage.
RAW_USAGE = TreeLimits(
    max_depth=8, max_nodes=500, max_key_chars=128, max_string_chars=1_024, max_bytes=16_384
)
#: A JSON Schema in a request: a tool's `parameters`, a `json_schema` response format's `schema`.
#: Deeper than metadata (schemas nest `properties`/`items` pairs); the whole request still has to
#: fit `CP_MAX_REQUEST_BYTES`.
TOOL_SCHEMA = TreeLimits(
    max_depth=32, max_nodes=4_000, max_key_chars=256, max_string_chars=16_384, max_bytes=65_536
)


def check_tree(value: Any, limits: TreeLimits, *, name: str) -> Any:
    """Return `value` when it is plain JSON within `limits`; raise ValueError naming the limit."""
    nodes = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > limits.max_nodes:
            raise ValueError(f"{name} has more than {limits.max_nodes} values (limit)")
        if isinstance(item, dict):
            if depth > limits.max_depth:
                raise ValueError(f"{name} nests deeper than {limits.max_depth} levels (limit)")
            for key, child in item.items():
                if not isinstance(key, str):
                    raise ValueError(f"{name} has a key that is not a string")
                if len(key) > limits.max_key_chars:
                    raise ValueError(
                        f"{name} has a key longer than {limits.max_key_chars} characters (limit)"
                    )
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth > limits.max_depth:
                raise ValueError(f"{name} nests deeper than {limits.max_depth} levels (limit)")
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            if len(item) > limits.max_string_chars:
                raise ValueError(
                    f"{name} has a string longer than {limits.max_string_chars} characters (limit)"
                )
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not INT_MIN <= item <= INT_MAX:
                raise ValueError(f"{name} has an integer outside the signed 64-bit range")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError(f"{name} has a number that is not finite")
        else:
            raise ValueError(f"{name} holds a {type(item).__name__}, which is not JSON")
    size = len(orjson.dumps(value))
    if size > limits.max_bytes:
        raise ValueError(f"{name} is {size} bytes as JSON, over {limits.max_bytes} (limit)")
    return value
