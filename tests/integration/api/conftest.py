"""A live API process (uvicorn, real sockets) for tests that drive it like an external client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from libs.common.nats_server import EmbeddedNats
from tests.support.parts import free_port
from tests.support.processes import kill_group, nest_process, wait_http


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`nest run api` on SQLite with its own nats-server; yields the base URL."""
    tmp: Path = tmp_path_factory.mktemp("live-api")
    nats = EmbeddedNats(tmp / "nats")
    nats.start()
    port = free_port()
    env = {
        "NEST_DATA_DIR": str(tmp / "data"),
        "NEST_NATS_URL": nats.url,
        "NEST_API_PORT": str(port),
        "NEST_RATE_LIMIT_PER_SECOND": "100000",
        "NEST_RATE_LIMIT_BURST": "100000",
        "NEST_LOG_LEVEL": "WARNING",
    }
    api = nest_process(["run", "api"], env, tmp / "api.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60, process=api)
        yield f"http://127.0.0.1:{port}"
    finally:
        kill_group(api)
        nats.stop()
