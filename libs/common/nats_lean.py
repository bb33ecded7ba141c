"""Imports the NATS client without aiohttp: nats-py imports aiohttp when it is first imported,
for a WebSocket transport Nest never uses (it connects over nats://), and aiohttp costs about
11 MiB resident in every process. Hidden while nats is first imported, it stays out of every
process that needs no aiohttp of its own; a module that needs it imports it as usual later.

`libs.common.bus` imports this module before nats, and every service's entry point imports the
bus before anything else imports nats; if nats or aiohttp was already imported, nothing changes.
"""

from __future__ import annotations

import sys


def import_nats_without_websockets() -> None:
    if "nats" in sys.modules or "aiohttp" in sys.modules:
        return
    sys.modules["aiohttp"] = None  # type: ignore[assignment]  # `import aiohttp` -> ImportError
    try:
        import nats.aio.client  # noqa: F401
    finally:
        del sys.modules["aiohttp"]


import_nats_without_websockets()
