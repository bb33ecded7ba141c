"""Every query on backup locations."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.models import BackupLocation


async def get(session: AsyncSession, location_id: str) -> BackupLocation | None:
    result: BackupLocation | None = await session.get(BackupLocation, location_id)
    return result


async def get_by_name(session: AsyncSession, name: str) -> BackupLocation | None:
    result: BackupLocation | None = await session.scalar(
        select(BackupLocation).where(BackupLocation.name == name)
    )
    return result


def add(session: AsyncSession, row: BackupLocation) -> None:
    session.add(row)


async def remove(session: AsyncSession, location_id: str) -> None:
    await session.execute(delete(BackupLocation).where(BackupLocation.id == location_id))


async def list_page(
    session: AsyncSession, *, limit: int, after: tuple[datetime, str] | None
) -> Sequence[BackupLocation]:
    query = select(BackupLocation).order_by(BackupLocation.created_at, BackupLocation.id)
    query = query.limit(limit + 1)
    if after is not None:
        created, ident = after
        query = query.where(
            or_(
                BackupLocation.created_at > created,
                and_(BackupLocation.created_at == created, BackupLocation.id > ident),
            )
        )
    return (await session.scalars(query)).all()
