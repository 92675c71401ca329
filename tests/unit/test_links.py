"""Signed timeline links: valid until they expire, for one job and tenant, tamper-evident."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr

from api.links import LinkExpired, LinkInvalid, LinkSigner
from streams.settings import Settings

NOW = 1_800_000_000.0


def signer(**fields: object) -> LinkSigner:
    fields.setdefault("api_keys", SecretStr("key-a=tenant-a,key-b=tenant-b"))
    return LinkSigner.from_settings(Settings(**fields))  # type: ignore[arg-type]


def parts(link: str) -> tuple[str, str, str]:
    url = urlsplit(link)
    query = parse_qs(url.query)
    return url.path, query["exp"][0], query["sig"][0]


def test_a_fresh_link_opens_its_page() -> None:
    links = signer()
    path, exp, sig = parts(links.timeline_link("job_1", "tenant-a", NOW))
    assert path == "/jobs/job_1/timeline"
    assert int(exp) == int(NOW + 900)
    assert "=" not in sig and "+" not in sig and "/" not in sig
    links.verify("job_1", "tenant-a", exp, sig, NOW + 899)


def test_an_expired_link_is_refused() -> None:
    links = signer()
    _, exp, sig = parts(links.timeline_link("job_1", "tenant-a", NOW))
    with pytest.raises(LinkExpired):
        links.verify("job_1", "tenant-a", exp, sig, NOW + 900)


@pytest.mark.parametrize(
    ("job_id", "tenant", "change"),
    [
        ("job_2", "tenant-a", None),
        ("job_1", "tenant-b", None),
        ("job_1", "tenant-a", "exp"),
        ("job_1", "tenant-a", "sig"),
    ],
    ids=["other-job", "other-tenant", "longer-exp", "tampered-sig"],
)
def test_a_link_for_something_else_or_tampered_is_invalid(
    job_id: str, tenant: str, change: str | None
) -> None:
    links = signer()
    _, exp, sig = parts(links.timeline_link("job_1", "tenant-a", NOW))
    if change == "exp":
        exp = str(int(exp) + 3600)
    if change == "sig":
        sig = ("A" if sig[0] != "A" else "B") + sig[1:]
    with pytest.raises(LinkInvalid):
        links.verify(job_id, tenant, exp, sig, NOW)


@pytest.mark.parametrize("exp", ["", "abc", "-5", "1e10", "١٢٣", "9" * 13])
def test_a_malformed_expiry_is_invalid(exp: str) -> None:
    with pytest.raises(LinkInvalid):
        signer().verify("job_1", "tenant-a", exp, "x", NOW)


def test_the_secret_is_shared_by_workers_with_the_same_configuration() -> None:
    link = signer().timeline_link("job_1", "tenant-a", NOW)
    assert signer().timeline_link("job_1", "tenant-a", NOW) == link
    other_keys = signer(api_keys=SecretStr("key-c=tenant-a"))
    assert other_keys.timeline_link("job_1", "tenant-a", NOW) != link


def test_cp_link_secret_wins_over_the_derived_one() -> None:
    explicit = signer(link_secret=SecretStr("s3cret"), link_ttl_s=60.0)
    assert explicit.secret == b"s3cret"
    assert explicit.ttl_s == 60
    same = signer(link_secret=SecretStr("s3cret"), api_keys=SecretStr("k=other"))
    assert explicit.signature("j", "t", 1) == same.signature("j", "t", 1)
    assert signer().signature("j", "t", 1) != explicit.signature("j", "t", 1)
