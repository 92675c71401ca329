"""A minimal faust app on the project's own app factory: counts words into a RocksDB table."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from faust.web import Request, Response, View

from streams.app import create_app
from streams.settings import Settings
from streams.topology import load_topology

if TYPE_CHECKING:
    from faust.tables.manager import TableManager

settings = Settings()
app = create_app(settings, load_topology(settings.topics_file))
words = app.topic(
    settings.topic("words"),
    key_type=bytes,
    value_type=bytes,
    key_serializer="raw",
    value_serializer="raw",
    partitions=8,
)
counts = app.Table("counts", default=int, partitions=8, key_type=str, value_type=int)


@app.agent(words)
async def count(stream):  # type: ignore[no-untyped-def]
    async for word in stream:
        counts[word.decode()] += 1


@app.page("/counts/{word}")
class CountView(View):
    async def get(self, request: Request, word: str) -> Response:
        return self.json({"word": word, "count": counts[word]})


@app.page("/readyz")
class ReadyView(View):
    async def get(self, request: Request) -> Response:
        ready = (
            cast("TableManager", app.tables).recovery.completed.is_set()
            and not app.rebalancing
            and bool(app.assignor.assigned_actives())
        )
        return self.json({"ready": ready}, status=200 if ready else 503)
