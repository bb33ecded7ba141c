"""Running the provisioner process: resolve NATS (embedded if unset), then run the service."""

from __future__ import annotations

import asyncio

from libs.common.logging import configure_logging
from libs.common.nats_server import resolve_nats
from libs.common.runner import run_service
from libs.common.settings import Settings
from services.provisioner.service import ProvisionerService


def run(settings: Settings) -> None:
    configure_logging("provisioner", settings.log_level)
    nats = resolve_nats(settings)
    try:
        asyncio.run(run_service(ProvisionerService(settings), settings, nats.url))
    finally:
        nats.stop()


if __name__ == "__main__":
    from libs.common.settings import load_settings

    run(load_settings())
