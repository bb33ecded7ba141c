"""The backup part of the event contract: the run intent and the backup lifecycle events.

`RunBackup` is self-contained apart from secrets: it names the target and what to back up; the
backup service reaches the Foundry DB through its own settings, and an etcd through access it
obtains for the cluster (never carried in the intent). Changes here must be additive only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from libs.common.contract.base import WireModel

BackupKind = Literal["etcd", "foundry"]


class RunBackup(WireModel):
    """Take one backup of `target` now (manual, or a scheduled run the scheduler emitted)."""

    target: str = Field(pattern=r"^[a-z0-9]([a-z0-9._-]{0,126}[a-z0-9])?$")
    """What is backed up: `foundry`, or `cluster-<name>` for a cluster's etcd."""
    kind: BackupKind
    cluster_id: str | None = None
    """The cluster whose etcd is backed up (kind `etcd`)."""
    kubernetes_version: str | None = None
    """Recorded in the manifest, to pick matching binaries at restore."""
    trigger: Literal["manual", "schedule"] = "manual"
    scheduled_for: datetime | None = None
    """For a scheduled run: the firing time it stands for."""


class BackupStarted(WireModel):
    """A backup run began."""

    target: str
    kind: BackupKind
    backup: str
    """The backup's reference, `<target>/<time>-<id>`."""
    started_at: datetime


class BackupCompleted(WireModel):
    """A backup is stored, verified and listed; older ones may have been pruned."""

    target: str
    kind: BackupKind
    backup: str
    completed_at: datetime
    stored_bytes: int
    plaintext_sha256: str
    encrypted: bool
    verified: bool
    etcd_revision: int | None = None
    pruned: list[str] = Field(default_factory=list)
    """References of backups retention deleted after this one."""


class BackupFailed(WireModel):
    """A backup run failed; nothing was listed as complete."""

    target: str
    kind: BackupKind
    backup: str | None = None
    failed_at: datetime
    reason: str
    """Machine-readable failure kind (e.g. `BucketNotFound`, `SnapshotCorrupt`)."""
    message: str
