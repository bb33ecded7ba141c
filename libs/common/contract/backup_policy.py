"""Backup policies and locations as the backup service learns them from the API.

The API owns both resources (its database); the backup service keeps the copy it schedules from
in JetStream KV. The API stages these intents in its outbox in the same transaction as the
change, so the copy follows every committed change, in order, exactly once:

- `ApplyBackupLocation` / `DeleteBackupLocation` (`nest.intent.backup.location_apply|delete`):
  the location with its secret access key *sealed* (libs.common.secrets, associated data
  `backup-location:<id>`), never in clear: streams and KV only ever hold the sealed value, and
  the backup service opens it with the same secrets key (NEST_SECRETS_KEY or
  `<data dir>/secrets.key`).
- `ApplyBackupPolicy` / `DeleteBackupPolicy` (`nest.intent.backup.policy_apply|delete`).

Every message carries the resource's `generation`; the backup service ignores one older than
what it holds. Changes here must be additive only.
"""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator
from pydantic.alias_generators import to_camel

from libs.common.contract.backup_location import BackupLocationSpec
from libs.common.contract.base import WireModel


class PolicyTargets(WireModel):
    """What a policy backs up: the Foundry DB, every cluster, and/or named clusters."""

    foundry: bool = Field(default=False, description="Back up the Foundry DB.")
    all_clusters: bool = Field(
        default=False, description="Back up every cluster's etcd (clusters created later too)."
    )
    cluster_ids: list[str] = Field(
        default_factory=list,
        max_length=1000,
        description="Back up these clusters' etcd (ids; ignored when allClusters).",
    )

    @model_validator(mode="after")
    def _something(self) -> Self:
        if not (self.foundry or self.all_clusters or self.cluster_ids):
            raise ValueError(
                "a policy needs at least one target: foundry, allClusters or clusterIds"
            )
        return self


class RetentionSpec(WireModel):
    """Keep the last N and/or everything younger than D days, per target. Either rule keeps a
    backup; with neither, nothing is deleted. The newest verified backup of a target is never
    deleted, whatever the rules."""

    keep_last: int | None = Field(default=None, ge=1, le=100_000)
    keep_days: int | None = Field(default=None, ge=1, le=36_500)


class BackupPolicySpec(WireModel):
    """When, what, where, how long and how a policy backs up."""

    schedule: str = Field(
        min_length=1,
        max_length=200,
        description="5-field cron expression in UTC (`0 * * * *`), or a macro (`@hourly`).",
    )
    targets: PolicyTargets
    location_id: str = Field(min_length=1, max_length=64, description="The backup location.")
    retention: RetentionSpec = Field(default_factory=RetentionSpec)
    encrypted: bool = Field(
        default=False,
        description="Encrypt client-side with the backup service's active key "
        "(NEST_BACKUP_ENCRYPTION_KEYS); a run fails with `EncryptionKeyMissing` without one.",
    )
    rpo_minutes: int | None = Field(
        default=None,
        ge=1,
        le=525_600,
        description="Recovery point objective: an event is published when a target has no "
        "successful backup this recent. Default: twice the schedule's longest interval.",
    )
    drill_schedule: str | None = Field(
        default="0 3 * * 0",
        max_length=200,
        description="Cron for restore drills of each target's newest backup; null: no drills.",
    )


class ApplyBackupPolicy(WireModel):
    """Create or replace policy `policy_id` at `generation` in the backup service's copy."""

    policy_id: str
    name: str
    generation: int = Field(ge=1)
    spec: BackupPolicySpec


class DeleteBackupPolicy(WireModel):
    """Forget policy `policy_id` (its backups stay in the store)."""

    policy_id: str
    generation: int = Field(ge=1)


class SealedLocationSpec(BackupLocationSpec):
    """A location spec as it travels sealed: the same fields, with `secretAccessKey` absent (its
    sealed form is beside it). Every other rule of `BackupLocationSpec` applies."""

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Self:
        if self.secret_access_key is not None:
            raise ValueError("secretAccessKey travels sealed, never in the spec")
        if self.kind == "s3":
            for name in ("bucket", "access_key_id"):
                if not getattr(self, name):
                    raise ValueError(f"{to_camel(name)} is required for an s3 location")
            if self.path is not None:
                raise ValueError("path is only for a local location")
        else:
            if not self.path or not self.path.startswith("/"):
                raise ValueError("path must be an absolute directory for a local location")
            if any(getattr(self, name) for name in ("endpoint_url", "bucket", "access_key_id")):
                raise ValueError("endpointUrl, bucket and credentials are only for s3")
        return self


class SealedBackupLocation(WireModel):
    """A location spec whose secret access key is replaced by its sealed form."""

    spec: SealedLocationSpec
    """`secretAccessKey` is always None here."""
    sealed_secret_access_key: str | None = None
    """`libs.common.secrets.Sealer.seal(secret, context=f"backup-location:{id}")`."""


class ApplyBackupLocation(WireModel):
    """Create or replace location `location_id` at `generation` in the backup service's copy."""

    location_id: str
    name: str
    generation: int = Field(ge=1)
    location: SealedBackupLocation


class DeleteBackupLocation(WireModel):
    """Forget location `location_id` (the API refuses while a policy uses it)."""

    location_id: str
    generation: int = Field(ge=1)
