"""Restoring a cluster's etcd from a backup: the two intents and the progress event.

The flow (`POST /api/v1/clusters/{id}/restores`, admin):

1. The API records the restore (phase `Pending`) and stages `PrepareRestore` for the backup
   service (`nest.intent.backup.restore_prepare`).
2. The backup service downloads the backup from its location, checks the stored sha256, the
   decryption and the plaintext sha256 and etcd's own snapshot hash, compares the snapshot's
   revision with the cluster's current one (refusing an older snapshot unless `force`), then
   stages the verified plaintext snapshot for download at a short-lived URL it serves itself
   (`<NEST_BACKUP_PUBLIC_URL>/v1/restores/<restore id>/snapshot?token=...`, HMAC-signed,
   expiring) and sends `RestoreEtcd` to the provisioner (`nest.intent.provisioner.restore`).
3. The provisioner pauses reconciliation of the cluster, scales the control plane and then etcd
   to zero, runs one Job per etcd member that fetches the snapshot from the URL, checks its
   sha256 and runs `etcdutl snapshot restore` into that member's volume, scales etcd back,
   waits for it, scales the control plane back, waits for it, and resumes reconciliation.

Both services report every step as `RestoreProgressed` events (`nest.event.restore.progressed`);
the API projects them onto the restore resource and the cluster's `Restoring` condition. A
failure at any step ends the restore in phase `Failed` with a machine-readable `reason`.
Changes here must be additive only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from libs.common.contract.base import WireModel

RestorePhase = Literal[
    "Pending",
    "Verifying",
    "Staged",
    "ScalingDown",
    "Restoring",
    "ScalingUp",
    "Succeeded",
    "Failed",
]
TERMINAL_RESTORE_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed"})


class PrepareRestore(WireModel):
    """Backup service: fetch and verify `backup`, then hand it to the provisioner."""

    restore_id: str
    cluster_id: str
    cluster_name: str
    backup: str
    """The backup's reference, `<target>/<time>-<id>`."""
    location_id: str | None = None
    """Where the backup is; None: the store configured in the backup service's settings."""
    force: bool = False
    """Restore even if the snapshot is older than the cluster's current etcd revision."""


class RestoreEtcd(WireModel):
    """Provisioner: restore the cluster's etcd members from the staged snapshot."""

    restore_id: str
    cluster_id: str
    backup: str
    snapshot_url: str
    """Short-lived, single-purpose download URL (token in the query); valid until `expires_at`."""
    snapshot_sha256: str
    """sha256 of the plaintext snapshot the URL serves; the restore Job checks it."""
    snapshot_bytes: int = Field(ge=0)
    etcd_revision: int | None = None
    expires_at: datetime


class RestoreProgressed(WireModel):
    """A restore moved to `phase` (published by the backup service and by the provisioner)."""

    restore_id: str
    cluster_id: str
    backup: str
    phase: RestorePhase
    reason: str = ""
    """Machine-readable, for `Failed` (e.g. `IntegrityError`, `WrongKey`, `SnapshotOlder`)."""
    message: str = ""
    at: datetime
    etcd_revision: int | None = None
