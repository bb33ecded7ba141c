"""Every query on webhooks and their delivery queue."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.kit.db import Session, sql
from services.api.kit.paging import After, keyset
from services.api.models import EventRecord, Webhook, WebhookDelivery


async def get(session: AsyncSession, webhook_id: str) -> Webhook | None:
    result: Webhook | None = await session.get(Webhook, webhook_id)
    return result


async def get_by_name(session: AsyncSession, name: str) -> Webhook | None:
    result: Webhook | None = await session.scalar(select(Webhook).where(Webhook.name == name))
    return result


def add(session: AsyncSession, row: Webhook | WebhookDelivery) -> None:
    session.add(row)


async def remove(session: AsyncSession, webhook_id: str) -> None:
    await session.execute(delete(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id))
    await session.execute(delete(Webhook).where(Webhook.id == webhook_id))


async def list_page(session: AsyncSession, *, limit: int, after: After | None) -> Sequence[Webhook]:
    query = select(Webhook).order_by(Webhook.created_at, Webhook.id).limit(limit + 1)
    if (condition := keyset(Webhook.created_at, Webhook.id, after)) is not None:
        query = query.where(condition)
    return (await session.scalars(query)).all()


_ENABLED = sql("SELECT id, event_types FROM webhooks WHERE enabled = :enabled")
_INSERT_DELIVERY = sql(
    "INSERT INTO webhook_deliveries (id, webhook_id, event_position, event_id, event_type, "
    "status, attempts, next_attempt_at, created_at, updated_at) VALUES (:id, :webhook_id, "
    ":event_position, :event_id, :event_type, 'pending', 0, :now, :now, :now)"
)


async def enabled_subscriptions(session: Session) -> Sequence[tuple[str, list[str]]]:
    """(id, event type patterns) of every enabled webhook (lean: read with every event batch)."""
    rows = await session.fetch(_ENABLED, {"enabled": True})
    return [(str(row[0]), list(session.db.loads(row[1]))) for row in rows]


async def insert_delivery(
    session: Session,
    *,
    delivery_id: str,
    webhook_id: str,
    event_position: int,
    event_id: str,
    event_type: str,
    now: datetime,
) -> None:
    await session.execute(
        _INSERT_DELIVERY,
        {
            "id": delivery_id,
            "webhook_id": webhook_id,
            "event_position": event_position,
            "event_id": event_id,
            "event_type": event_type,
            "now": session.db.stamp(now),
        },
    )


async def deliveries_page(
    session: AsyncSession,
    webhook_id: str,
    *,
    limit: int,
    after: After | None,
    status: str | None,
) -> Sequence[WebhookDelivery]:
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == webhook_id)
        .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
        .limit(limit + 1)
    )
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    if (condition := keyset(WebhookDelivery.created_at, WebhookDelivery.id, after)) is not None:
        query = query.where(condition)
    return (await session.scalars(query)).all()


# The delivery queue.


def _due(now: datetime) -> Any:
    return and_(
        WebhookDelivery.status == "pending",
        WebhookDelivery.next_attempt_at <= now,
        or_(WebhookDelivery.lease_expires_at.is_(None), WebhookDelivery.lease_expires_at < now),
    )


async def due(
    session: AsyncSession, now: datetime, *, limit: int, skip_webhooks: Collection[str]
) -> Sequence[tuple[str, str]]:
    """(delivery id, webhook id) of due, unleased deliveries of enabled webhooks, oldest first."""
    query = (
        select(WebhookDelivery.id, WebhookDelivery.webhook_id)
        .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
        .where(_due(now), Webhook.enabled.is_(True))
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.created_at)
        .limit(limit)
    )
    if skip_webhooks:
        query = query.where(WebhookDelivery.webhook_id.not_in(list(skip_webhooks)))
    return [(row[0], row[1]) for row in await session.execute(query)]


async def claim(
    session: AsyncSession, ids: Sequence[str], owner: str, now: datetime, until: datetime
) -> list[str]:
    """Lease these deliveries to `owner` and count the attempt; returns the ids actually won.

    The WHERE repeats the due condition, so of several replicas racing for a row exactly one
    update matches (PostgreSQL re-checks it after the row lock; SQLite has one writer).
    """
    if not ids:
        return []
    result = await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(list(ids)), _due(now))
        .values(
            lease_owner=owner,
            lease_expires_at=until,
            attempts=WebhookDelivery.attempts + 1,
            updated_at=now,
        )
        .returning(WebhookDelivery.id)
    )
    return [row[0] for row in result]


async def next_due_at(session: AsyncSession) -> datetime | None:
    value: datetime | None = await session.scalar(
        select(func.min(WebhookDelivery.next_attempt_at)).where(WebhookDelivery.status == "pending")
    )
    return value


@dataclass(frozen=True)
class Job:
    """Everything one attempt needs, read before the request (no session is held during it)."""

    delivery_id: str
    webhook_id: str
    url: str
    sealed_secret: str | None
    legacy_secret: str | None
    attempts: int
    envelope: dict[str, Any]


async def job(session: AsyncSession, delivery_id: str, owner: str) -> Job | None:
    """The attempt's data, if `owner` still holds the lease."""
    row = (
        await session.execute(
            select(
                WebhookDelivery.id,
                WebhookDelivery.webhook_id,
                Webhook.url,
                Webhook.sealed_secret,
                Webhook.secret,
                WebhookDelivery.attempts,
                EventRecord.envelope,
            )
            .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
            .join(EventRecord, EventRecord.position == WebhookDelivery.event_position)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.lease_owner == owner)
        )
    ).first()
    if row is None:
        return None
    return Job(row[0], row[1], row[2], row[3], row[4], row[5], dict(row[6]))


async def with_clear_secret(session: AsyncSession) -> Sequence[Webhook]:
    """Webhooks whose secret is still stored in clear (from before secrets were sealed)."""
    return (await session.scalars(select(Webhook).where(Webhook.secret.is_not(None)))).all()


async def finish(
    session: AsyncSession, delivery_id: str, owner: str, values: dict[str, Any]
) -> bool:
    """Record an attempt's outcome and release the lease, if `owner` still holds it."""
    result = await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.lease_owner == owner)
        .values(lease_owner=None, lease_expires_at=None, **values)
    )
    return bool(getattr(result, "rowcount", 0))


async def note_outcome(
    session: AsyncSession, webhook_id: str, outcome: str, now: datetime, failed: bool
) -> None:
    failures: Any = Webhook.consecutive_failures + 1 if failed else 0
    await session.execute(
        update(Webhook)
        .where(Webhook.id == webhook_id)
        .values(last_delivery_at=now, last_outcome=outcome, consecutive_failures=failures)
    )
