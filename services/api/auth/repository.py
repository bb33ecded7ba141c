"""Every query on API tokens and system flags."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.models import ApiToken, SystemFlag


async def by_hash(session: AsyncSession, token_hash: str) -> ApiToken | None:
    result: ApiToken | None = await session.scalar(
        select(ApiToken).where(ApiToken.token_hash == token_hash)
    )
    return result


async def get(session: AsyncSession, token_id: str) -> ApiToken | None:
    result: ApiToken | None = await session.get(ApiToken, token_id)
    return result


def add(session: AsyncSession, token: ApiToken) -> None:
    session.add(token)


async def list_page(
    session: AsyncSession, *, limit: int, after: tuple[datetime, str] | None
) -> Sequence[ApiToken]:
    query = select(ApiToken).order_by(ApiToken.created_at, ApiToken.id).limit(limit + 1)
    if after is not None:
        created, ident = after
        query = query.where(
            or_(
                ApiToken.created_at > created,
                and_(ApiToken.created_at == created, ApiToken.id > ident),
            )
        )
    return (await session.scalars(query)).all()


async def flag_exists(session: AsyncSession, key: str) -> bool:
    return await session.get(SystemFlag, key) is not None


def add_flag(session: AsyncSession, key: str, now: datetime) -> None:
    session.add(SystemFlag(key=key, created_at=now))
