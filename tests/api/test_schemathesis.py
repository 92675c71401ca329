"""`make api-fuzz` as a test: schemathesis, driven by the served /openapi.json, finds no failure.

It runs tests/api/fuzz.py (the script behind `make api-fuzz`) in a subprocess against the API
stack of this package instead of a stack of its own: the same `st run`, one start-up less.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.api.conftest import ApiStack
from tests.support.workers import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The fuzz run takes about 20-40 s; leave room for a slow, busy machine.
TIMEOUT_S = 180


def test_schemathesis_finds_no_failure(api_stack: ApiStack) -> None:
    argv = [
        sys.executable,
        "-m",
        "tests.api.fuzz",
        "--url",
        api_stack.cp1,
        "--timeout",
        str(TIMEOUT_S - 30),
    ]
    process = subprocess.Popen(
        argv, cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the script then stops schemathesis
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        pytest.fail(f"the fuzz run took over {TIMEOUT_S}s:\n{output.decode(errors='replace')}")
    text = output.decode(errors="replace")
    print(text[-4000:])  # shown by `pytest -rA`: the run's summary and timing
    assert process.returncode == 0, f"schemathesis found failures:\n{text[-20000:]}"
    assert "Schemathesis v" in text
    assert " passed" in text
