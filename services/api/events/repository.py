"""Every query on the event history."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, delete, func, not_, or_, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.events.filters import EventFilter
from services.api.models import EventRecord

APPEND_LOCK_KEY = 0x4E455354_0001
"""PostgreSQL advisory lock that serialises appends, so positions become visible in order."""


async def lock_for_append(session: AsyncSession) -> None:
    """Hold the append lock until this transaction ends (PostgreSQL; SQLite has one writer).

    A reader that has seen position N must never later find a new row below N: that is what lets
    the stream and the list resume from a position without gaps.
    """
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": APPEND_LOCK_KEY})


async def insert_if_absent(session: AsyncSession, values: dict[str, Any]) -> int | None:
    """Store an event unless its id is already stored; the new row's position, or None."""
    dialect = session.get_bind().dialect.name
    builder = pg_insert if dialect == "postgresql" else sqlite_insert
    statement = (
        builder(EventRecord)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(EventRecord.position)
    )
    position: int | None = await session.scalar(statement)
    return position


def _where(query: Select[Any], where: EventFilter) -> Select[Any]:
    conditions: list[ColumnElement[bool]] = []
    if where.patterns:
        conditions.append(
            or_(
                *(
                    EventRecord.type.startswith(p.prefix, autoescape=True)
                    if p.prefix is not None
                    else EventRecord.type == p.text
                    for p in where.patterns
                )
            )
        )
    if where.subject is not None:
        conditions.append(EventRecord.subject == where.subject)
    conditions.extend(
        not_(EventRecord.type.startswith(prefix, autoescape=True))
        for prefix in where.hidden_prefixes
    )
    return query.where(and_(*conditions)) if conditions else query


async def page(
    session: AsyncSession,
    where: EventFilter,
    *,
    after: int,
    limit: int,
    upto: int | None = None,
) -> Sequence[EventRecord]:
    """Matching events with position in (after, upto], oldest first."""
    query = select(EventRecord).where(EventRecord.position > after)
    if upto is not None:
        query = query.where(EventRecord.position <= upto)
    query = _where(query, where).order_by(EventRecord.position).limit(limit)
    return (await session.scalars(query)).all()


async def after(session: AsyncSession, position: int, limit: int) -> Sequence[EventRecord]:
    """Every event after `position`, oldest first (what the broadcaster fans out)."""
    query = (
        select(EventRecord)
        .where(EventRecord.position > position)
        .order_by(EventRecord.position)
        .limit(limit)
    )
    return (await session.scalars(query)).all()


async def last_position(session: AsyncSession) -> int:
    value: int | None = await session.scalar(select(func.max(EventRecord.position)))
    return value or 0


async def prune_batch(session: AsyncSession, cutoff: datetime, limit: int) -> int:
    """Delete up to `limit` events recorded before `cutoff` (their deliveries cascade)."""
    doomed = (
        select(EventRecord.position)
        .where(EventRecord.recorded_at < cutoff)
        .order_by(EventRecord.position)
        .limit(limit)
    )
    positions = list((await session.scalars(doomed)).all())
    if not positions:
        return 0
    await session.execute(delete(EventRecord).where(EventRecord.position.in_(positions)))
    return len(positions)
