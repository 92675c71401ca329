"""Refuse a job request whose callback_url this deployment may not call (422 naming the setting)."""

from __future__ import annotations

from functools import lru_cache

from api.problems import Problem
from domain.messages import JobRequest
from domain.webhooks import SECRETS_SETTING, HostRule, parse_allowed_hosts, refusal
from streams.settings import Settings
from streams.webhook_secrets import tenant_secrets


@lru_cache(maxsize=4)
def _rules(value: str) -> tuple[HostRule, ...]:
    return parse_allowed_hosts(value)


def check_callback(settings: Settings, request: JobRequest, tenant: str) -> None:
    """Raise a 422 problem when the request's callback_url may not be called for this tenant."""
    url = request.callback_url
    if url is None:
        return
    why = refusal(url, _rules(settings.webhook_allowed_hosts))
    if why is None and tenant not in tenant_secrets(settings):
        why = f"tenant {tenant} has no webhook signing secret in {SECRETS_SETTING}"
    if why is not None:
        raise Problem(
            422,
            "invalid-request",
            "Invalid request",
            why,
            errors=[{"loc": ["callback_url"], "msg": why, "type": "callback_url"}],
        )
