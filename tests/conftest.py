"""Session-wide fixtures: one broker per session, unique ids so runs never collide."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import forget_run, kafka_broker


@pytest.fixture(scope="session")
def run_id() -> str:
    """Return an id unique to this test session, used in topic prefixes and app ids."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def kafka_bootstrap(run_id: str) -> Iterator[str]:
    """Yield the bootstrap servers of the session's broker; delete the session's topics after."""
    with kafka_broker() as servers:
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = servers
        yield servers
        forget_run(servers, run_id)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("session")
