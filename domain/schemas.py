"""JSON Schema of every message that crosses the control plane's boundary.

`export(directory)` writes one file per message kind, named `<kind>.v<schema_version>.json`, from
the pydantic models of `domain.messages` (`model_json_schema()`, keys sorted, 2-space indent,
trailing newline), so the output is byte-for-byte stable. `python -m domain.schemas [dir]` writes
into `schemas/` by default; a unit test keeps the committed files equal to a fresh export.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from domain.messages import (
    SCHEMA_VERSION,
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

#: Default output directory of `python -m domain.schemas`, relative to the working directory.
DEFAULT_DIRECTORY = Path("schemas")

#: Every boundary message, by the kind name its schema file carries.
MESSAGES: dict[str, type[BaseModel]] = {
    "job_request": JobRequest,
    "cancel_request": CancelRequest,
    "dispatch": Dispatch,
    "provider_cancel": ProviderCancel,
    "provider_result": ProviderResult,
    "job_event": JobEvent,
    "final_response": FinalResponse,
    "dead_letter": DeadLetter,
    "webhook_delivery": WebhookDelivery,
    "health_record": HealthRecord,
}


def file_name(kind: str, version: int = SCHEMA_VERSION) -> str:
    """Return the schema file name of a message kind, e.g. `job_request.v1.json`."""
    return f"{kind}.v{version}.json"


def render(model: type[BaseModel]) -> str:
    """Render a model's JSON Schema as stable text: sorted keys, 2-space indent, final newline."""
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"


def schemas() -> dict[str, str]:
    """Return every schema file's name and text, without touching the file system."""
    return {file_name(kind): render(model) for kind, model in MESSAGES.items()}


def export(directory: Path) -> list[Path]:
    """Write every boundary message's JSON Schema into `directory`; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, text in schemas().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m domain.schemas [directory]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1:
        print("usage: python -m domain.schemas [directory]", file=sys.stderr)
        return 2
    directory = Path(args[0]) if args else DEFAULT_DIRECTORY
    for path in export(directory):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
