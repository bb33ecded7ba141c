"""HTTP routes for /api/v1/backup-locations (admin only): where backups may be stored."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Request, Response, status

from services.api.auth.dependencies import AdminDep
from services.api.backup_locations import service
from services.api.backup_locations.schemas import (
    BackupLocationCreate,
    BackupLocationPatch,
    BackupLocationRead,
)
from services.api.kit.dependencies import BusDep, SealerDep
from services.api.kit.errors import errors
from services.api.kit.paging import CursorQuery, LimitQuery, Page, link_header
from services.api.kit.responses import ModelResponse
from services.api.kit.unit_of_work import SessionDep

router = APIRouter(prefix="/backup-locations", tags=["backups"])


LocationId = Annotated[
    str, Path(description="The backup location's id, or its name.", max_length=64)
]
NOT_FOUND = "No backup location has this id, nor this name."
CHECKED_INVALID = (
    "Invalid input, or the live check failed; `errors` names the field "
    "(e.g. `spec.bucket`, `spec.secretAccessKey`, `spec.endpointUrl`)."
)
UNAVAILABLE = "No backup service answered the live check."
ERRORS = errors(not_found=NOT_FOUND)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=BackupLocationRead,
    operation_id="createBackupLocation",
    summary="Create a backup location",
    responses=errors(
        conflict="The name is taken.", invalid=CHECKED_INVALID, unavailable=UNAVAILABLE
    ),
)
async def create_backup_location(
    body: BackupLocationCreate,
    session: SessionDep,
    admin: AdminDep,
    bus: BusDep,
    sealer: SealerDep,
) -> Response:
    """Check the location live (write, read back, delete a probe object), then store it."""
    created = await service.create(session, bus, sealer, body)
    return ModelResponse(
        created,
        status.HTTP_201_CREATED,
        headers={"Location": f"/api/v1/backup-locations/{created.id}"},
    )


@router.get(
    "",
    response_model=Page[BackupLocationRead],
    operation_id="listBackupLocations",
    summary="List backup locations",
)
async def list_backup_locations(
    request: Request,
    session: SessionDep,
    admin: AdminDep,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
) -> Response:
    """Backup locations in creation order, without their secrets."""
    page = await service.list_locations(session, limit=limit, cursor=cursor)
    return ModelResponse(page, headers=link_header(request, page.next))


@router.get(
    "/{location_id}",
    response_model=BackupLocationRead,
    operation_id="getBackupLocation",
    summary="Get a backup location",
    responses=ERRORS,
)
async def get_backup_location(
    location_id: LocationId, session: SessionDep, admin: AdminDep
) -> Response:
    """One backup location, without its secret access key."""
    return ModelResponse(await service.get(session, location_id))


@router.patch(
    "/{location_id}",
    response_model=BackupLocationRead,
    operation_id="updateBackupLocation",
    summary="Change a backup location (JSON merge patch)",
    responses=errors(not_found=NOT_FOUND, invalid=CHECKED_INVALID, unavailable=UNAVAILABLE),
)
async def patch_backup_location(
    location_id: LocationId,
    body: Annotated[BackupLocationPatch, Body(media_type="application/merge-patch+json")],
    session: SessionDep,
    admin: AdminDep,
    bus: BusDep,
    sealer: SealerDep,
) -> Response:
    """Merge `labels` and `spec`; a changed spec is checked live again before it is stored."""
    return ModelResponse(await service.patch(session, bus, sealer, location_id, body))


@router.delete(
    "/{location_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="deleteBackupLocation",
    summary="Delete a backup location",
    responses=errors(not_found=NOT_FOUND, conflict="A backup policy uses the location."),
)
async def delete_backup_location(
    location_id: LocationId, session: SessionDep, admin: AdminDep
) -> Response:
    """Forget the location; backups already stored there are left in place."""
    await service.delete(session, location_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
