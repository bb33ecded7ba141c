"""Every query on backup policies."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.models import BackupLocation, BackupPolicy, Cluster


async def get(
    session: AsyncSession, policy_id: str, *, for_update: bool = False
) -> BackupPolicy | None:
    query = select(BackupPolicy).where(BackupPolicy.id == policy_id)
    if for_update:
        query = query.with_for_update()
    result: BackupPolicy | None = await session.scalar(query)
    return result


async def get_by_name(session: AsyncSession, name: str) -> BackupPolicy | None:
    result: BackupPolicy | None = await session.scalar(
        select(BackupPolicy).where(BackupPolicy.name == name)
    )
    return result


async def count(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(BackupPolicy)) or 0)


async def names_using_location(session: AsyncSession, location_id: str) -> list[str]:
    result = await session.scalars(
        select(BackupPolicy.name)
        .where(BackupPolicy.location_id == location_id)
        .order_by(BackupPolicy.name)
    )
    return list(result.all())


async def location_exists(session: AsyncSession, location_id: str) -> bool:
    found = await session.scalar(select(BackupLocation.id).where(BackupLocation.id == location_id))
    return found is not None


async def live_cluster_ids(session: AsyncSession, cluster_ids: Sequence[str]) -> set[str]:
    """Those of `cluster_ids` that exist and are not being deleted."""
    if not cluster_ids:
        return set()
    result = await session.scalars(
        select(Cluster.id).where(
            Cluster.id.in_(list(cluster_ids)), Cluster.deletion_requested_at.is_(None)
        )
    )
    return set(result.all())


async def all_policies(session: AsyncSession) -> Sequence[BackupPolicy]:
    return (await session.scalars(select(BackupPolicy).order_by(BackupPolicy.created_at))).all()


async def all_locations(session: AsyncSession) -> Sequence[BackupLocation]:
    return (await session.scalars(select(BackupLocation).order_by(BackupLocation.created_at))).all()


def add(session: AsyncSession, row: BackupPolicy) -> None:
    session.add(row)


async def remove(session: AsyncSession, policy_id: str) -> None:
    await session.execute(delete(BackupPolicy).where(BackupPolicy.id == policy_id))


async def list_page(
    session: AsyncSession, *, limit: int, after: tuple[datetime, str] | None
) -> Sequence[BackupPolicy]:
    query = select(BackupPolicy).order_by(BackupPolicy.created_at, BackupPolicy.id)
    query = query.limit(limit + 1)
    if after is not None:
        created, ident = after
        query = query.where(
            or_(
                BackupPolicy.created_at > created,
                and_(BackupPolicy.created_at == created, BackupPolicy.id > ident),
            )
        )
    return (await session.scalars(query)).all()
