"""HTTP route for POST /api/v1/backups (operator): back up the Foundry DB or a cluster now."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status

from services.api.auth.dependencies import OperatorDep
from services.api.backups import service
from services.api.backups.schemas import BackupAccepted, BackupRequest
from services.api.db import SessionDep
from services.api.problems import Problem
from services.api.responses import ModelResponse

router = APIRouter(prefix="/backups", tags=["backups"])


def _notify(request: Request) -> service.Notify:
    relay = request.app.state.relay
    return relay.notify  # type: ignore[no-any-return]


NotifyDep = Annotated[service.Notify, Depends(_notify)]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=BackupAccepted,
    operation_id="createBackup",
    summary="Back up the Foundry DB or a cluster now",
    responses={
        409: {"model": Problem, "description": "The cluster is being deleted."},
        422: {"model": Problem, "description": "Invalid input; `errors` names each field."},
    },
)
async def create_backup(
    body: BackupRequest, session: SessionDep, operator: OperatorDep, notify: NotifyDep
) -> Response:
    """Stage a RunBackup intent; the backup service runs it and reports backup events."""
    accepted = await service.request_backup(session, body, notify)
    return ModelResponse(accepted, status.HTTP_202_ACCEPTED)
