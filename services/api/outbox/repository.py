"""Every query on the outbox table."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.contract import Envelope
from services.api.models import OutboxMessage, utcnow


def add(session: AsyncSession, subject: str, envelope: Envelope) -> None:
    """Stage an envelope in the caller's transaction; it is published only if that commits."""
    session.add(
        OutboxMessage(
            event_id=envelope.id,
            subject=subject,
            envelope=envelope.to_bytes().decode(),
            created_at=utcnow(),
        )
    )


async def pending(session: AsyncSession, limit: int) -> Sequence[OutboxMessage]:
    """The oldest unpublished messages, in commit order."""
    result = await session.scalars(
        select(OutboxMessage)
        .where(OutboxMessage.sent_at.is_(None))
        .order_by(OutboxMessage.id)
        .limit(limit)
    )
    return result.all()


async def mark_sent(session: AsyncSession, ids: Sequence[int], when: datetime) -> None:
    await session.execute(
        update(OutboxMessage).where(OutboxMessage.id.in_(ids)).values(sent_at=when)
    )


async def purge_sent_before(session: AsyncSession, cutoff: datetime) -> int:
    result = await session.execute(
        delete(OutboxMessage).where(
            OutboxMessage.sent_at.is_not(None), OutboxMessage.sent_at < cutoff
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)
