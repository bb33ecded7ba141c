"""Webhook domain logic: subscriptions (with a write-only secret) and staging their deliveries.

Deliveries are staged by the event recorder in the transaction that stores the event, so the
durable queue never misses an event and never holds one twice.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Sequence

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.contract.cluster import validate_labels
from libs.common.secrets import Sealer
from services.api.events.filters import TypePattern, matches_any, parse_patterns
from services.api.merge_patch import merge_patch
from services.api.models import Webhook, WebhookDelivery, utcnow
from services.api.pagination import Cursor, Page
from services.api.problems import Conflict, FieldError, InvalidInput, NotFound
from services.api.problems import invalid_from_validation as _invalid
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


async def _commit(session: AsyncSession, name: str) -> None:
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise Conflict(f"a webhook named {name!r} already exists") from None


async def _require(session: AsyncSession, webhook_id: str) -> Webhook:
    row = await repository.get(session, webhook_id)
    if row is None:
        raise NotFound(f"webhook {webhook_id!r} does not exist")
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


async def create(session: AsyncSession, sealer: Sealer, body: WebhookCreate) -> WebhookCreated:
    if await repository.get_by_name(session, body.name) is not None:
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
    repository.add(session, row)
    await _commit(session, body.name)
    log.info("webhook created", extra={"webhookId": row.id, "webhook": row.name})
    read = to_read(row)
    return WebhookCreated(**dict(read), secret=secret)


async def get(session: AsyncSession, webhook_id: str) -> WebhookRead:
    return to_read(await _require(session, webhook_id))


async def list_webhooks(
    session: AsyncSession, *, limit: int, cursor: str | None
) -> Page[WebhookRead]:
    after = None
    if cursor:
        position = Cursor.decode(cursor)
        after = (position.created_at, position.id)
    rows = await repository.list_page(session, limit=limit, after=after)
    following = None
    if len(rows) > limit:
        last = rows[limit - 1]
        following = Cursor(created_at=last.created_at, id=last.id).encode()
    return Page[WebhookRead](items=[to_read(r) for r in rows[:limit]], next=following)


async def patch(
    session: AsyncSession, sealer: Sealer, webhook_id: str, body: WebhookPatch
) -> WebhookRead:
    row = await _require(session, webhook_id)
    if body.name is not None and body.name != row.name:
        raise InvalidInput(
            "name cannot be changed",
            errors=[FieldError(field="name", message="cannot be changed after creation")],
        )
    changed = False
    if body.labels is not None:
        labels = merge_patch(dict(row.labels), body.labels)
        try:
            validate_labels(labels)
        except ValueError as exc:
            raise InvalidInput(
                f"invalid input: labels: {exc}",
                errors=[FieldError(field="labels", message=str(exc))],
            ) from None
        if labels != row.labels:
            row.labels = labels
            changed = True
    if body.spec is not None:
        current = {"url": row.url, "eventTypes": list(row.event_types), "enabled": row.enabled}
        try:
            spec = WebhookSpecWrite.model_validate(merge_patch(current, body.spec))
        except ValidationError as exc:
            raise _invalid(exc, prefix=("spec",)) from None
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
        await session.commit()
    return to_read(row)


async def delete(session: AsyncSession, webhook_id: str) -> None:
    """Remove the webhook and its queue: pending deliveries are dropped."""
    await _require(session, webhook_id)
    await repository.remove(session, webhook_id)
    await session.commit()


async def list_deliveries(
    session: AsyncSession,
    webhook_id: str,
    *,
    limit: int,
    cursor: str | None,
    status: str | None,
) -> Page[DeliveryRead]:
    await _require(session, webhook_id)
    after = None
    if cursor:
        position = Cursor.decode(cursor)
        after = (position.created_at, position.id)
    rows = await repository.deliveries_page(
        session, webhook_id, limit=limit, after=after, status=status
    )
    following = None
    if len(rows) > limit:
        last = rows[limit - 1]
        following = Cursor(created_at=last.created_at, id=last.id).encode()
    return Page[DeliveryRead](items=[delivery_to_read(r) for r in rows[:limit]], next=following)


Subscriptions = Sequence[tuple[str, tuple[TypePattern, ...]]]
"""(webhook id, its type patterns) of the enabled webhooks."""


async def enabled_subscriptions(session: AsyncSession) -> Subscriptions:
    rows = await repository.enabled_subscriptions(session)
    return [(webhook_id, parse_patterns(patterns)) for webhook_id, patterns in rows]


async def stage_deliveries(
    session: AsyncSession,
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
        repository.add(
            session,
            WebhookDelivery(
                id=str(uuid.uuid4()),
                webhook_id=webhook_id,
                event_position=event_position,
                event_id=event_id,
                event_type=event_type,
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            ),
        )
        staged += 1
    return staged
