"""How a client finds its way: the API root's links, the documents, the docs UI, and health.

`GET /api/v1` answers with a link to every resource collection and to the documents (OpenAPI,
AsyncAPI, the Swagger UI), so the URL `nest up` prints leads somewhere. The Swagger UI is served
from files shipped in a Python package (fastapi-offline), never from a CDN: an airgapped
appliance has no Internet.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from services.api.discovery import asyncapi

API_PREFIX = "/api/v1"
DOCS_ASSETS = f"{API_PREFIX}/docs/assets"
ASSETS = {
    "swagger-ui-bundle.js": "application/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}

COLLECTIONS: dict[str, tuple[str, str]] = {
    "clusters": ("/api/v1/clusters", "Hosted Kubernetes control planes."),
    "backups": ("/api/v1/backups", "Backups of the Foundry DB and of clusters' etcd."),
    "backupPolicies": ("/api/v1/backup-policies", "When, what and where to back up."),
    "backupLocations": ("/api/v1/backup-locations", "Where backups are stored (admin)."),
    "events": ("/api/v1/events", "The event history; /api/v1/events/stream is its live SSE."),
    "webhooks": ("/api/v1/webhooks", "Event deliveries to HTTP receivers (admin)."),
    "tokens": ("/api/v1/tokens", "API tokens (admin)."),
    "auditEvents": ("/api/v1/audit-events", "Who changed what (admin)."),
}
DOCUMENTS: dict[str, tuple[str, str]] = {
    "openapi": ("/api/v1/openapi.json", "The OpenAPI 3.1 document of this API."),
    "asyncapi": ("/api/v1/asyncapi.json", "The AsyncAPI 3 document of the events and intents."),
    "docs": ("/api/v1/docs", "This API in the Swagger UI (served locally, works airgapped)."),
    "health": ("/healthz", "Liveness: 200 while the process serves."),
    "ready": ("/readyz", "Readiness: 200 when the database and NATS answer, else 503."),
}


class Link(BaseModel):
    href: str
    description: str


class ApiIndex(BaseModel):
    """Where everything is: resource collections and documents, by name."""

    title: str
    version: str
    collections: dict[str, Link]
    documents: dict[str, Link]
    authentication: str = Field(
        description="How to authenticate: every collection needs a bearer token."
    )


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description="`ok`, or `unavailable` when any check fails.")
    checks: dict[str, bool]


def _links(table: dict[str, tuple[str, str]]) -> dict[str, Link]:
    return {name: Link(href=href, description=text) for name, (href, text) in table.items()}


@cache
def _asset(name: str) -> bytes:
    return (resources.files("fastapi_offline") / "static" / name).read_bytes()


def router(version: str, readiness: Any) -> APIRouter:
    """The discovery routes; `readiness(app)` returns the readiness checks."""
    routes = APIRouter()
    index = ApiIndex(
        title="Nest Foundry API",
        version=version,
        collections=_links(COLLECTIONS),
        documents=_links(DOCUMENTS),
        authentication="Authorization: Bearer <token> (nest up prints where the admin token is)",
    )
    index_body = index.model_dump_json().encode()
    asyncapi_document = asyncapi.build(version)

    @routes.get(
        API_PREFIX,
        response_model=ApiIndex,
        operation_id="getApiIndex",
        summary="Links to every collection and document",
        tags=["discovery"],
    )
    async def api_index() -> Response:
        """Where to go from here: no token needed."""
        return Response(index_body, media_type="application/json")

    @routes.get(f"{API_PREFIX}/asyncapi.json", include_in_schema=False)
    async def asyncapi_json() -> JSONResponse:
        return JSONResponse(asyncapi_document)

    @routes.get(f"{API_PREFIX}/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=f"{API_PREFIX}/openapi.json",
            title="Nest Foundry API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )

    @routes.get(DOCS_ASSETS + "/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        if name not in ASSETS:
            return Response(status_code=404)
        return Response(
            _asset(name),
            media_type=ASSETS[name],
            headers={"Cache-Control": "public, max-age=86400"},
        )

    @routes.get(
        "/healthz",
        response_model=Health,
        operation_id="getHealth",
        summary="Liveness",
        tags=["health"],
    )
    async def healthz() -> dict[str, str]:
        """200 while the process serves requests (no dependency is checked); no token needed."""
        return {"status": "ok"}

    @routes.get(
        "/readyz",
        response_model=Readiness,
        operation_id="getReadiness",
        summary="Readiness",
        tags=["health"],
        responses={503: {"model": Readiness, "description": "A dependency does not answer."}},
    )
    async def readyz(request: Request) -> JSONResponse:
        """200 when the database answers, NATS is connected with its streams declared, and the
        outbox relay and the projector run; 503 naming what does not. No token needed."""
        checks = await readiness(request.app)
        ok = all(checks.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "checks": checks},
            status_code=200 if ok else 503,
        )

    return routes


def install(app: FastAPI, version: str, readiness: Any) -> None:
    app.include_router(router(version, readiness))
