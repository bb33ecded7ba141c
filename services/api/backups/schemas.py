"""Backups as the API shows them (projected from backup events), a request to back something up
now, and the answer (the staged intent)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Self

from pydantic import Field, model_validator

from libs.common.contract.backup import BackupKind
from libs.common.contract.base import WireModel

BackupState = Literal["Running", "Completed", "Failed", "Pruned"]


class BackupRequest(WireModel):
    """What to back up now, and optionally where: under a backup policy (its location,
    encryption and retention) or to a backup location. Neither: the default policy's location
    if there is one, else the backup service's configured store."""

    target: Literal["foundry", "cluster"] = Field(
        description="`foundry` (the Foundry DB) or `cluster` (a cluster's etcd)."
    )
    cluster_id: str | None = Field(
        default=None, max_length=64, description="The cluster, for target `cluster`."
    )
    policy_id: str | None = Field(
        default=None, max_length=64, description="Run under this backup policy."
    )
    location_id: str | None = Field(
        default=None,
        max_length=64,
        description="Write to this backup location (a run without a policy).",
    )

    @model_validator(mode="after")
    def _cluster_for_cluster(self) -> Self:
        if self.target == "cluster" and not self.cluster_id:
            raise ValueError("clusterId is required for target 'cluster'")
        if self.target == "foundry" and self.cluster_id:
            raise ValueError("clusterId is only for target 'cluster'")
        return self


class BackupAccepted(WireModel):
    """The backup is requested; its progress arrives as io.nest.backup.* events."""

    intent_id: str = Field(description="The RunBackup intent's id (the events' correlation).")
    target: str = Field(description="`foundry` or `cluster-<name>`.")
    kind: BackupKind
    policy_id: str | None = None
    location_id: str | None = None


class DrillResult(WireModel):
    """The newest restore drill of a backup."""

    at: datetime = Field(description="When the drill ran.")
    passed: bool
    reason: str | None = Field(default=None, description="Why it failed (e.g. `IntegrityError`).")
    message: str | None = None
    figures: dict[str, Any] = Field(
        default_factory=dict,
        description="What the drill measured: `durationSeconds`, `etcdRevision`, "
        "`etcdKeyCount`, `tableRows` (rows per table of a restored Foundry DB).",
    )


class BackupRead(WireModel):
    """One backup: where it is, its state, and its figures, as reported by the backup service."""

    id: str = Field(description="The backup's folder name, `<YYYYMMDDTHHMMSSZ>-<id>`.")
    ref: str = Field(description="`<target>/<id>`: the backup's place in its location.")
    target: str = Field(description="`foundry` or `cluster-<name>`.")
    kind: BackupKind
    cluster_id: str | None = None
    policy_id: str | None = None
    location_id: str | None = Field(
        default=None, description="None: the store configured in the backup service's settings."
    )
    state: BackupState
    trigger: Literal["manual", "schedule"] | None = None
    created_at: datetime = Field(description="The time in the backup's id (list order).")
    started_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    pruned_at: datetime | None = Field(
        default=None, description="When retention deleted it (state `Pruned`)."
    )
    stored_bytes: int | None = None
    plaintext_bytes: int | None = None
    stored_sha256: str | None = None
    plaintext_sha256: str | None = None
    encrypted: bool | None = None
    encryption_key_id: str | None = None
    verified: bool | None = Field(
        default=None, description="The stored bytes were read back and matched before listing."
    )
    etcd_revision: int | None = None
    etcd_key_count: int | None = None
    kubernetes_version: str | None = None
    duration_seconds: float | None = None
    reason: str | None = Field(default=None, description="Why it failed (state `Failed`).")
    message: str | None = None
    last_drill: DrillResult | None = None
