"""API keys map to tenants: `Authorization: Bearer <key>`, keys from CP_API_KEYS or a keys file."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from api.problems import Problem
from streams.settings import Settings


class KeyConfigError(ValueError):
    """CP_API_KEYS or the keys file is malformed: fix the entry named in the message."""


@dataclass(frozen=True)
class KeyRing:
    tenants: dict[str, str]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        entries: list[str] = []
        if settings.api_keys is not None:
            entries.extend(settings.api_keys.get_secret_value().split(","))
        if settings.api_keys_file is not None:
            lines = Path(settings.api_keys_file).read_text().splitlines()
            entries.extend(line for line in lines if not line.lstrip().startswith("#"))
        tenants: dict[str, str] = {}
        for number, entry in enumerate(e.strip() for e in entries):
            if not entry:
                continue
            key, sep, tenant = entry.partition("=")
            if not sep or not key.strip() or not tenant.strip():
                raise KeyConfigError(f"API key entry {number + 1} is not key=tenant")
            tenants[key.strip()] = tenant.strip()
        return cls(tenants)

    def tenant_for(self, key: str) -> str | None:
        # A header's bytes that are not UTF-8 arrive as surrogates: compare them, never fail.
        given = key.encode("utf-8", "surrogateescape")
        for known, tenant in self.tenants.items():
            if hmac.compare_digest(known.encode(), given):
                return tenant
        return None


def authenticate(ring: KeyRing, request: web.BaseRequest) -> str:
    """Return the caller's tenant or raise 401; a key is only ever read from the header."""
    return tenant_of(ring, request.headers.get("Authorization", ""))


def tenant_of(ring: KeyRing, header: str | None) -> str:
    """The tenant of an `Authorization` header's value (`Bearer <key>`), or raise 401."""
    scheme, _, key = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        key = ""
    tenant = ring.tenant_for(key.strip()) if key.strip() else None
    if tenant is None:
        raise Problem(
            401,
            "unauthorized",
            "Unauthorized",
            "send a valid API key as `Authorization: Bearer <key>`",
            headers={"WWW-Authenticate": 'Bearer realm="prompt-gateway"'},
        )
    return tenant
