"""Web views served by every control-plane worker."""

from __future__ import annotations

from faust.web import Request, Response, View

from streams.app import app


def ready() -> tuple[bool, str]:
    """Say whether this worker can answer for its partitions, and if not, why."""
    if not app.tables.recovery.completed.is_set():
        return False, "tables recovering"
    if app.rebalancing or app.in_recovery:
        return False, "rebalancing"
    if not app.assignor.assigned_actives():
        return False, "no partitions assigned"
    return True, "ready"


@app.page("/healthz")
class Health(View):
    async def get(self, request: Request) -> Response:
        return self.json({"status": "ok"})


@app.page("/readyz")
class Ready(View):
    async def get(self, request: Request) -> Response:
        ok, reason = ready()
        return self.json({"ready": ok, "reason": reason}, status=200 if ok else 503)
