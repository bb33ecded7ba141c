"""A cluster restore as the API takes it and shows it."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from libs.common.contract.base import WireModel
from libs.common.contract.restore import RestorePhase

BACKUP_ID_PATTERN = r"^\d{8}T\d{6}Z-[a-z0-9]{8,32}$"


class RestoreCreate(WireModel):
    """Restore the cluster's etcd from one of its backups."""

    backup_id: str = Field(
        pattern=BACKUP_ID_PATTERN,
        max_length=64,
        description="The backup's id, `<YYYYMMDDTHHMMSSZ>-<id>` (see `GET /api/v1/backups`): a "
        "Completed etcd backup of this cluster.",
    )
    force: bool = Field(
        default=False,
        description="Restore even if the snapshot is older than the cluster's current etcd "
        "revision (rolling it back), the current revision cannot be read, or the backup was "
        "taken of a cluster with another name.",
    )


class RestoreStep(WireModel):
    """One phase a restore went through."""

    phase: RestorePhase
    at: datetime
    reason: str = ""
    message: str = ""


class RestoreRead(WireModel):
    """One restore and how far it got."""

    id: str = Field(description="The restore's id.")
    cluster_id: str
    backup_id: str = Field(description="The backup restored from.")
    backup_ref: str = Field(description="`<target>/<backup id>`: its place in its location.")
    location_id: str | None = Field(
        default=None, description="The backup's location; None: the backup service's store."
    )
    force: bool
    phase: RestorePhase = Field(
        description="Pending, Verifying, Staged, ScalingDown, Restoring, ScalingUp, then "
        "Succeeded or Failed."
    )
    reason: str = Field(
        default="",
        description="Machine-readable, for Failed: e.g. IntegrityError, WrongKey, "
        "SnapshotOlder, CurrentRevisionUnknown, JobFailed.",
    )
    message: str = ""
    etcd_revision: int | None = Field(default=None, description="The snapshot's revision.")
    history: list[RestoreStep] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = Field(default=None, description="When it Succeeded or Failed.")
