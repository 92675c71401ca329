"""Fuzz the HTTP API with schemathesis, driven by the /openapi.json a live worker serves.

    python -m tests.api.fuzz                      # start an API stack (as tests/api does), fuzz it
    python -m tests.api.fuzz --url http://h:port  # fuzz workers that already run

Starts two control-plane workers and a provider worker on the broker in KAFKA_BOOTSTRAP_SERVERS
(or the local one), runs `st run` against one of the control-plane workers (so that about half
of the job requests are forwarded to the other) and exits with schemathesis' exit code: 0 when
no check failed. `make api-fuzz` runs this; so does tests/api/test_schemathesis.py.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import FrameType

#: What a run checks: no 5xx, and every status, content type and body as the document says.
CHECKS = (
    "not_a_server_error",
    "response_schema_conformance",
    "status_code_conformance",
    "content_type_conformance",
)
DEFAULT_MAX_EXAMPLES = 50
DEFAULT_SEED = 20261126
API_KEY = "key-a"


def st_command(url: str, *, max_examples: int, seed: int | None) -> list[str]:
    argv = [
        str(Path(sys.executable).with_name("st")),
        "run",
        f"{url.rstrip('/')}/openapi.json",
        "--header",
        f"Authorization: Bearer {API_KEY}",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        str(max_examples),
        # Longer than the longest long poll the document allows (GET /result?wait=30).
        "--request-timeout",
        "45",
        "--generation-database",
        "none",
        "--no-color",
    ]
    if seed is not None:
        argv += ["--seed", str(seed)]
    return argv


def run_st(argv: list[str], timeout: float) -> int:
    """Run schemathesis in a throwaway directory: it keeps a crash cache in its working dir."""
    print("$", shlex.join(argv), flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cp-api-fuzz-st-") as cwd:
        code = _wait(subprocess.Popen(argv, cwd=cwd), timeout)
    print(f"schemathesis exited {code} after {time.monotonic() - started:.1f}s", flush=True)
    return code


def _wait(process: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"schemathesis did not finish in {timeout:.0f}s", file=sys.stderr, flush=True)
        return 124
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into SystemExit so that `finally` stops what this script started.
    raise SystemExit(128 + signum)


def fuzz_new_stack(args: argparse.Namespace) -> int:
    from tests.api.conftest import start_api_stack
    from tests.support.broker import kafka_broker

    run_id = "f" + uuid.uuid4().hex[:10]
    with tempfile.TemporaryDirectory(prefix="cp-api-fuzz-") as tmp, kafka_broker() as bootstrap:
        root = Path(tmp)
        print(f"starting an API stack ({run_id}) on {bootstrap}", flush=True)
        started = time.monotonic()
        api = start_api_stack(bootstrap, run_id, root)
        print(f"stack ready in {time.monotonic() - started:.1f}s: {api.urls}", flush=True)
        code = 1
        try:
            code = run_st(
                st_command(api.cp1, max_examples=args.max_examples, seed=args.seed),
                args.timeout,
            )
        finally:
            api.stop()
            if code != 0:
                for log in sorted((root / "logs").glob("*.log")):
                    tail = log.read_text(errors="replace").splitlines()[-40:]
                    print(f"--- {log.name} (last lines) ---", *tail, sep="\n", file=sys.stderr)
        return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="fuzz this running worker instead of starting a stack")
    parser.add_argument("--max-examples", type=int, default=DEFAULT_MAX_EXAMPLES)
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="0 for a random seed (default: fixed)"
    )
    parser.add_argument("--timeout", type=float, default=240.0, help="budget of the st run (s)")
    args = parser.parse_args(argv)
    if args.seed == 0:
        args.seed = None
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if args.url:
        return run_st(
            st_command(args.url, max_examples=args.max_examples, seed=args.seed), args.timeout
        )
    return fuzz_new_stack(args)


if __name__ == "__main__":
    sys.exit(main())
