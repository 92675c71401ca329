"""The timeline page in headless Chromium, and the signed links that open it.

* Four jobs driven through `decide` at fixed times (completed with a fallback, deadline expired,
  no eligible target, failed with errors) are rendered, screenshot and compared with the
  reference images in timeline_refs/ (within a small pixel tolerance); their laid-out text boxes,
  read back from the DOM Chromium built, never overlap. `UPDATE_TIMELINE_REFS=1` rewrites the
  references from the current page (look at them before committing them).
* A live job's page opens through either worker with the signed link of `GET /jobs/{id}` and no
  key; `?key=` no longer opens it; expired, tampered and misapplied links are refused.

Screenshots are also copied to var/screenshots/ for people to look at.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from api.links import LinkSigner
from api.timeline import timeline_page
from domain.ids import job_id_for
from streams.settings import Settings
from tests.api.conftest import (
    API_KEYS,
    FALLBACK,
    TERMINAL,
    ApiStack,
    bearer,
    create,
    get_json,
    job_request,
    wait_state,
)
from tests.support.png import decode, diff_ratio
from tests.support.timeline_cases import CASES
from tests.support.workers import ROOT

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "var" / "screenshots"
SCREENSHOT_COPY = SCREENSHOTS / "timeline-fallback.png"
REFS = Path(__file__).parent / "timeline_refs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Screenshots of the fixed jobs: this size, and at most this share of pixels may differ.
WINDOW = (1100, 1500)
MAX_DIFF = 0.01
PROBLEM = "application/problem+json"


def chromium_argv(binary: Path, profile: Path, window: tuple[int, int] = (1000, 800)) -> list[str]:
    # The networking flags keep Chromium from calling home: a closed network refuses it.
    return [
        str(binary),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        f"--window-size={window[0]},{window[1]}",
    ]


async def run_chromium(argv: list[str], timeout: float = 60.0) -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"chromium did not finish in {timeout:.0f}s: {argv}") from None
    assert process.returncode is not None
    return process.returncode, stdout, stderr


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package to run this test")
    return CHROMIUM


def keep_screenshot(screenshot: Path, copy: Path = SCREENSHOT_COPY) -> int:
    """Check the PNG, copy it where people look for it; return its size."""
    assert screenshot.exists(), f"chromium wrote no {screenshot}"
    png = screenshot.read_bytes()
    assert png.startswith(PNG_MAGIC), png[:16]
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, copy)
    return len(png)


# -- the fixed jobs: screenshots against the references, text boxes from the DOM ------------------


@pytest.mark.parametrize("case", sorted(CASES))
async def test_timeline_screenshot_matches_its_reference(
    case: str, chromium: Path, tmp_path: Path
) -> None:
    page = tmp_path / f"{case}.html"
    page.write_text(timeline_page(CASES[case]()))
    screenshot = tmp_path / f"timeline-{case}.png"
    code, _, err = await run_chromium(
        [
            *chromium_argv(chromium, tmp_path / "profile", WINDOW),
            f"--screenshot={screenshot}",
            page.as_uri(),
        ]
    )
    assert code == 0, err.decode(errors="replace")[-2000:]
    keep_screenshot(screenshot, SCREENSHOTS / f"timeline-{case}.png")
    reference = REFS / f"timeline-{case}.png"
    if os.environ.get("UPDATE_TIMELINE_REFS") == "1":
        REFS.mkdir(exist_ok=True)
        shutil.copyfile(screenshot, reference)
    assert reference.exists(), f"no reference {reference}: run with UPDATE_TIMELINE_REFS=1"
    shot, ref = decode(screenshot.read_bytes()), decode(reference.read_bytes())
    assert (shot.width, shot.height) == (ref.width, ref.height) == WINDOW
    ratio = diff_ratio(shot, ref)
    assert ratio <= MAX_DIFF, (
        f"{case}: {ratio:.2%} of the pixels differ from {reference.name} (see {screenshot}); "
        "if the change is intended, regenerate with UPDATE_TIMELINE_REFS=1"
    )


#: Appended to a copy of the page: Chromium lays it out, the script writes every text box of the
#: chart (and the page's own width) into the DOM that --dump-dom prints.
MEASURE = """<script>
const boxes = [...document.querySelectorAll("svg text")].map((t) => {
  const r = t.getBoundingClientRect();
  return {text: t.textContent, x0: r.left, y0: r.top, x1: r.right, y1: r.bottom};
});
const svg = document.querySelector("svg");
const frame = svg ? svg.getBoundingClientRect() : null;
const out = document.createElement("pre");
out.id = "measured";
out.textContent = JSON.stringify({boxes, frame: frame && {x0: frame.left, x1: frame.right,
  y0: frame.top, y1: frame.bottom}, width: document.documentElement.scrollWidth});
document.body.appendChild(out);
</script>"""


def overlaps(boxes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    found = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if a["x0"] < b["x1"] and b["x0"] < a["x1"] and a["y0"] < b["y1"] and b["y0"] < a["y1"]:
                found.append((a["text"], b["text"]))
    return found


@pytest.mark.parametrize("case", sorted(CASES))
async def test_no_two_texts_of_the_chart_overlap_in_chromium(
    case: str, chromium: Path, tmp_path: Path
) -> None:
    page = tmp_path / f"{case}.html"
    page.write_text(timeline_page(CASES[case]()).replace("</body>", MEASURE + "</body>"))
    code, dom, err = await run_chromium(
        [*chromium_argv(chromium, tmp_path / "profile", WINDOW), "--dump-dom", page.as_uri()]
    )
    assert code == 0, err.decode(errors="replace")[-2000:]
    match = re.search(r'<pre id="measured">(.*?)</pre>', dom.decode(), re.S)
    assert match, dom.decode()[-2000:]
    measured = json.loads(match.group(1).replace("&amp;", "&").replace("&lt;", "<"))
    assert measured["width"] <= WINDOW[0], "the page scrolls sideways"
    boxes = measured["boxes"]
    if measured["frame"] is None:
        assert case == "no-target"
        assert "No attempt was made" in dom.decode()
        return
    assert boxes, "the chart has no text"
    assert overlaps(boxes) == []
    frame = measured["frame"]
    for box in boxes:
        assert frame["x0"] <= box["x0"] and box["x1"] <= frame["x1"], box
        assert frame["y0"] <= box["y0"] and box["y1"] <= frame["y1"], box


# -- a live job, opened with its signed link -------------------------------------------------------


async def signed_link(http: aiohttp.ClientSession, api: ApiStack, job_id: str) -> str:
    status, body = await get_json(http, f"{api.cp1}/jobs/{job_id}")
    assert status == 200, body
    link = body["links"]["timeline_signed"]
    assert link.startswith(f"/jobs/{job_id}/timeline?exp=")
    assert "key" not in link
    return str(link)


async def test_timeline_page_of_a_fallback_job(
    http: aiohttp.ClientSession, api_stack: ApiStack, chromium: Path, tmp_path: Path
) -> None:
    job_id = await create(
        http, api_stack, job_request(f"timeline-{uuid.uuid4().hex[:10]}", FALLBACK)
    )
    status = await wait_state(http, api_stack, job_id, TERMINAL)
    assert status["state"] == "COMPLETED", status
    # The signed link from cp-1, opened by a browser without any key at cp-2.
    url = api_stack.cp2 + await signed_link(http, api_stack, job_id)

    screenshot = tmp_path / "timeline-fallback.png"
    code, _, err = await run_chromium(
        [*chromium_argv(chromium, tmp_path / "profile-shot"), f"--screenshot={screenshot}", url]
    )
    assert code == 0, err.decode(errors="replace")[-2000:]
    size = keep_screenshot(screenshot)
    assert size > 10_000, f"the screenshot is only {size} bytes: a blank page?"

    code, dom, err = await run_chromium(
        [*chromium_argv(chromium, tmp_path / "profile-dom"), "--dump-dom", url]
    )
    assert code == 0, err.decode(errors="replace")[-2000:]
    html = dom.decode()
    assert f"Job {job_id}" in html
    assert "sim-cheap" in html
    assert "sim-fast" in html
    assert 'id="final-state">COMPLETED via sim-fast' in html
    assert "provider_internal" in html
    assert "3 attempt(s)" in html
    assert "Routing" in html and "score" in html
    assert "Why it ended: <code>completed</code>" in html
    assert 'id="total-cost"' in html


# -- signed links over HTTP ------------------------------------------------------------------------


def api_signer() -> LinkSigner:
    """The signer of the API stack's workers: no CP_LINK_SECRET, so derived from its keys."""
    keys = ",".join(f"{key}={tenant}" for key, tenant in API_KEYS.items())
    return LinkSigner.from_settings(Settings(api_keys=SecretStr(keys), link_secret=None))


async def fetch(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any, bytes]:
    async with http.get(url, **kwargs) as response:
        return response.status, response.headers, await response.read()


async def test_the_signed_link_opens_the_page_on_either_worker_without_a_key(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    job_id = await create(
        http, api_stack, job_request(f"link-{uuid.uuid4().hex[:10]}", {"sim-cheap": ["ok"]})
    )
    await wait_state(http, api_stack, job_id, TERMINAL)
    link = await signed_link(http, api_stack, job_id)
    pages = []
    for url in api_stack.urls:  # one of them forwards to the owner
        status, headers, body = await fetch(http, url + link)
        assert status == 200, body[:500]
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["Cache-Control"] == "private, no-store"
        pages.append(body)
    assert pages[0] == pages[1]
    assert f"Job {job_id}".encode() in pages[0]
    # The key header still works, and gets the same page and headers.
    status, headers, body = await fetch(
        http, f"{api_stack.cp2}/jobs/{job_id}/timeline", headers=bearer("key-a")
    )
    assert (status, body) == (200, pages[0])
    assert headers["Referrer-Policy"] == "no-referrer"


async def test_a_key_in_the_url_no_longer_opens_the_page(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    job_id = await create(
        http, api_stack, job_request(f"qkey-{uuid.uuid4().hex[:10]}", {"sim-cheap": ["ok"]})
    )
    await wait_state(http, api_stack, job_id, TERMINAL)
    for url in api_stack.urls:
        status, headers, body = await fetch(http, f"{url}/jobs/{job_id}/timeline?key=key-a")
        assert status == 401, body[:500]
        assert headers["Content-Type"].startswith(PROBLEM)
        assert json.loads(body)["type"].endswith("/unauthorized")


async def test_expired_tampered_and_misapplied_links_are_refused(
    http: aiohttp.ClientSession, api_stack: ApiStack
) -> None:
    mine = await create(
        http, api_stack, job_request(f"bad-link-{uuid.uuid4().hex[:10]}", {"sim-cheap": ["ok"]})
    )
    other = await create(
        http, api_stack, job_request(f"bad-link-{uuid.uuid4().hex[:10]}", {"sim-cheap": ["ok"]})
    )
    await wait_state(http, api_stack, mine, TERMINAL)
    link = await signed_link(http, api_stack, mine)
    signer = api_signer()
    # The test signs like the workers do: a fresh link of its own opens the page.
    status, _, _ = await fetch(
        http, api_stack.cp1 + signer.timeline_link(mine, "tenant-a", time.time())
    )
    assert status == 200
    past = int(time.time()) - 5
    expired = f"/jobs/{mine}/timeline?exp={past}&sig={signer.signature(mine, 'tenant-a', past)}"
    later = int(time.time()) + 600
    tenant_b = f"/jobs/{mine}/timeline?exp={later}&sig={signer.signature(mine, 'tenant-b', later)}"
    missing = job_id_for("tenant-a", "never-submitted-" + uuid.uuid4().hex[:6])
    cases = {
        "expired": (expired, "link-expired"),
        "tampered": (link[:-2] + ("AA" if not link.endswith("AA") else "BB"), "link-invalid"),
        "other-job": (link.replace(mine, other), "link-invalid"),
        "other-tenant": (tenant_b, "link-invalid"),
        "missing-job": (link.replace(mine, missing), "link-invalid"),
        "no-exp": (re.sub(r"exp=\d+&", "", link), "link-invalid"),
    }
    for url in api_stack.urls:
        for name, (path, kind) in cases.items():
            status, headers, body = await fetch(http, url + path)
            assert status == 403, (name, url, body[:300])
            assert headers["Content-Type"].startswith(PROBLEM), name
            assert json.loads(body)["type"].endswith("/" + kind), (name, body)
            assert b"tenant-a" not in body and b"Job " not in body, name
