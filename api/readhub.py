"""The worker's side of its reader processes (`CP_READ_PORT`, `api.reader`).

The hub starts `CP_READERS` reader processes (and starts one again if it exits), answers their
requests for status views from the job core's state, and tells them of every job whose state
changed and of every partition that left, over one Unix socket connection each
(`api.readframes`). A reader serves a view it holds only while it hears from the worker and
within the worker's membership lease (`streams.lease`), so the reader of a stopped worker, or of
one paused past its session timeout, forwards instead of answering from what it last knew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable

from api.readframes import frame, read_frame
from streams.settings import Settings

log = logging.getLogger(__name__)

#: How often the worker says it is alive to its readers (they stop serving after 4 misses).
ALIVE_S = 0.5
#: A reader this far behind (bytes unsent to it) is cut off; it exits and is started again.
MAX_BACKLOG = 8 * 1024 * 1024
#: Unix socket paths are limited to ~107 bytes; keep clear of it.
MAX_SOCKET_PATH = 100
RESTART_DELAY_S = 1.0


class ReadHub:
    def __init__(
        self,
        settings: Settings,
        view: Callable[[str], tuple[str, bytes, bytes] | None],
        counted: Callable[[str, int], None],
        lease_until: Callable[[], float],
    ) -> None:
        """`view(job_id)`: (tenant, head, tail) of a job the worker can answer for now, else None
        (`api.views.held_view`); `counted(outcome, n)`: n more requests of the read port had
        that outcome (`cp_reader_reads`); `lease_until()`: the CLOCK_MONOTONIC time the
        worker's membership lease ends (`streams.lease`)."""
        self.settings = settings
        self.view = view
        self.counted = counted
        self.lease_until = lease_until
        self.path = settings.read_socket
        self.readers: set[asyncio.StreamWriter] = set()
        self.changes: list[str] = []
        self.server: asyncio.Server | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False
        #: The last placement frame: which partitions' owners other readers answer for.
        self.placement: bytes | None = None

    # -- the job core's side (streams.core.ViewListener) ------------------------------------------

    def changed(self, job_id: str) -> None:
        if not self.readers:
            return
        if not self.changes:
            asyncio.get_running_loop().call_soon(self._send_changes)
        self.changes.append(job_id)

    def reset(self) -> None:
        self._send_changes()
        self._broadcast(frame("r"))

    def placed(self, partitions: int, readers: dict[int, str]) -> None:
        """Tell the readers which partitions other workers' read ports answer for."""
        own = self.settings.read_url
        elsewhere = {str(p): url for p, url in sorted(readers.items()) if url != own}
        self.placement = frame("o", partitions, elsewhere)
        self._broadcast(self.placement)

    def _send_changes(self) -> None:
        if self.changes:
            changes, self.changes = self.changes, []
            self._broadcast(frame("d", changes))

    def _broadcast(self, data: bytes) -> None:
        for writer in list(self.readers):
            self._send(writer, data)

    def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if writer.transport.get_write_buffer_size() > MAX_BACKLOG:
            log.warning("reader too far behind: cut off", extra={"event": "reader.cut_off"})
            self.readers.discard(writer)
            writer.transport.abort()
            return
        writer.write(data)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise ValueError(
                f"CP_DATA_DIR is too long for the readers' Unix socket ({self.path}): "
                f"keep it under {MAX_SOCKET_PATH - len('/read.sock')} bytes or unset CP_READ_PORT"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self.server = await asyncio.start_unix_server(self._serve, path=self.path)
        # Views carry every tenant's jobs: only this worker's user may connect.
        self.path.chmod(0o600)
        self.tasks.append(asyncio.create_task(self._alive()))
        for index in range(self.settings.readers):
            self.tasks.append(asyncio.create_task(self._supervise(index)))
        log.info(
            "readers starting",
            extra={
                "event": "reader.hub_started",
                "port": self.settings.read_port,
                "readers": self.settings.readers,
            },
        )

    async def stop(self) -> None:
        self.stopping = True
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        for process in list(self.processes.values()):
            try:
                await asyncio.wait_for(process.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()
        for writer in list(self.readers):
            writer.transport.abort()
        self.readers.clear()
        self.path.unlink(missing_ok=True)

    async def _supervise(self, index: int) -> None:
        while not self.stopping:
            process = await asyncio.create_subprocess_exec(sys.executable, "-m", "api.reader")
            self.processes[index] = process
            code = await process.wait()
            if self.stopping:
                return
            log.warning(
                "reader exited: starting it again",
                extra={"event": "reader.exited", "reader": index, "code": code},
            )
            await asyncio.sleep(RESTART_DELAY_S)

    async def _alive(self) -> None:
        """Say twice a second until when the readers may serve: never past the lease."""
        while True:
            await asyncio.sleep(ALIVE_S)
            until = self.lease_until()
            if until > time.monotonic():
                self._broadcast(frame("a", until))

    async def _serve(self, stream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.readers.add(writer)
        if self.placement is not None:
            self._send(writer, self.placement)
        counts: dict[str, int] = {}  # this reader's totals so far
        try:
            while (items := await read_frame(stream)) is not None:
                if items[0] == "m" and len(items) == 2 and isinstance(items[1], dict):
                    for outcome, total in items[1].items():
                        if total > counts.get(outcome, 0):
                            self.counted(outcome, total - counts.get(outcome, 0))
                            counts[outcome] = total
                    continue
                if items[0] != "v" or len(items) != 2 or not isinstance(items[1], str):
                    raise ValueError(f"unexpected frame from a reader: {items!r:.200}")
                job_id = items[1]
                view = self.view(job_id)
                if view is None:
                    self._send(writer, frame("v", job_id, None))
                else:
                    tenant, head, tail = view
                    self._send(writer, frame("v", job_id, tenant, head.decode(), tail.decode()))
        except (ValueError, ConnectionError) as exc:
            log.warning(
                "reader connection failed", extra={"event": "reader.bad", "error": str(exc)}
            )
        finally:
            self.readers.discard(writer)
            writer.transport.abort()
