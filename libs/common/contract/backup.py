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
    policy_id: str | None = None
    """Run under this backup policy: its location, encryption and retention apply."""
    location_id: str | None = None
    """Write to this backup location (a manual run without a policy). Neither this nor
    `policy_id`: the default policy's location if there is one, else the store configured in
    the backup service's settings."""


class BackupStarted(WireModel):
    """A backup run began."""

    target: str
    kind: BackupKind
    backup: str
    """The backup's reference, `<target>/<time>-<id>`."""
    started_at: datetime
    cluster_id: str | None = None
    policy_id: str | None = None
    location_id: str | None = None
    """None: the store configured in the backup service's settings."""
    trigger: Literal["manual", "schedule"] = "manual"


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
    cluster_id: str | None = None
    policy_id: str | None = None
    location_id: str | None = None
    started_at: datetime | None = None
    plaintext_bytes: int | None = None
    stored_sha256: str | None = None
    etcd_key_count: int | None = None
    kubernetes_version: str | None = None
    encryption_key_id: str | None = None
    duration_seconds: float | None = None
    throughput_bytes_per_second: float | None = None


class BackupFailed(WireModel):
    """A backup run failed; nothing was listed as complete."""

    target: str
    kind: BackupKind
    backup: str | None = None
    failed_at: datetime
    reason: str
    """Machine-readable failure kind (e.g. `BucketNotFound`, `SnapshotCorrupt`)."""
    message: str
    cluster_id: str | None = None
    policy_id: str | None = None
    location_id: str | None = None


class DrillPassed(WireModel):
    """A restore drill restored `backup` into a scratch etcd / scratch database and it checked out.

    etcd: revision and key count compared with the manifest. Foundry DB: the dump restored into
    a scratch database (SQLite file / PostgreSQL database), integrity checked, rows counted.
    """

    target: str
    kind: BackupKind
    backup: str
    location_id: str | None = None
    policy_id: str | None = None
    drilled_at: datetime
    duration_seconds: float
    etcd_revision: int | None = None
    etcd_key_count: int | None = None
    table_rows: dict[str, int] | None = None
    """Foundry DB: rows per table in the restored scratch database."""


class DrillFailed(WireModel):
    """A restore drill failed: the newest backup of `target` would not restore as recorded."""

    target: str
    kind: BackupKind
    backup: str | None = None
    """None when there was no verified backup to drill."""
    location_id: str | None = None
    policy_id: str | None = None
    drilled_at: datetime
    reason: str
    """e.g. `IntegrityError`, `WrongKey`, `RevisionMismatch`, `KeyCountMismatch`, `NoBackup`."""
    message: str


class RpoMissed(WireModel):
    """No successful backup of `target` within the policy's recovery point objective.

    Published once when the objective is first missed (and again each further RPO period that
    passes without a success); a later success ends it.
    """

    policy_id: str
    target: str
    kind: BackupKind
    cluster_id: str | None = None
    rpo_seconds: int
    last_success_at: datetime | None = None
    """None: the target never had a successful backup under this policy."""
    detected_at: datetime
