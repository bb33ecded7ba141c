"""Every query on audit events."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.kit.db import Session, sql
from services.api.kit.paging import After, keyset
from services.api.models import AuditEvent

_INSERT = sql(
    "INSERT INTO audit_events (id, time, token_id, token_name, method, path, resource, "
    "resource_id, action, status, correlation_id) VALUES (:id, :time, :token_id, :token_name, "
    ":method, :path, :resource, :resource_id, :action, :status, :correlation_id)"
)


async def insert(session: Session, event: AuditEvent) -> None:
    """Lean: the audit row rides in the request's own transaction."""
    session.defer(
        _INSERT,
        {
            "id": event.id,
            "time": session.db.stamp(event.time),
            "token_id": event.token_id,
            "token_name": event.token_name,
            "method": event.method,
            "path": event.path,
            "resource": event.resource,
            "resource_id": event.resource_id,
            "action": event.action,
            "status": event.status,
            "correlation_id": event.correlation_id,
        },
    )


async def list_page(
    session: AsyncSession,
    *,
    limit: int,
    after: After | None,
    resource: str | None,
    resource_id: str | None,
    since: datetime | None,
    until: datetime | None,
) -> Sequence[AuditEvent]:
    """Newest first, ordered by (time, id) descending; `after` is the last item seen."""
    query = select(AuditEvent).order_by(AuditEvent.time.desc(), AuditEvent.id.desc())
    if resource:
        query = query.where(AuditEvent.resource == resource)
    if resource_id:
        query = query.where(AuditEvent.resource_id == resource_id)
    if since:
        query = query.where(AuditEvent.time >= since)
    if until:
        query = query.where(AuditEvent.time < until)
    if (condition := keyset(AuditEvent.time, AuditEvent.id, after, descending=True)) is not None:
        query = query.where(condition)
    return (await session.scalars(query.limit(limit + 1))).all()
