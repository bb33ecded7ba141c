"""The lifecycle events of one run, built from the intent, where it went and what it stored."""

from __future__ import annotations

from datetime import datetime

from libs.common.contract.backup import BackupCompleted, BackupFailed, BackupStarted, RunBackup
from services.backup.snapshots.runs import RunResult
from services.backup.stores.layout import BackupRef


def started(
    intent: RunBackup,
    ref: BackupRef,
    now: datetime,
    policy_id: str | None,
    location_id: str | None,
) -> BackupStarted:
    return BackupStarted(
        target=intent.target,
        kind=intent.kind,
        backup=str(ref),
        started_at=now,
        cluster_id=intent.cluster_id,
        policy_id=policy_id,
        location_id=location_id,
        trigger=intent.trigger,
    )


def completed(
    intent: RunBackup,
    ref: BackupRef,
    result: RunResult,
    started_at: datetime,
    policy_id: str | None,
    location_id: str | None,
) -> BackupCompleted:
    manifest = result.manifest
    seconds = max((manifest.completed_at - started_at).total_seconds(), 0.0)
    return BackupCompleted(
        target=intent.target,
        kind=intent.kind,
        backup=str(ref),
        completed_at=manifest.completed_at,
        stored_bytes=manifest.stored_size,
        plaintext_sha256=manifest.plaintext_sha256,
        encrypted=manifest.encrypted,
        verified=manifest.verified_at is not None,
        etcd_revision=manifest.etcd.revision if manifest.etcd else None,
        pruned=[str(r) for r in result.pruned],
        cluster_id=intent.cluster_id,
        policy_id=policy_id,
        location_id=location_id,
        started_at=started_at,
        plaintext_bytes=manifest.plaintext_size,
        stored_sha256=manifest.stored_sha256,
        etcd_key_count=manifest.etcd.key_count if manifest.etcd else None,
        kubernetes_version=manifest.kubernetes_version,
        encryption_key_id=manifest.encryption.key_id if manifest.encryption else None,
        duration_seconds=round(seconds, 3),
        throughput_bytes_per_second=round(manifest.plaintext_size / seconds, 1)
        if seconds > 0
        else None,
    )


def failed(
    intent: RunBackup,
    ref: BackupRef | None,
    now: datetime,
    reason: str,
    message: str,
    policy_id: str | None,
    location_id: str | None,
) -> BackupFailed:
    return BackupFailed(
        target=intent.target,
        kind=intent.kind,
        backup=str(ref) if ref else None,
        failed_at=now,
        reason=reason,
        message=message,
        cluster_id=intent.cluster_id,
        policy_id=policy_id,
        location_id=location_id,
    )
