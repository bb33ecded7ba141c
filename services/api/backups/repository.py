"""Every query on the backups table (rows projected from backup events)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.models import Backup


async def get(session: AsyncSession, backup_id: str, *, for_update: bool = False) -> Backup | None:
    query = select(Backup).where(Backup.id == backup_id)
    if for_update:
        query = query.with_for_update()
    result: Backup | None = await session.scalar(query)
    return result


def add(session: AsyncSession, row: Backup) -> None:
    session.add(row)


async def list_page(
    session: AsyncSession,
    *,
    limit: int,
    after: tuple[datetime, str] | None,
    target: str | None = None,
    cluster_id: str | None = None,
    policy_id: str | None = None,
    location_id: str | None = None,
    state: str | None = None,
) -> Sequence[Backup]:
    """Backups ordered by (created_at, id) after the cursor, filtered; one extra to see if more."""
    query = select(Backup).order_by(Backup.created_at, Backup.id).limit(limit + 1)
    if target is not None:
        query = query.where(Backup.target == target)
    if cluster_id is not None:
        query = query.where(Backup.cluster_id == cluster_id)
    if policy_id is not None:
        query = query.where(Backup.policy_id == policy_id)
    if location_id is not None:
        query = query.where(Backup.location_id == location_id)
    if state is not None:
        query = query.where(Backup.state == state)
    if after is not None:
        created, ident = after
        query = query.where(
            or_(
                Backup.created_at > created,
                and_(Backup.created_at == created, Backup.id > ident),
            )
        )
    return (await session.scalars(query)).all()
