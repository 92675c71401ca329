"""The timeline page of a job that fell back, rendered by headless Chromium.

Saves a screenshot (also copied to var/screenshots/timeline-fallback.png for people to look at)
and checks the rendered DOM names both providers and the final state.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.api.conftest import FALLBACK, TERMINAL, ApiStack, create, job_request, wait_state
from tests.support.workers import ROOT

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_COPY = ROOT / "var" / "screenshots" / "timeline-fallback.png"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def chromium_argv(binary: Path, profile: Path) -> list[str]:
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
        f"--user-data-dir={profile}",
        "--window-size=1000,800",
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


def keep_screenshot(screenshot: Path) -> int:
    """Check the PNG, copy it where people look for it; return its size."""
    assert screenshot.exists(), f"chromium wrote no {screenshot}"
    png = screenshot.read_bytes()
    assert png.startswith(PNG_MAGIC), png[:16]
    SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
    return len(png)


async def test_timeline_page_of_a_fallback_job(
    http: aiohttp.ClientSession, api_stack: ApiStack, chromium: Path, tmp_path: Path
) -> None:
    job_id = await create(
        http, api_stack, job_request(f"timeline-{uuid.uuid4().hex[:10]}", FALLBACK)
    )
    status = await wait_state(http, api_stack, job_id, TERMINAL)
    assert status["state"] == "COMPLETED", status
    # Served by whichever worker the browser asks, the key in the query as a browser sends it.
    url = f"{api_stack.cp2}/jobs/{job_id}/timeline?key=key-a"

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
