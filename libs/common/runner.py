"""The service runner: one process, one service, with health endpoints, signals and heartbeats.

A service is an object with `start(bus)`, `stop(timeout)` and `ready()`. The runner connects the
bus (retrying forever), serves `/healthz` and `/readyz` on a small port of its own, publishes
heartbeats, and on SIGTERM/SIGINT drains the service within `shutdown_timeout_seconds`.
The API does not use this runner's HTTP server: it serves the same endpoints on its own app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from typing import Any, Protocol

from libs.common.bus import Bus, StreamSettings, servers_from_url
from libs.common.contract import heartbeat_subject
from libs.common.nats_server import NatsEndpoint, resolve_nats
from libs.common.settings import Settings
from libs.common.tasks import TaskSet

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0


class Service(Protocol):
    name: str

    async def start(self, bus: Bus) -> None:
        """Start consumers and loops (return once they run)."""

    async def stop(self, timeout: float) -> None:
        """Drain consumers and stop loops within `timeout`."""

    async def ready(self) -> dict[str, bool]:
        """Whether each dependency of the service answers."""


def instance_name(settings: Settings) -> str:
    return settings.instance or f"{socket.gethostname()}-{os.getpid()}"


class HealthServer:
    """A tiny HTTP server answering GET /healthz and GET /readyz for a non-HTTP service."""

    def __init__(self, service: Service, bus: Bus, host: str, port: int) -> None:
        self.service = service
        self.bus = bus
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            body: dict[str, Any]
            if path == "/healthz":
                status, body = 200, {"status": "ok"}
            elif path == "/readyz":
                checks = {"nats": self.bus.connected}
                with contextlib.suppress(Exception):
                    checks.update(await self.service.ready())
                ok = all(checks.values())
                status, body = (
                    (200 if ok else 503),
                    {
                        "status": "ok" if ok else "unavailable",
                        "checks": checks,
                    },
                )
            else:
                status, body = 404, {"title": "Not Found", "status": 404}
            payload = json.dumps(body).encode()
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


async def _heartbeats(bus: Bus, service: str, instance: str) -> None:
    started = time.time()
    while True:
        if bus.connected:
            body = {
                "service": service,
                "instance": instance,
                "startedAt": started,
                "time": time.time(),
            }
            with contextlib.suppress(Exception):
                await bus.nc.publish(
                    heartbeat_subject(service, instance), json.dumps(body).encode()
                )
        await asyncio.sleep(HEARTBEAT_SECONDS)


async def run_service(service: Service, settings: Settings, nats_url: str) -> None:
    """Run `service` until SIGTERM/SIGINT, then drain it within the shutdown bound."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    instance = instance_name(settings)
    bus = Bus(servers_from_url(nats_url), name=f"nest-{service.name}-{instance}")
    tasks = TaskSet()
    health = HealthServer(service, bus, settings.health_host, settings.health_port)
    await health.start()
    log.info("%s health endpoints on http://%s:%d", service.name, health.host, health.port)

    async def start() -> None:
        await bus.connect()
        await bus.ensure_streams(
            StreamSettings(
                events_max_age_seconds=settings.events_max_age_days * 86400,
                duplicate_window_seconds=settings.duplicate_window_seconds,
            )
        )
        await service.start(bus)
        log.info("%s started", service.name)

    tasks.spawn("start", start())
    tasks.spawn("heartbeats", _heartbeats(bus, service.name, instance))
    await stop.wait()
    log.info("%s stopping", service.name)
    try:
        await asyncio.wait_for(
            service.stop(settings.shutdown_timeout_seconds), settings.shutdown_timeout_seconds + 1
        )
    except TimeoutError:
        log.warning("%s did not drain within the shutdown bound", service.name)
    try:
        await tasks.stop(2.0)
    finally:
        await health.stop()
        await bus.close()
    log.info("%s stopped", service.name)


__all__ = [
    "HealthServer",
    "NatsEndpoint",  # moved to libs.common.nats_server; kept here for older imports
    "Service",
    "instance_name",
    "resolve_nats",  # moved to libs.common.nats_server; kept here for older imports
    "run_service",
]
