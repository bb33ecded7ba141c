"""Every query on the event history."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, delete, not_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.events.filters import EventFilter
from services.api.kit.db import Row, Session, Sql, sql
from services.api.models import EventRecord

APPEND_LOCK_KEY = 0x4E455354_0001
"""PostgreSQL advisory lock that serialises appends, so positions become visible in order."""


_LOCK = sql("SELECT pg_advisory_xact_lock(:key)")
_INSERT = sql(
    "INSERT INTO events (id, type, source, subject, time, correlation_id, stream_sequence, "
    "envelope, recorded_at) VALUES (:id, :type, :source, :subject, :time, :correlation_id, "
    ":stream_sequence, :envelope, :recorded_at) ON CONFLICT (id) DO NOTHING RETURNING position"
)
_AFTER = sql(
    "SELECT position, type, subject, envelope FROM events WHERE position > :position "
    "ORDER BY position LIMIT :limit"
)
_LAST = sql("SELECT max(position) FROM events")


async def lock_for_append(session: Session) -> None:
    """Hold the append lock until this transaction ends (PostgreSQL; SQLite has one writer).

    A reader that has seen position N must never later find a new row below N: that is what lets
    the stream and the list resume from a position without gaps.
    """
    if session.db.sqlite:
        await session.lock()
    else:
        await session.returning(_LOCK, {"key": APPEND_LOCK_KEY})


_COLUMNS = (
    "id",
    "type",
    "source",
    "subject",
    "time",
    "correlation_id",
    "stream_sequence",
    "envelope",
    "recorded_at",
)
_INSERT_MANY: dict[int, Sql] = {}
MAX_ROWS_PER_INSERT = 500


def _insert_many(count: int) -> Sql:
    statement = _INSERT_MANY.get(count)
    if statement is None:
        rows = ", ".join("(" + ", ".join(f":{c}{n}" for c in _COLUMNS) + ")" for n in range(count))
        statement = _INSERT_MANY[count] = sql(
            f"INSERT INTO events ({', '.join(_COLUMNS)}) VALUES {rows} "  # noqa: S608
            "ON CONFLICT (id) DO NOTHING RETURNING id, position"
        )
    return statement


async def insert_many(session: Session, rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Store events unless their id is already stored, in one statement per 500; the new rows'
    positions by event id (positions follow the order of `rows`)."""
    db = session.db
    positions: dict[str, int] = {}
    for start in range(0, len(rows), MAX_ROWS_PER_INSERT):
        chunk = rows[start : start + MAX_ROWS_PER_INSERT]
        params: dict[str, Any] = {}
        for n, values in enumerate(chunk):
            encoded = {
                **values,
                "time": db.stamp(values["time"]),
                "recorded_at": db.stamp(values["recorded_at"]),
                "envelope": db.dumps(values["envelope"]),
            }
            for column in _COLUMNS:
                params[f"{column}{n}"] = encoded[column]
        for event_id, position in await session.returning(_insert_many(len(chunk)), params):
            positions[str(event_id)] = int(position)
    return positions


async def insert_if_absent(session: Session, values: dict[str, Any]) -> int | None:
    """Store an event unless its id is already stored; the new row's position, or None."""
    db = session.db
    row = await session.returning(
        _INSERT,
        {
            **values,
            "time": db.stamp(values["time"]),
            "recorded_at": db.stamp(values["recorded_at"]),
            "envelope": db.dumps(values["envelope"]),
        },
    )
    return int(row[0][0]) if row else None


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


async def after(session: Session, position: int, limit: int) -> list[Row]:
    """(position, type, subject, envelope) of every event after `position`, oldest first (what
    the broadcaster fans out; the envelope decoded)."""
    rows = await session.fetch(_AFTER, {"position": position, "limit": limit})
    return [(int(r[0]), r[1], r[2], session.db.loads(r[3])) for r in rows]


async def last_position(session: Session) -> int:
    value = await session.fetchval(_LAST)
    return int(value or 0)


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
