"""Send commands to the job core: keyed by job_id onto cp.commands (the API's one way to write)."""

from __future__ import annotations

from typing import Any

from streams.app import app, topics


async def send_command(
    job_id: str, payload: bytes, headers: list[tuple[str, bytes]] | None = None
) -> Any:
    """Send a command keyed by job_id; returns the delivery future (batched by the producer)."""
    return await app.producer.send(
        topics.commands.get_topic_name(), job_id.encode(), payload, None, None, headers or []
    )
