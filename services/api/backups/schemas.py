"""A request to back something up now, and the answer (the staged intent)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from libs.common.contract.backup import BackupKind
from libs.common.contract.base import WireModel


class BackupRequest(WireModel):
    """What to back up now. Backups go to the backup service's configured store; choosing a
    stored backup location per run is not supported yet (the field is refused, not ignored)."""

    target: Literal["foundry", "cluster"] = Field(
        description="`foundry` (the Foundry DB) or `cluster` (a cluster's etcd)."
    )
    cluster_id: str | None = Field(
        default=None, max_length=64, description="The cluster, for target `cluster`."
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
