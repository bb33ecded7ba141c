"""Restore drills: prove that the newest verified backup of a target actually restores.

`drill_newest` finds the newest verified backup of a target (`stores.artifacts.list_backups`),
then drills it by kind: `drills.etcd` (restored and started in a throwaway etcd, revision and key
count compared with the manifest: exactly when the manifest's revision is exact, else revision
≥ the manifest's) or `drills.foundry` (integrity, rows per table, the alembic version table).
Each downloads the backup with every check (`stores.artifacts.download`: stored and plaintext
sha256, decryption).

It never raises for a backup-domain problem: the result is a `DrillPassed`, or a `DrillFailed`
whose `reason` says what broke (`NoBackup`, `IntegrityError`, `WrongKey`, `UnknownKey`,
`CiphertextCorrupt`, `RevisionMismatch`, `KeyCountMismatch`, `RestoreFailed`,
`AlembicVersionMissing`, `NoScratchDatabase`, `ToolMissing`, store errors by their reason).
Scratch files are always removed.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import tempfile
import time
from datetime import datetime
from pathlib import Path

from libs.common.contract.backup import DrillFailed, DrillPassed
from services.backup import errors
from services.backup.drills.etcd import drill_etcd
from services.backup.drills.foundry import drill_foundry
from services.backup.stores import artifacts, crypto
from services.backup.stores.objects import ObjectStore

log = logging.getLogger(__name__)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, errors.DrillCheckFailed):
        return exc.reason
    if isinstance(exc, errors.RestoreError):
        return "RestoreFailed"
    if isinstance(exc, errors.BackupError):
        return exc.reason
    return "RestoreFailed"


async def drill_newest(
    store: ObjectStore,
    target: str,
    kind: str,
    keyring: crypto.Keyring | None,
    *,
    scratch_dir: Path,
    etcd_bin_dir: Path | None,
    database_url: str | None,
    pg_bin_dir: Path | None,
    location_id: str | None,
    policy_id: str | None,
    now: datetime,
) -> DrillPassed | DrillFailed:
    """Drill the newest verified backup of `target` (kind `etcd` or `foundry`); see the module."""
    began = time.monotonic()
    backup: str | None = None

    def failed(reason: str, message: str) -> DrillFailed:
        log.warning(
            "restore drill failed",
            extra={"target": target, "backup": backup, "reason": reason, "error": message},
        )
        return DrillFailed(
            target=target,
            kind=kind,
            backup=backup,
            location_id=location_id,
            policy_id=policy_id,
            drilled_at=now,
            reason=reason,
            message=message,
        )

    if kind not in ("etcd", "foundry"):
        return failed("RestoreFailed", f"unknown backup kind {kind!r} (etcd or foundry)")
    try:
        manifests = await artifacts.list_backups(store, target)
    except (errors.BackupError, OSError) as exc:
        reason = exc.reason if isinstance(exc, errors.BackupError) else "StoreError"
        return failed(
            reason, f"cannot list the backups of {target!r} in {store.description}: {exc}"
        )
    verified = [m for m in manifests if m.verified_at is not None]
    if not verified:
        return failed("NoBackup", f"no verified backup of {target!r} in {store.description}")
    manifest = verified[-1]
    backup = str(manifest.ref)
    try:
        await asyncio.to_thread(scratch_dir.mkdir, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="nest-drill-", dir=scratch_dir) as directory:
            scratch = Path(directory)
            revision: int | None = None
            key_count: int | None = None
            rows: dict[str, int] | None = None
            if kind == "etcd":
                revision, key_count = await drill_etcd(
                    store, manifest, keyring, scratch, etcd_bin_dir
                )
            else:
                rows = await drill_foundry(
                    store, manifest, keyring, scratch, database_url, pg_bin_dir
                )
    except (errors.BackupError, OSError, sqlite3.Error) as exc:
        return failed(_reason(exc), f"drill of {backup}: {exc}")
    seconds = round(time.monotonic() - began, 3)
    log.info("restore drill passed", extra={"backup": backup, "seconds": seconds})
    return DrillPassed(
        target=target,
        kind=kind,
        backup=backup,
        location_id=location_id,
        policy_id=policy_id,
        drilled_at=now,
        duration_seconds=seconds,
        etcd_revision=revision,
        etcd_key_count=key_count,
        table_rows=rows,
    )
