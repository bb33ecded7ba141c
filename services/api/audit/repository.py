"""Every query on audit events."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.models import AuditEvent


def add(session: AsyncSession, event: AuditEvent) -> None:
    session.add(event)


async def list_page(
    session: AsyncSession,
    *,
    limit: int,
    after: tuple[datetime, str] | None,
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
    if after is not None:
        time, ident = after
        query = query.where(
            or_(AuditEvent.time < time, and_(AuditEvent.time == time, AuditEvent.id < ident))
        )
    return (await session.scalars(query.limit(limit + 1))).all()
