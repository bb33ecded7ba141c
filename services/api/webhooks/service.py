"""Webhook domain logic: subscriptions (with a write-only secret) and staging their deliveries.

Deliveries are staged in the transaction that stores the event in the history (the history
calls `stage_deliveries`, given to it by the app), so the durable queue never misses an event
and never holds one twice; the delivery worker is woken only when something was staged.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable, Sequence

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.contract import Envelope
from libs.common.secrets import Sealer
from services.api.events.filters import TypePattern, matches_any, parse_patterns
from services.api.kit import paging
from services.api.kit.clock import utcnow
from services.api.kit.db import Session
from services.api.kit.paging import Page
from services.api.kit.patch import check_name_unchanged, patched_labels, patched_spec
from services.api.kit.problems import Conflict, NotFound
from services.api.models import Webhook, WebhookDelivery
from services.api.webhooks import repository
from services.api.webhooks.schemas import (
    DeliveryRead,
    WebhookCreate,
    WebhookCreated,
    WebhookPatch,
    WebhookRead,
    WebhookSpecBase,
    WebhookSpecWrite,
    WebhookStatus,
)

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"


def generate_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def to_read(row: Webhook) -> WebhookRead:
    return WebhookRead(
        id=row.id,
        name=row.name,
        labels=dict(row.labels),
        spec=WebhookSpecBase.model_construct(
            url=row.url, event_types=list(row.event_types), enabled=row.enabled
        ),
        generation=row.generation,
        created_at=row.created_at,
        updated_at=row.updated_at,
        status=WebhookStatus.model_validate(
            {
                "lastDeliveryAt": row.last_delivery_at,
                "lastOutcome": row.last_outcome,
                "consecutiveFailures": row.consecutive_failures,
            }
        ),
    )


def delivery_to_read(row: WebhookDelivery) -> DeliveryRead:
    return DeliveryRead.model_validate(
        {
            "id": row.id,
            "webhookId": row.webhook_id,
            "eventId": row.event_id,
            "eventType": row.event_type,
            "status": row.status,
            "attempts": row.attempts,
            "nextAttemptAt": row.next_attempt_at if row.status == "pending" else None,
            "lastError": row.last_error,
            "responseCode": row.response_code,
            "createdAt": row.created_at,
            "updatedAt": row.updated_at,
            "deliveredAt": row.delivered_at,
        }
    )


async def _flush(session: AsyncSession, name: str) -> None:
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict(f"a webhook named {name!r} already exists") from None


async def _require(session: AsyncSession, webhook_id: str) -> Webhook:
    row = await repository.get(session, webhook_id) or await repository.get_by_name(
        session, webhook_id
    )
    if row is None:
        raise NotFound(f"webhook {webhook_id!r} does not exist (looked up by id, then by name)")
    return row


def secret_context(webhook_id: str) -> str:
    """What a webhook's sealed secret is bound to: it opens for this webhook only."""
    return f"webhook:{webhook_id}"


async def seal_clear_secrets(session: AsyncSession, sealer: Sealer) -> int:
    """Seal the secrets stored in clear before 0008 (at the API's start); how many."""
    rows = await repository.with_clear_secret(session)
    for row in rows:
        assert row.secret is not None
        row.sealed_secret = sealer.seal(row.secret, context=secret_context(row.id))
        row.secret = None
    if rows:
        await session.commit()
        log.info("sealed webhook secrets stored in clear", extra={"count": len(rows)})
    return len(rows)


async def create(session: Session, sealer: Sealer, body: WebhookCreate) -> WebhookCreated:
    orm = await session.orm()
    if await repository.get_by_name(orm, body.name) is not None:
        raise Conflict(f"a webhook named {body.name!r} already exists")
    secret = body.spec.secret or generate_secret()
    now = utcnow()
    webhook_id = str(uuid.uuid4())
    row = Webhook(
        id=webhook_id,
        name=body.name,
        labels=dict(body.labels),
        url=body.spec.url,
        event_types=list(body.spec.event_types),
        secret=None,
        sealed_secret=sealer.seal(secret, context=secret_context(webhook_id)),
        enabled=body.spec.enabled,
        generation=1,
        created_at=now,
        updated_at=now,
        last_delivery_at=None,
        last_outcome=None,
        consecutive_failures=0,
    )
    repository.add(orm, row)
    await _flush(orm, body.name)
    log.info("webhook created", extra={"webhookId": row.id, "webhook": row.name})
    read = to_read(row)
    return WebhookCreated(**dict(read), secret=secret)


async def get(session: Session, webhook_id: str) -> WebhookRead:
    return to_read(await _require(await session.orm(), webhook_id))


async def list_webhooks(session: Session, *, limit: int, cursor: str | None) -> Page[WebhookRead]:
    rows = await repository.list_page(await session.orm(), limit=limit, after=paging.after(cursor))
    return paging.page_of(rows, limit, to_read, paging.by_created)


async def patch(
    session: Session, sealer: Sealer, webhook_id: str, body: WebhookPatch
) -> WebhookRead:
    orm = await session.orm()
    row = await _require(orm, webhook_id)
    check_name_unchanged(row.name, body.name)
    changed = False
    labels = patched_labels(dict(row.labels), body.labels)
    if labels is not None:
        row.labels = labels
        changed = True
    if body.spec is not None:
        current = {"url": row.url, "eventTypes": list(row.event_types), "enabled": row.enabled}
        spec = patched_spec(WebhookSpecWrite, current, body.spec)
        if spec.secret is not None:
            # Rotate: sealed afresh (a new nonce each time, so nothing tells an unchanged
            # secret from a new one; either way the old clear copy, if any, is dropped).
            row.sealed_secret = sealer.seal(spec.secret, context=secret_context(row.id))
            row.secret = None
            changed = True
        new = (spec.url, list(spec.event_types), spec.enabled)
        if new != (row.url, list(row.event_types), row.enabled):
            row.url, row.event_types, row.enabled = spec.url, list(spec.event_types), spec.enabled
            row.generation += 1
            changed = True
    if changed:
        row.updated_at = utcnow()
        await orm.flush()
    return to_read(row)


async def delete(session: Session, webhook_id: str) -> None:
    """Remove the webhook and its queue: pending deliveries are dropped."""
    orm = await session.orm()
    row = await _require(orm, webhook_id)
    await repository.remove(orm, row.id)


async def list_deliveries(
    session: Session,
    webhook_id: str,
    *,
    limit: int,
    cursor: str | None,
    status: str | None,
) -> Page[DeliveryRead]:
    orm = await session.orm()
    row = await _require(orm, webhook_id)
    rows = await repository.deliveries_page(
        orm, row.id, limit=limit, after=paging.after(cursor), status=status
    )
    return paging.page_of(rows, limit, delivery_to_read, paging.by_created)


Subscriptions = Sequence[tuple[str, tuple[TypePattern, ...]]]
"""(webhook id, its type patterns) of the enabled webhooks."""


async def enabled_subscriptions(session: Session) -> Subscriptions:
    rows = await repository.enabled_subscriptions(session)
    return [(webhook_id, parse_patterns(patterns)) for webhook_id, patterns in rows]


class DeliveryStager:
    """Stages the deliveries each recorded event owes (the event history calls it in its
    transaction), and wakes the delivery worker after the commit only if it staged any."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self.wake = wake

    async def __call__(self, session: Session, recorded: Sequence[tuple[int, Envelope]]) -> int:
        if not recorded:
            return 0
        subscriptions = await enabled_subscriptions(session)
        staged = 0
        for position, envelope in recorded:
            staged += await stage_deliveries(
                session, position, envelope.id, envelope.type, subscriptions
            )
        if staged:
            session.after_commit(self.wake)
        return staged


async def stage_deliveries(
    session: Session,
    event_position: int,
    event_id: str,
    event_type: str,
    subscriptions: Subscriptions | None = None,
) -> int:
    """Queue the event for every enabled webhook whose types match (in the caller's transaction).

    `subscriptions` may be read once for several events recorded in one transaction."""
    if subscriptions is None:
        subscriptions = await enabled_subscriptions(session)
    now = utcnow()
    staged = 0
    for webhook_id, patterns in subscriptions:
        if not matches_any(event_type, patterns):
            continue
        await repository.insert_delivery(
            session,
            delivery_id=str(uuid.uuid4()),
            webhook_id=webhook_id,
            event_position=event_position,
            event_id=event_id,
            event_type=event_type,
            now=now,
        )
        staged += 1
    return staged
