"""Running the backup process: resolve NATS (embedded if unset), then run the service."""

from __future__ import annotations

import asyncio

from libs.common.logging import configure_logging
from libs.common.nats_server import resolve_nats
from libs.common.runner import run_service
from libs.common.settings import Settings
from services.backup.service import BackupService


def run(settings: Settings) -> None:
    configure_logging("backup", settings.log_level)
    service = BackupService(settings)  # bad backup settings stop start-up with a clear message
    nats = resolve_nats(settings)
    try:
        asyncio.run(run_service(service, settings, nats.url))
    finally:
        nats.stop()


if __name__ == "__main__":
    from libs.common.settings import load_settings

    run(load_settings())
