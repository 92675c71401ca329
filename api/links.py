"""Short-lived signed links to a job's timeline page: no API key ever goes into a URL.

`GET /jobs/{id}` hands out `/jobs/{id}/timeline?exp=<unix>&sig=<sig>`, where `sig` is the
unpadded base64url HMAC-SHA256 of `job_id|tenant|exp` under the link secret. The page accepts
such a link until `exp` (and only for that job and tenant), or an `Authorization: Bearer` key.

The secret is `CP_LINK_SECRET`; unset, it is derived from the API key configuration, so every
worker configured with the same keys signs alike (a link opens on whichever worker serves it) and
changing the keys invalidates the links handed out before.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from streams.settings import Settings

#: Domain separation of the secret derived from the API keys.
_DERIVE = b"prompt-gateway timeline links v1"


class LinkExpired(ValueError):
    """The link's `exp` has passed."""


class LinkInvalid(ValueError):
    """The link is malformed or its signature does not match this job and tenant."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True)
class LinkSigner:
    secret: bytes
    ttl_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> LinkSigner:
        if settings.link_secret is not None and settings.link_secret.get_secret_value():
            secret = settings.link_secret.get_secret_value().encode()
        else:
            material = b""
            if settings.api_keys is not None:
                material += settings.api_keys.get_secret_value().encode()
            if settings.api_keys_file is not None:
                material += b"\0" + Path(settings.api_keys_file).read_bytes()
            secret = hmac.new(_DERIVE, material, hashlib.sha256).digest()
        return cls(secret=secret, ttl_s=settings.link_ttl_s)

    def signature(self, job_id: str, tenant: str, exp: int) -> str:
        message = f"{job_id}|{tenant}|{exp}".encode("utf-8", "surrogateescape")
        # The one-shot digest runs in C: half the time of an hmac.new object, once per read.
        return _b64(hmac.digest(self.secret, message, "sha256"))

    def expiry(self, now: float) -> int:
        """When a link signed at `now` expires (unix seconds)."""
        return int(now + self.ttl_s)

    def link_until(self, job_id: str, tenant: str, exp: int) -> str:
        return f"/jobs/{job_id}/timeline?exp={exp}&sig={self.signature(job_id, tenant, exp)}"

    def timeline_link(self, job_id: str, tenant: str, now: float) -> str:
        return self.link_until(job_id, tenant, self.expiry(now))

    def check_expiry(self, exp: str, now: float) -> int:
        """Return `exp` as an int; raise LinkInvalid when malformed, LinkExpired when past."""
        if not exp.isascii() or not exp.isdigit() or len(exp) > 12:
            raise LinkInvalid("exp is not a unix time")
        value = int(exp)
        if value <= now:
            raise LinkExpired(f"the link expired at {value}")
        return value

    def verify(self, job_id: str, tenant: str, exp: str, sig: str, now: float) -> None:
        """Accept a link for this job and tenant that has not expired; raise otherwise."""
        value = self.check_expiry(exp, now)
        expected = self.signature(job_id, tenant, value)
        if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "surrogateescape")):
            raise LinkInvalid("the signature does not match")
