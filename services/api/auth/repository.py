"""Every query on API tokens and system flags."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.kit.db import Session, sql
from services.api.kit.paging import After, keyset
from services.api.models import ApiToken, SystemFlag


@dataclass(frozen=True)
class TokenCheck:
    """What authenticating a token needs of its row."""

    id: str
    name: str
    scope: str
    expires_at: datetime
    revoked_at: datetime | None


_BY_HASH = sql(
    "SELECT id, name, scope, expires_at, revoked_at FROM api_tokens WHERE token_hash = :hash"
)


async def by_hash(session: Session, token_hash: str) -> TokenCheck | None:
    row = await session.fetchrow(_BY_HASH, {"hash": token_hash})
    if row is None:
        return None
    db = session.db
    return TokenCheck(
        str(row[0]), str(row[1]), str(row[2]), db.moment(row[3]), db.moment_or_none(row[4])
    )


async def get(session: AsyncSession, token_id: str) -> ApiToken | None:
    result: ApiToken | None = await session.get(ApiToken, token_id)
    return result


def add(session: AsyncSession, token: ApiToken) -> None:
    session.add(token)


async def list_page(
    session: AsyncSession, *, limit: int, after: After | None
) -> Sequence[ApiToken]:
    query = select(ApiToken).order_by(ApiToken.created_at, ApiToken.id).limit(limit + 1)
    if (condition := keyset(ApiToken.created_at, ApiToken.id, after)) is not None:
        query = query.where(condition)
    return (await session.scalars(query)).all()


async def flag_exists(session: AsyncSession, key: str) -> bool:
    return await session.get(SystemFlag, key) is not None


def add_flag(session: AsyncSession, key: str, now: datetime) -> None:
    session.add(SystemFlag(key=key, created_at=now))
