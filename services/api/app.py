"""The Foundry API application: the lifespan (DB, bus, outbox relay, projector), the routers,
the middleware and the error mapping. Every long-lived task runs in the app's `TaskSet`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI

from libs.common.bus import Bus, StreamSettings, servers_from_url
from libs.common.secrets import sealer_from_settings
from libs.common.settings import Settings
from libs.common.tasks import TaskSet
from services.api.audit.endpoints import router as audit_router
from services.api.audit.middleware import AuditMiddleware, record_in_transaction
from services.api.auth import service as auth
from services.api.auth.endpoints import router as tokens_router
from services.api.backup_locations import sync as backups_sync
from services.api.backup_locations.endpoints import router as backup_locations_router
from services.api.backup_policies.endpoints import router as backup_policies_router
from services.api.backups.endpoints import router as backups_router
from services.api.clusters.endpoints import router as clusters_router
from services.api.discovery import endpoints as discovery
from services.api.events.endpoints import router as events_router
from services.api.events.service import EventFeed
from services.api.idempotency import service as idempotency
from services.api.idempotency.middleware import IdempotencyMiddleware
from services.api.kit import openapi, problems
from services.api.kit.db import Database, sql
from services.api.kit.middleware import (
    BodyLimitMiddleware,
    CorrelationIdMiddleware,
    RateLimitMiddleware,
)
from services.api.kit.outbox import Outbox
from services.api.kit.ratelimit import RateLimiter
from services.api.kit.unit_of_work import UnitOfWorkMiddleware
from services.api.projector import Projector
from services.api.restores.endpoints import router as restores_router
from services.api.webhooks import service as webhooks_service
from services.api.webhooks.delivery import DeliveryWorker
from services.api.webhooks.endpoints import router as webhooks_router

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
VERSION = "0.1.0"
MAX_BODY_BYTES = 1024 * 1024
OPENAPI_TAGS = [
    {"name": "discovery", "description": "Where everything is (no token needed)."},
    {"name": "clusters", "description": "Hosted Kubernetes control planes."},
    {"name": "restores", "description": "Restoring a cluster's etcd from a backup."},
    {"name": "backups", "description": "Backups, backup policies and backup locations."},
    {"name": "events", "description": "The event history and its live stream."},
    {"name": "webhooks", "description": "Event deliveries to HTTP receivers (admin)."},
    {"name": "tokens", "description": "API tokens and their scopes (admin)."},
    {"name": "audit", "description": "Who changed what (admin)."},
    {"name": "health", "description": "Liveness and readiness probes (no token needed)."},
]
HOUSEKEEPING_SECONDS = 300.0
_SELECT_ONE = sql("SELECT 1")


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
    tasks.spawn("outbox-relay", app.state.outbox.run())
    tasks.spawn("projector", app.state.projector.run())


async def _housekeeping(app: FastAPI) -> None:
    """Expire idempotency records (kept 24 h) every few minutes."""
    while True:
        try:
            await idempotency.purge(app.state.db)
        except Exception:
            log.exception("housekeeping failed")
        await asyncio.sleep(HOUSEKEEPING_SECONDS)


def create_app(settings: Settings) -> FastAPI:
    """The API for these settings. `settings.nats_url` must be resolved (the runner does it)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.resolved_database_url)
        await db.migrate()
        app.state.db = db
        app.state.sessions = db.orm_sessions
        app.state.token_cache = auth.TokenCache()
        app.state.admin_token_file = await auth.bootstrap_admin(
            db, settings.data_dir, settings.admin_token
        )
        app.state.sealer = sealer_from_settings(settings)
        async with db.orm_sessions() as session:
            await webhooks_service.seal_clear_secrets(session, app.state.sealer)
        bus = app.state.bus = Bus(servers_from_url(settings.nats_url or ""), name="nest-api")
        outbox = app.state.outbox = app.state.relay = Outbox(db, bus)
        webhooks = app.state.webhooks = DeliveryWorker(
            db.orm_sessions, settings, sealer=app.state.sealer
        )
        events = app.state.events = EventFeed(
            db, settings, stagers=[webhooks_service.DeliveryStager(webhooks.notify)]
        )
        outbox.on_event.append(events.on_api_events)
        # The backup service's copy of locations and policies converges even if it was lost.
        await backups_sync.restage_all(db)
        app.state.projector = Projector(db, bus, events, max_deliver=settings.max_deliver)
        app.state.streams_ready = False
        tasks = app.state.tasks = TaskSet()
        tasks.spawn("event-feed", events.run())
        tasks.spawn("webhook-delivery", webhooks.run())
        tasks.spawn("messaging", _start_messaging(app, settings))
        tasks.spawn("housekeeping", _housekeeping(app))
        log.info("api started", extra={"url": settings.api_url})
        try:
            yield
        finally:
            await app.state.projector.drain(settings.shutdown_timeout_seconds)
            try:
                await tasks.stop(settings.shutdown_timeout_seconds)
            except Exception:
                log.exception("a background task had failed")
            await bus.close()
            await db.dispose()
            log.info("api stopped")

    app = FastAPI(
        title="Nest Foundry API",
        version=VERSION,
        description=(
            "Manage hosted Kubernetes control planes on bare metal. Start at `GET /api/v1`, "
            "which links every collection and document. Errors are RFC 9457 problem details; "
            "JSON field names are camelCase. Resources addressed by id also take their name "
            "where names are unique (clusters, backup policies, backup locations, webhooks); "
            "an id wins should a name look like another resource's id."
        ),
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,
        redoc_url=None,
        openapi_tags=OPENAPI_TAGS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    problems.install(app)
    # add_middleware wraps: the last added is the outermost.
    app.add_middleware(UnitOfWorkMiddleware, on_success=[record_in_transaction])
    app.add_middleware(IdempotencyMiddleware)
    app.add_middleware(AuditMiddleware)
    app.add_middleware(
        RateLimitMiddleware,
        limiter=RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst),
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(CorrelationIdMiddleware)

    api = APIRouter(prefix=API_PREFIX)
    for router in (
        clusters_router,
        restores_router,
        backups_router,
        backup_policies_router,
        backup_locations_router,
        events_router,
        webhooks_router,
        tokens_router,
        audit_router,
    ):
        api.include_router(router)
    app.include_router(api)
    discovery.install(app, VERSION, readiness)
    openapi.install(app)
    return app


async def readiness(app: FastAPI) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    db: Database = app.state.db
    try:
        async with db.session() as session:
            await session.fetchval(_SELECT_ONE)
        checks["database"] = True
    except Exception:
        checks["database"] = False
    bus: Bus = app.state.bus
    checks["nats"] = bus.connected and bool(app.state.streams_ready)
    tasks: TaskSet = app.state.tasks
    checks["outboxRelay"] = tasks.alive("outbox-relay")
    checks["projector"] = tasks.alive("projector")
    return checks
