"""Frames between a worker and its reader processes, over a Unix socket.

A frame is a 4-byte big-endian length and an orjson array whose first item says what it is:

- reader to worker: `["v", job_id]`, asking for a job's status view, and once a second when
  it counted requests `["m", {outcome: total}]`, its totals since it started (`cp_reader_reads`);
- worker to reader: `["v", job_id, tenant, head, tail]` answering it (`tenant` null when this
  worker cannot answer for the job now), `["d", [job_id, ...]]` for jobs whose state changed,
  `["r"]` when a partition left the worker (forget every view), and `["a", until]` twice a
  second while its membership lease holds (`streams.lease`): `until` is the CLOCK_MONOTONIC time
  the lease ends, past which the reader serves nothing of what it holds; after each assignment
  (and on connecting) `["o", partitions, {partition: read_url}]`, the read ports of the other
  workers that own partitions, to which a reader relays reads of their jobs.

One ordered stream per reader is what keeps a reader's views current: a view is answered from the
state at the moment the request is read, and a later change of the job is sent after it.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import orjson

HEADER = struct.Struct(">I")
#: A frame larger than this is a broken peer, not a status view.
MAX_FRAME = 16 * 1024 * 1024


def frame(*items: Any) -> bytes:
    payload = orjson.dumps(items)
    return HEADER.pack(len(payload)) + payload


async def read_frame(stream: asyncio.StreamReader) -> list[Any] | None:
    """The next frame, or None at the end of the stream."""
    try:
        header = await stream.readexactly(HEADER.size)
        (size,) = HEADER.unpack(header)
        if size > MAX_FRAME:
            raise ValueError(f"frame of {size} bytes (at most {MAX_FRAME})")
        items = orjson.loads(await stream.readexactly(size))
    except asyncio.IncompleteReadError:
        return None
    if not isinstance(items, list) or not items or not isinstance(items[0], str):
        raise ValueError(f"not a frame: {items!r:.200}")
    return items
