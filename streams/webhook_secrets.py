"""Each tenant's webhook signing secret, from CP_WEBHOOK_SECRETS and CP_WEBHOOK_SECRETS_FILE."""

from __future__ import annotations

from pathlib import Path

from domain.webhooks import parse_secrets
from streams.settings import Settings

_CACHE: dict[tuple[str, str], dict[str, str]] = {}


def tenant_secrets(settings: Settings) -> dict[str, str]:
    """tenant -> secret; the file's entries win over the variable's. Read once per settings."""
    inline = settings.webhook_secrets.get_secret_value() if settings.webhook_secrets else ""
    path = str(settings.webhook_secrets_file or "")
    cached = _CACHE.get((inline, path))
    if cached is not None:
        return cached
    secrets = parse_secrets(inline)
    if path:
        secrets.update(parse_secrets(Path(path).read_text()))
    _CACHE[(inline, path)] = secrets
    return secrets
