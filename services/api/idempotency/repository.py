"""Every query on idempotency records."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.models import IdempotencyRecord


async def get(session: AsyncSession, owner: str, key: str) -> IdempotencyRecord | None:
    result: IdempotencyRecord | None = await session.get(IdempotencyRecord, (owner, key))
    return result


def add(session: AsyncSession, record: IdempotencyRecord) -> None:
    session.add(record)


async def complete(
    session: AsyncSession,
    owner: str,
    key: str,
    status: int,
    body: str,
    headers: dict[str, Any],
) -> None:
    await session.execute(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.owner == owner, IdempotencyRecord.key == key)
        .values(status=status, response_body=body, response_headers=headers)
    )


async def remove(session: AsyncSession, owner: str, key: str) -> None:
    await session.execute(
        delete(IdempotencyRecord).where(
            IdempotencyRecord.owner == owner, IdempotencyRecord.key == key
        )
    )


async def purge_expired(session: AsyncSession, now: datetime) -> int:
    result = await session.execute(
        delete(IdempotencyRecord).where(IdempotencyRecord.expires_at < now)
    )
    return int(getattr(result, "rowcount", 0) or 0)
