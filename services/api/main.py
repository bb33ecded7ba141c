"""Running the API process: resolve NATS (embedded if unset), then serve the app with uvicorn on
uvloop (`asyncio.run(server.serve())` would silently use the default loop)."""

from __future__ import annotations

import asyncio

import uvicorn
import uvloop

from libs.common.logging import configure_logging
from libs.common.runner import resolve_nats
from libs.common.settings import Settings
from services.api.app import create_app


def run(settings: Settings) -> None:
    configure_logging("api", settings.log_level)
    nats = resolve_nats(settings)
    try:
        app = create_app(settings.model_copy(update={"nats_url": nats.url}))
        config = uvicorn.Config(
            app,
            host=settings.api_host,
            port=settings.api_port,
            loop="uvloop",
            http="httptools",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(settings.shutdown_timeout_seconds),
            lifespan="on",
        )
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(uvicorn.Server(config).serve())
    finally:
        nats.stop()
