"""HTTP routes for /api/v1/webhooks (admin only): subscriptions and their deliveries."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Request, Response, status

from services.api.auth.dependencies import AdminDep
from services.api.kit.dependencies import SealerDep
from services.api.kit.errors import errors
from services.api.kit.paging import CursorQuery, LimitQuery, Page, link_header
from services.api.kit.responses import ModelResponse
from services.api.kit.unit_of_work import SessionDep
from services.api.webhooks import service
from services.api.webhooks.schemas import (
    DeliveryRead,
    DeliveryStatus,
    WebhookCreate,
    WebhookCreated,
    WebhookPatch,
    WebhookRead,
)

router = APIRouter(prefix="/webhooks", tags=["webhooks"])

WebhookId = Annotated[str, Path(description="The webhook's id, or its name.", max_length=64)]
ERRORS = errors(not_found="No webhook has this id, nor this name.")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookCreated,
    operation_id="createWebhook",
    summary="Create a webhook",
    responses=errors(conflict="The name is taken."),
)
async def create_webhook(
    body: WebhookCreate, session: SessionDep, admin: AdminDep, sealer: SealerDep
) -> Response:
    """Subscribe a URL to events. The signing secret is in this response only."""
    created = await service.create(session, sealer, body)
    return ModelResponse(
        created, status.HTTP_201_CREATED, headers={"Location": f"/api/v1/webhooks/{created.id}"}
    )


@router.get(
    "", response_model=Page[WebhookRead], operation_id="listWebhooks", summary="List webhooks"
)
async def list_webhooks(
    request: Request,
    session: SessionDep,
    admin: AdminDep,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
) -> Response:
    """Webhooks in creation order, without their secrets."""
    page = await service.list_webhooks(session, limit=limit, cursor=cursor)
    return ModelResponse(page, headers=link_header(request, page.next))


@router.get(
    "/{webhook_id}",
    response_model=WebhookRead,
    operation_id="getWebhook",
    summary="Get a webhook",
    responses=ERRORS,
)
async def get_webhook(webhook_id: WebhookId, session: SessionDep, admin: AdminDep) -> Response:
    """One webhook with its delivery status, without its secret."""
    return ModelResponse(await service.get(session, webhook_id))


@router.patch(
    "/{webhook_id}",
    response_model=WebhookRead,
    operation_id="updateWebhook",
    summary="Change a webhook (JSON merge patch)",
    responses=ERRORS,
)
async def patch_webhook(
    webhook_id: WebhookId,
    body: Annotated[WebhookPatch, Body(media_type="application/merge-patch+json")],
    session: SessionDep,
    admin: AdminDep,
    sealer: SealerDep,
) -> Response:
    """Merge `labels` and `spec`; `spec.secret` rotates the secret (not echoed back)."""
    return ModelResponse(await service.patch(session, sealer, webhook_id, body))


@router.delete(
    "/{webhook_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="deleteWebhook",
    summary="Delete a webhook",
    responses=ERRORS,
)
async def delete_webhook(webhook_id: WebhookId, session: SessionDep, admin: AdminDep) -> Response:
    """Remove the webhook; its pending deliveries are dropped."""
    await service.delete(session, webhook_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{webhook_id}/deliveries",
    response_model=Page[DeliveryRead],
    operation_id="listWebhookDeliveries",
    summary="List a webhook's deliveries",
    responses=ERRORS,
)
async def list_deliveries(
    webhook_id: WebhookId,
    request: Request,
    session: SessionDep,
    admin: AdminDep,
    status_: Annotated[DeliveryStatus | None, Query(alias="status")] = None,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
) -> Response:
    """Each event owed to this webhook, oldest first, with its attempts and outcome."""
    page = await service.list_deliveries(
        session, webhook_id, limit=limit, cursor=cursor, status=status_
    )
    return ModelResponse(page, headers=link_header(request, page.next))
