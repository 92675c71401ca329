"""Structured logs: one JSON object per line with the job's ids whenever they are known."""

from __future__ import annotations

import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

import orjson

from streams.settings import Settings
from streams.tracing import log_ids

#: Fields copied from a record's `extra` into the JSON line.
CONTEXT_FIELDS = (
    "event",
    "job_id",
    "attempt_id",
    "provider",
    "tenant_id",
    "trace_id",
    "span_id",
    "state",
    "reason",
)
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

#: Libraries that log whole record values (prompts, outputs) at DEBUG: never below INFO.
QUIET_LIBRARIES = ("aiokafka", "faust", "mode", "kafka", "openai", "anthropic", "httpx", "httpcore")


def _floor(level: str) -> str:
    return "INFO" if logging.getLevelName(level.upper()) == logging.DEBUG else level.upper()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        for key, value in log_ids().items():
            line.setdefault(key, value)
        if record.exc_info and record.exc_info[0] is not None:
            line["exc_type"] = record.exc_info[0].__name__
            line["exc_frames"] = [
                f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
                for frame in traceback.extract_tb(record.exc_info[2])
            ][-8:]
        return orjson.dumps(line, default=str).decode()


def logging_config(settings: Settings) -> dict[str, Any] | None:
    """A dictConfig for faust workers: JSON lines on stderr, or None for faust's own console."""
    if settings.log_format != "json":
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "streams.logs.JsonFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": settings.log_level.upper(), "handlers": ["stderr"]},
        "loggers": {name: {"level": _floor(settings.log_level)} for name in QUIET_LIBRARIES},
    }


def configure_logging(settings: Settings) -> None:
    """Route every logger to stderr in the configured format and level."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(_floor(settings.log_level))
