"""HTTP routes for /api/v1/tokens (admin only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, status

from services.api.auth import service
from services.api.auth.dependencies import AdminDep
from services.api.auth.schemas import TokenCreate, TokenCreated, TokenRead
from services.api.kit.paging import CursorQuery, LimitQuery, Page, link_header
from services.api.kit.problems import Problem
from services.api.kit.responses import ModelResponse
from services.api.kit.unit_of_work import SessionDep

router = APIRouter(prefix="/tokens", tags=["tokens"])

TokenId = Annotated[str, Path(description="The token's id (not the secret).", max_length=64)]
ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "No such token."},
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenCreated,
    operation_id="createToken",
    summary="Create an API token",
)
async def create_token(body: TokenCreate, session: SessionDep, admin: AdminDep) -> ModelResponse:
    """Create a token. The secret is in this response only: it is stored as a hash."""
    created = await service.create(session, body, admin)
    return ModelResponse(
        created, status.HTTP_201_CREATED, headers={"Location": f"/api/v1/tokens/{created.id}"}
    )


@router.get("", response_model=Page[TokenRead], operation_id="listTokens", summary="List tokens")
async def list_tokens(
    request: Request,
    session: SessionDep,
    admin: AdminDep,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
) -> ModelResponse:
    """Every token, active or not, without secrets."""
    page = await service.list_tokens(session, limit=limit, cursor=cursor)
    return ModelResponse(page, headers=link_header(request, page.next))


@router.get(
    "/{token_id}",
    response_model=TokenRead,
    operation_id="getToken",
    summary="Get a token",
    responses=ERRORS,
)
async def get_token(token_id: TokenId, session: SessionDep, admin: AdminDep) -> ModelResponse:
    """One token's metadata and status; the secret is never shown again."""
    return ModelResponse(await service.get(session, token_id))


@router.delete(
    "/{token_id}",
    response_model=TokenRead,
    operation_id="revokeToken",
    summary="Revoke a token",
    responses=ERRORS,
)
async def revoke_token(
    token_id: TokenId, request: Request, session: SessionDep, admin: AdminDep
) -> ModelResponse:
    """Revoke at once in this process; other API replicas stop accepting it within 5 s."""
    return ModelResponse(await service.revoke(session, token_id, request.app.state.token_cache))
