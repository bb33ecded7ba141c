"""The Foundry API application: lifespan (DB, bus, relay, projector), routers, error mapping."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from libs.common.bus import Bus, Consumer, StreamSettings, servers_from_url
from libs.common.secrets import sealer_from_settings
from libs.common.settings import Settings
from libs.common.tasks import TaskSet
from services.api import asyncapi, openapi, problems
from services.api.audit.endpoints import router as audit_router
from services.api.auth import service as auth
from services.api.auth.endpoints import router as tokens_router
from services.api.backup_locations.endpoints import router as backup_locations_router
from services.api.backup_policies import sync as backup_policies_sync
from services.api.backup_policies.endpoints import router as backup_policies_router
from services.api.backups.endpoints import router as backups_router
from services.api.clusters.endpoints import router as clusters_router
from services.api.db import create_engine, migrate, session_factory
from services.api.events.endpoints import router as events_router
from services.api.events.service import EventFeed
from services.api.idempotency import service as idempotency
from services.api.middleware import (
    AuditMiddleware,
    BodyLimitMiddleware,
    CorrelationIdMiddleware,
    IdempotencyMiddleware,
    RateLimitMiddleware,
)
from services.api.outbox.relay import OutboxRelay
from services.api.projector import Projector
from services.api.ratelimit import RateLimiter
from services.api.restores.endpoints import router as restores_router
from services.api.webhooks import service as webhooks_service
from services.api.webhooks.delivery import DeliveryWorker
from services.api.webhooks.endpoints import router as webhooks_router

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
VERSION = "0.1.0"
MAX_BODY_BYTES = 1024 * 1024
OPENAPI_TAGS = [
    {"name": "clusters", "description": "Hosted Kubernetes control planes."},
    {"name": "tokens", "description": "API tokens and their scopes (admin)."},
    {"name": "audit", "description": "Who changed what (admin)."},
    {"name": "events", "description": "The event history and its live stream."},
    {"name": "webhooks", "description": "Event deliveries to HTTP receivers (admin)."},
]


def stream_settings(settings: Settings) -> StreamSettings:
    return StreamSettings(
        events_max_age_seconds=settings.events_max_age_days * 86400,
        duplicate_window_seconds=settings.duplicate_window_seconds,
    )


async def _start_messaging(app: FastAPI, settings: Settings) -> None:
    """Connect (retrying forever), declare streams, then start the relay and the projector."""
    bus: Bus = app.state.bus
    tasks: TaskSet = app.state.tasks
    await bus.connect()
    while True:
        try:
            await bus.ensure_streams(stream_settings(settings))
            break
        except Exception as exc:
            log.warning("declaring streams failed (%s); retrying", exc)
            await asyncio.sleep(1)
    app.state.streams_ready = True
    tasks.spawn("outbox-relay", app.state.relay.run())
    consumer: Consumer = Projector(app.state.sessions, app.state.events.record).consumer(
        bus, max_deliver=settings.max_deliver
    )
    app.state.projector = consumer
    tasks.spawn("projector", consumer.run())


async def _housekeeping(app: FastAPI) -> None:
    """Expire idempotency records (kept 24 h) every few minutes."""
    while True:
        try:
            await idempotency.purge(app.state.sessions)
        except Exception:
            log.exception("housekeeping failed")
        await asyncio.sleep(300)


def create_app(settings: Settings) -> FastAPI:
    """The API for these settings. `settings.nats_url` must be resolved (the runner does it)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.resolved_database_url)
        await migrate(engine)
        app.state.engine = engine
        app.state.sessions = session_factory(engine)
        app.state.token_cache = auth.TokenCache()
        app.state.admin_token_file = await auth.bootstrap_admin(
            app.state.sessions, settings.data_dir, settings.admin_token
        )
        app.state.sealer = sealer_from_settings(settings)
        async with app.state.sessions() as session:
            await webhooks_service.seal_clear_secrets(session, app.state.sealer)
        # The backup service's copy of locations and policies converges even if it was lost.
        await backup_policies_sync.restage_all(app.state.sessions)
        app.state.bus = Bus(servers_from_url(settings.nats_url or ""), name="nest-api")
        app.state.relay = OutboxRelay(app.state.sessions, app.state.bus)
        app.state.tasks = TaskSet()
        app.state.streams_ready = False
        app.state.projector = None
        app.state.webhooks = DeliveryWorker(app.state.sessions, settings, sealer=app.state.sealer)
        app.state.events = EventFeed(
            app.state.sessions, settings, on_recorded=[app.state.webhooks.notify]
        )
        app.state.tasks.spawn("event-feed", app.state.events.run())
        app.state.tasks.spawn("webhook-delivery", app.state.webhooks.run())
        app.state.tasks.spawn("messaging", _start_messaging(app, settings))
        app.state.tasks.spawn("housekeeping", _housekeeping(app))
        log.info("api started", extra={"url": settings.api_url})
        try:
            yield
        finally:
            consumer: Consumer | None = app.state.projector
            if consumer is not None:
                await consumer.drain(settings.shutdown_timeout_seconds)
            try:
                await app.state.tasks.stop(settings.shutdown_timeout_seconds)
            except Exception:
                log.exception("a background task had failed")
            await app.state.bus.close()
            await engine.dispose()
            log.info("api stopped")

    app = FastAPI(
        title="Nest Foundry API",
        version=VERSION,
        description=(
            "Manage hosted Kubernetes control planes on bare metal. Errors are RFC 9457 "
            "problem details; JSON field names are camelCase."
        ),
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
        openapi_tags=OPENAPI_TAGS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    problems.install(app)
    # add_middleware wraps: the last added is the outermost.
    app.add_middleware(IdempotencyMiddleware)
    app.add_middleware(AuditMiddleware)
    app.add_middleware(
        RateLimitMiddleware,
        limiter=RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst),
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(CorrelationIdMiddleware)

    api = APIRouter(prefix=API_PREFIX)
    api.include_router(clusters_router)
    api.include_router(tokens_router)
    api.include_router(events_router)
    api.include_router(webhooks_router)
    api.include_router(audit_router)
    api.include_router(backup_locations_router)
    api.include_router(backup_policies_router)
    api.include_router(backups_router)
    api.include_router(restores_router)
    app.include_router(api)
    openapi.install(app)

    asyncapi_document = asyncapi.build(VERSION)

    @app.get(f"{API_PREFIX}/asyncapi.json", include_in_schema=False)
    async def asyncapi_json() -> JSONResponse:
        return JSONResponse(asyncapi_document)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        checks = await readiness(request.app)
        ok = all(checks.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "checks": checks},
            status_code=200 if ok else 503,
        )

    return app


async def readiness(app: FastAPI) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    try:
        async with app.state.sessions() as session:
            await session.execute(text("SELECT 1"))
        checks["database"] = True
    except Exception:
        checks["database"] = False
    bus: Bus = app.state.bus
    checks["nats"] = bus.connected and bool(app.state.streams_ready)
    tasks: TaskSet = app.state.tasks
    checks["outboxRelay"] = tasks.alive("outbox-relay")
    checks["projector"] = tasks.alive("projector")
    return checks
