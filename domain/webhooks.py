"""Completion webhooks, the pure part: callback URL checks, signatures, the retry schedule.

A job request may name a `callback_url`; when the job ends, the control plane POSTs its final
response there, signed in the style of the Standard Webhooks spec
(https://www.standardwebhooks.com): headers `webhook-id` (the delivery id, the same on every
attempt), `webhook-timestamp` (Unix seconds of the attempt) and `webhook-signature`
(`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` with the tenant's secret).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

#: The setting that allows callback hosts, named in every refusal.
ALLOWED_HOSTS_SETTING = "CP_WEBHOOK_ALLOWED_HOSTS"
SECRETS_SETTING = "CP_WEBHOOK_SECRETS"
#: Prefix of a Standard Webhooks secret: the key is the base64 text after it.
SECRET_PREFIX = "whsec_"  # noqa: S105 (a format prefix, not a secret)
MAX_URL_LENGTH = 2048


def delivery_id(job_id: str) -> str:
    """The stable id of a job's completion webhook: every attempt carries it."""
    return f"whd_{job_id}"


def check_callback_url(url: str) -> str:
    """Check a callback URL's shape (no setting involved); raise ValueError saying what is wrong.

    http or https, a host, no user or password in it, no fragment.
    """
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"callback_url is longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise ValueError("callback_url must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a port that is not a number or out of range
    except ValueError as exc:
        raise ValueError(f"callback_url is not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http"):
        raise ValueError("callback_url must be an https:// (or allowed http://) URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("callback_url must not carry credentials (user:password@)")
    if not parts.hostname:
        raise ValueError("callback_url has no host")
    if parts.fragment:
        raise ValueError("callback_url must not have a #fragment")
    return url


@dataclass(frozen=True, slots=True)
class HostRule:
    """One entry of CP_WEBHOOK_ALLOWED_HOSTS: a host (glob allowed), optionally `http://`."""

    pattern: str
    http: bool

    def matches(self, host: str) -> bool:
        return fnmatch.fnmatchcase(host, self.pattern)


def parse_allowed_hosts(value: str) -> tuple[HostRule, ...]:
    """`*.example.com,hooks.acme.io,http://127.0.0.1`: hosts (globs) callbacks may go to.

    A bare entry allows https only; an `http://` entry also allows plain http to that host.
    """
    rules: list[HostRule] = []
    for raw in value.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        http = False
        if entry.startswith("http://"):
            http, entry = True, entry.removeprefix("http://")
        entry = entry.removeprefix("https://").rstrip("/")
        rules.append(HostRule(pattern=entry, http=http))
    return tuple(rules)


def _internal_ip(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return not ip.is_global or ip.is_multicast


def refusal(url: str, rules: Iterable[HostRule]) -> str | None:
    """Why `url` may not be called back under these allow-list rules, or None when it may.

    The host must match an entry of CP_WEBHOOK_ALLOWED_HOSTS (none: webhooks are refused);
    plain http needs an `http://` entry; an IP literal in a private, loopback, link-local or
    reserved range must be named exactly (a glob such as `*` does not let it through).
    """
    try:
        check_callback_url(url)
    except ValueError as exc:
        return str(exc)
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    rules = tuple(rules)
    if not rules:
        return f"callback webhooks are not enabled: {ALLOWED_HOSTS_SETTING} allows no host"
    matching = [rule for rule in rules if rule.matches(host)]
    if _internal_ip(host):
        matching = [rule for rule in matching if rule.pattern == host]
        if not matching:
            return (
                f"callback host {host} is an internal address; only an exact entry of "
                f"{ALLOWED_HOSTS_SETTING} allows it"
            )
    if not matching:
        return f"callback host {host} is not allowed by {ALLOWED_HOSTS_SETTING}"
    if parts.scheme == "http" and not any(rule.http for rule in matching):
        return (
            f"callback_url must be https: plain http to {host} needs an http://{host} entry in "
            f"{ALLOWED_HOSTS_SETTING}"
        )
    return None


def parse_secrets(text: str) -> dict[str, str]:
    """`tenant=secret` pairs, comma- or newline-separated (CP_WEBHOOK_SECRETS or its file)."""
    secrets: dict[str, str] = {}
    for raw in text.replace("\n", ",").split(","):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        tenant, sep, secret = entry.partition("=")
        if not sep or not tenant.strip() or not secret.strip():
            raise ValueError(f"a webhook secret entry must be tenant=secret, got {entry[:40]!r}")
        secrets[tenant.strip()] = secret.strip()
    return secrets


def secret_key(secret: str) -> bytes:
    """The HMAC key of a secret: the base64 after `whsec_`, else the secret's UTF-8 bytes."""
    if secret.startswith(SECRET_PREFIX):
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: `v1,` and the base64 HMAC-SHA256 of id.timestamp.body."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, *, now: int, tolerance_s: int = 300
) -> bool:
    """What a receiver does: recompute the signature and refuse stale timestamps."""
    msg_id = headers.get("webhook-id", "")
    try:
        timestamp = int(headers.get("webhook-timestamp", ""))
    except ValueError:
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, msg_id, timestamp, body).removeprefix("v1,")
    for candidate in headers.get("webhook-signature", "").split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return True
    return False


def backoff_s(attempt: int, *, base_s: float, max_s: float) -> float:
    """The wait after failed attempt `attempt` (1, 2, ...): base, 2x base, 4x base ... capped."""
    if attempt < 1:
        return 0.0
    return float(min(max_s, base_s * 2 ** min(attempt - 1, 60)))


def schedule(*, base_s: float, max_s: float, max_age_s: float) -> list[float]:
    """Offsets (s from the job's end) of every attempt made before the delivery gives up."""
    times = [0.0]
    while True:
        nxt = times[-1] + backoff_s(len(times), base_s=base_s, max_s=max_s)
        if nxt > max_age_s or len(times) >= 10_000:
            return times
        times.append(nxt)
