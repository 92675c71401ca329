"""The short chaos battery of `make test`: a few faults with small job counts.

The whole battery is `make chaos` (python -m tests.chaos), which records its table in
tests/chaos/results.md; this one records nothing but the pytest properties.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.battery import Battery, Sizes, run_fault, table

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHORT = Sizes(jobs=20, cp_kills=1, zombie_rounds=1, http_every=3)


@pytest.mark.parametrize(
    "fault",
    ["cp-sigkill", "provider-graceful", "zombie-reads", "failover", "poison", "http-bad-inputs"],
)
async def test_fault_loses_nothing(
    fault: str,
    kafka_bootstrap: str,
    run_id: str,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """0 lost, 0 double finals, 0 5xx, 0 HTTP mismatch, 0 anomalies (and no attempt timeout
    after a graceful restart)."""
    row = await run_fault(Battery(kafka_bootstrap, run_id, tmp_path, SHORT), fault, timeout=240)
    line = table([row])
    print(line)
    record_property(fault, line)
    assert row.ok, f"{fault}: {'; '.join(row.failures())}\n{line}"
