"""Dead letters: what an agent cannot parse or apply goes to cp.dlq with why and where from."""

from __future__ import annotations

import base64
import logging
from datetime import UTC, datetime

from faust.types import TopicT

from domain.codec import encode
from domain.messages import DeadLetter

log = logging.getLogger(__name__)


def dead_letter_record(
    *,
    reason: str,
    detail: str,
    topic: str,
    partition: int | None,
    offset: int | None,
    key: bytes | None,
    payload: bytes | None,
) -> DeadLetter:
    body = payload or b""
    return DeadLetter(
        reason=reason,
        detail=detail[:4000],
        topic=topic,
        partition=partition,
        offset=offset,
        key=key.decode("utf-8", errors="replace") if key is not None else None,
        payload_b64=base64.b64encode(body).decode(),
        payload_size=len(body),
        at=datetime.now(UTC),
    )


async def send_dead_letter(dlq: TopicT, record: DeadLetter) -> None:
    """Publish a dead letter; keyed by its origin so one partition's letters stay in order."""
    log.warning(
        "dead letter",
        extra={
            "event": "dead_letter",
            "reason": record.reason,
            "origin_topic": record.topic,
            "origin_partition": record.partition,
            "origin_offset": record.offset,
            "payload_size": record.payload_size,
        },
    )
    key = f"{record.topic}:{record.partition}".encode()
    await dlq.send(key=key, value=encode(record))
