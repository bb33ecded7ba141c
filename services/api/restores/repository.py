"""Every query on the restores table."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.models import Restore


async def get(
    session: AsyncSession, restore_id: str, *, for_update: bool = False
) -> Restore | None:
    query = select(Restore).where(Restore.id == restore_id)
    if for_update:
        query = query.with_for_update()
    result: Restore | None = await session.scalar(query)
    return result


async def active_for(session: AsyncSession, cluster_id: str) -> Restore | None:
    """The cluster's restore that has not finished, if any."""
    result: Restore | None = await session.scalar(
        select(Restore).where(Restore.active_cluster_id == cluster_id)
    )
    return result


def add(session: AsyncSession, row: Restore) -> None:
    session.add(row)


async def list_page(
    session: AsyncSession, cluster_id: str, *, limit: int, after: tuple[datetime, str] | None
) -> Sequence[Restore]:
    """The cluster's restores by (created_at, id) after the cursor; one extra to see if more."""
    query = (
        select(Restore)
        .where(Restore.cluster_id == cluster_id)
        .order_by(Restore.created_at, Restore.id)
        .limit(limit + 1)
    )
    if after is not None:
        created, ident = after
        query = query.where(
            or_(
                Restore.created_at > created,
                and_(Restore.created_at == created, Restore.id > ident),
            )
        )
    return (await session.scalars(query)).all()
