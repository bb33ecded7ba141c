"""Every query on the clusters table."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.models import Cluster


async def get(
    session: AsyncSession, cluster_id: str, *, for_update: bool = False
) -> Cluster | None:
    query = select(Cluster).where(Cluster.id == cluster_id)
    if for_update:
        query = query.with_for_update()
    result: Cluster | None = await session.scalar(query)
    return result


async def get_by_name(session: AsyncSession, name: str) -> Cluster | None:
    result: Cluster | None = await session.scalar(select(Cluster).where(Cluster.name == name))
    return result


async def list_page(
    session: AsyncSession, *, limit: int, after: tuple[datetime, str] | None
) -> Sequence[Cluster]:
    """Clusters ordered by (created_at, id), starting after the cursor; one extra to see if more."""
    query = select(Cluster).order_by(Cluster.created_at, Cluster.id).limit(limit + 1)
    if after is not None:
        created, ident = after
        query = query.where(
            or_(
                Cluster.created_at > created,
                and_(Cluster.created_at == created, Cluster.id > ident),
            )
        )
    return (await session.scalars(query)).all()


def add(session: AsyncSession, cluster: Cluster) -> None:
    session.add(cluster)


async def remove(session: AsyncSession, cluster_id: str) -> None:
    await session.execute(delete(Cluster).where(Cluster.id == cluster_id))
