"""HTTP routes for /api/v1/audit-events (admin)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request

from services.api.audit import service
from services.api.audit.schemas import AuditEventRead
from services.api.auth.dependencies import AdminDep
from services.api.kit.paging import CursorQuery, LimitQuery, Page, link_header
from services.api.kit.responses import ModelResponse
from services.api.kit.unit_of_work import SessionDep

router = APIRouter(prefix="/audit-events", tags=["audit"])


@router.get(
    "",
    response_model=Page[AuditEventRead],
    operation_id="listAuditEvents",
    summary="List audit events",
)
async def list_audit_events(
    request: Request,
    session: SessionDep,
    admin: AdminDep,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
    resource: Annotated[
        str | None, Query(max_length=64, description="e.g. clusters, tokens.")
    ] = None,
    resource_id: Annotated[str | None, Query(alias="resourceId", max_length=64)] = None,
    since: Annotated[
        datetime | None, Query(description="Inclusive lower bound (ISO 8601).")
    ] = None,
    until: Annotated[
        datetime | None, Query(description="Exclusive upper bound (ISO 8601).")
    ] = None,
) -> ModelResponse:
    """Every mutating request (and every credential read), newest first."""
    page = await service.list_events(
        session,
        limit=limit,
        cursor=cursor,
        resource=resource,
        resource_id=resource_id,
        since=since,
        until=until,
    )
    return ModelResponse(page, headers=link_header(request, page.next))
