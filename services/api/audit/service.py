"""Audit domain logic: what a request means as an audit entry, recording it, listing entries."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from services.api.audit import repository
from services.api.audit.schemas import AuditEventRead
from services.api.kit import paging
from services.api.kit.clock import utcnow
from services.api.kit.db import Database, Session
from services.api.kit.paging import Page
from services.api.models import AuditEvent

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1/"
VERBS = {"POST": "create", "PATCH": "update", "PUT": "replace", "DELETE": "delete", "GET": "read"}
SENSITIVE_READS = ("kubeconfig",)
"""GET sub-resources that hand out credentials: audited like writes."""


@dataclass(frozen=True)
class Target:
    resource: str
    resource_id: str | None
    action: str


def target_of(method: str, path: str, location: str | None) -> Target | None:
    """The audit target of a request, or None when it is not audited (plain reads)."""
    if not path.startswith(API_PREFIX):
        return None
    parts = [p for p in path[len(API_PREFIX) :].split("/") if p]
    if not parts:
        return None
    sensitive = method == "GET" and parts[-1] in SENSITIVE_READS
    if method in ("GET", "HEAD", "OPTIONS") and not sensitive:
        return None
    resource = parts[0]
    resource_id = parts[1] if len(parts) > 1 else None
    if resource_id is None and location:
        resource_id = location.rstrip("/").rsplit("/", 1)[-1]
    sub = parts[2:]
    verb = VERBS.get(method, method.lower())
    action = ".".join([resource, *sub, verb])
    return Target(resource=resource, resource_id=resource_id, action=action[:64])


async def add(
    session: Session,
    *,
    method: str,
    path: str,
    target: Target,
    status: int,
    token_id: str | None,
    token_name: str | None,
    correlation_id: str | None,
) -> None:
    """Add one entry to the unit of work (written in its transaction)."""
    await repository.insert(
        session,
        AuditEvent(
            id=str(uuid.uuid4()),
            time=utcnow(),
            token_id=token_id,
            token_name=token_name,
            method=method,
            path=path[:512],
            resource=target.resource[:64],
            resource_id=(target.resource_id or None) and target.resource_id[:64],
            action=target.action,
            status=status,
            correlation_id=correlation_id,
        ),
    )


async def record(
    db: Database,
    *,
    method: str,
    path: str,
    target: Target,
    status: int,
    token_id: str | None,
    token_name: str | None,
    correlation_id: str | None,
) -> None:
    """Store one entry in a transaction of its own. Never raises: an audit failure is logged,
    the response is already sent."""
    try:
        async with db.session() as session:
            await add(
                session,
                method=method,
                path=path,
                target=target,
                status=status,
                token_id=token_id,
                token_name=token_name,
                correlation_id=correlation_id,
            )
            await session.commit()
    except Exception:
        log.exception("could not record an audit event", extra={"action": target.action})


def _aware(moment: datetime | None) -> datetime | None:
    """Query bounds without a zone are taken as UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def to_read(row: AuditEvent) -> AuditEventRead:
    return AuditEventRead.model_validate(row, from_attributes=True)


async def list_events(
    session: Session,
    *,
    limit: int,
    cursor: str | None,
    resource: str | None,
    resource_id: str | None,
    since: datetime | None,
    until: datetime | None,
) -> Page[AuditEventRead]:
    since, until = _aware(since), _aware(until)
    rows = await repository.list_page(
        await session.orm(),
        limit=limit,
        after=paging.after(cursor),
        resource=resource,
        resource_id=resource_id,
        since=since,
        until=until,
    )
    return paging.page_of(rows, limit, to_read, lambda row: (row.time, row.id))
