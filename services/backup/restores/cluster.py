"""Preparing a cluster's etcd restore (`nest.intent.backup.restore_prepare`): fetch, verify,
stage, and hand the snapshot to the provisioner.

`RestorePreparer.prepare` reports `RestoreProgressed` `Verifying`, then:

1. downloads the backup with `stores.artifacts.download` (stored sha256, decryption with the
   keyring, plaintext sha256; written to a temp file and renamed only when every check passed)
   to `<data dir>/restores/<restore id>/snapshot.db`;
2. checks etcd's own sha256 trailer (the last 32 bytes) and reads the snapshot's revision with
   `etcdutl snapshot status` (`restores.etcd`);
3. reads the cluster's current etcd revision through the service's etcd access (the
   provisioner's short-lived client certificate, `snapshots.etcd.status`); an older snapshot is
   refused (`SnapshotOlder`) unless `force`, and so is any snapshot when the current revision
   cannot be read (`CurrentRevisionUnknown`) unless `force`;
4. publishes `Staged` and sends `RestoreEtcd` with a short-lived URL to the file
   (`restores.staging`).

Any backup-domain error ends the restore with `Failed` and the error's reason
(`IntegrityError`, `CiphertextCorrupt`, `WrongKey`, `UnknownKey`, `ManifestMissing`,
`SnapshotCorrupt`, ...), and the staged file is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from libs.common.bus import Bus
from libs.common.clock import Clock, utcnow
from libs.common.contract.restore import PrepareRestore, RestoreEtcd, RestoreProgressed
from services.backup import errors
from services.backup.restores.etcd import check_trailer, snapshot_status
from services.backup.restores.staging import RESTORE_ID, StagedSnapshots
from services.backup.snapshots.etcd import status
from services.backup.snapshots.runs import EtcdAccess
from services.backup.stores import artifacts, crypto
from services.backup.stores.layout import parse_ref
from services.backup.stores.objects import ObjectStore

log = logging.getLogger(__name__)

SOURCE = "backup"

StoreFor = Callable[[str | None], contextlib.AbstractAsyncContextManager[ObjectStore]]
"""Location id (None: the service's configured store) -> the store holding the backup, for
the time of one download."""


async def current_revision(access: EtcdAccess | None, cluster_id: str) -> tuple[int | None, str]:
    """The cluster's etcd revision now, or None with the reason it could not be read."""
    if access is None:
        return None, "no etcd access is configured"
    import httpx  # with the first restore: an idle backup service never loads it

    try:
        endpoint = await access(cluster_id)
        async with httpx.AsyncClient(
            base_url=endpoint.url, verify=endpoint.ssl_context(), timeout=10.0
        ) as client:
            found = await status(client)
    except (errors.BackupError, httpx.HTTPError, OSError, ValueError, KeyError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return found.revision, ""


@dataclass
class RestorePreparer:
    """Carries out `PrepareRestore` intents (see the module docstring)."""

    staged: StagedSnapshots
    store_for: StoreFor
    keyring: Callable[[], crypto.Keyring | None]
    etcd_access: Callable[[], EtcdAccess | None]
    bus: Callable[[], Bus]
    etcd_bin_dir: Path | None = None
    clock: Clock = utcnow

    async def prepare(self, intent: PrepareRestore) -> None:
        await self._progress(intent, "Verifying", message=f"fetching and checking {intent.backup}")
        try:
            staged = await self._verify_and_stage(intent)
        except errors.BackupError as exc:
            if RESTORE_ID.match(intent.restore_id):
                await asyncio.to_thread(self.staged.remove, intent.restore_id)
            log.warning(
                "restore refused",
                extra={"restoreId": intent.restore_id, "reason": exc.reason, "error": str(exc)},
            )
            await self._progress(intent, "Failed", exc.reason, str(exc))
            return
        await self._progress(
            intent,
            "Staged",
            message=f"snapshot verified ({staged.snapshot_bytes} bytes, revision "
            f"{staged.etcd_revision}); handing it to the provisioner",
            revision=staged.etcd_revision,
        )
        await self.bus().publish(staged, source=SOURCE, subject=intent.cluster_id)

    async def _verify_and_stage(self, intent: PrepareRestore) -> RestoreEtcd:
        try:
            ref = parse_ref(intent.backup)
            path = self.staged.path_for(intent.restore_id)
        except ValueError as exc:
            raise errors.RestoreRefused("InvalidBackup", str(exc)) from None
        try:
            await self.staged.serve()
        except OSError as exc:
            raise errors.RestoreRefused(
                "StagingUnavailable",
                f"cannot serve staged snapshots at {self.staged.host}:{self.staged.port}: {exc}",
            ) from None
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        async with self.store_for(intent.location_id) as store:
            manifest = await artifacts.download(store, ref, path, self.keyring())
        if manifest.kind != "etcd":
            raise errors.RestoreRefused(
                "NotAnEtcdBackup", f"backup {ref} is a {manifest.kind} backup, not etcd"
            )
        await asyncio.to_thread(check_trailer, path)
        snapshot = await snapshot_status(path, bin_dir=self.etcd_bin_dir)
        # `snapshot status` reads the newest key's revision (0 for an empty store, whose header
        # revision is 1); the manifest's is the header's when the snapshot started.
        revision = max(snapshot.revision, manifest.etcd.revision if manifest.etcd else 0)
        current, why = await current_revision(self.etcd_access(), intent.cluster_id)
        if current is None and not intent.force:
            raise errors.RestoreRefused(
                "CurrentRevisionUnknown",
                f"the cluster's current etcd revision cannot be read ({why}); restore with "
                "force to go ahead anyway",
            )
        if current is not None and revision < current and not intent.force:
            raise errors.RestoreRefused(
                "SnapshotOlder",
                f"the snapshot's revision {revision} is older than the cluster's current "
                f"revision {current}; restore with force to roll the cluster back",
            )
        expires = int(self.staged.wall_clock() + self.staged.ttl.total_seconds())
        return RestoreEtcd(
            restore_id=intent.restore_id,
            cluster_id=intent.cluster_id,
            backup=intent.backup,
            snapshot_url=self.staged.url_for(intent.restore_id, expires),
            snapshot_sha256=manifest.plaintext_sha256,
            snapshot_bytes=manifest.plaintext_size,
            etcd_revision=revision,
            expires_at=datetime.fromtimestamp(expires, UTC),
        )

    async def _progress(
        self,
        intent: PrepareRestore,
        phase: str,
        reason: str = "",
        message: str = "",
        revision: int | None = None,
    ) -> None:
        await self.bus().publish(
            RestoreProgressed(
                restore_id=intent.restore_id,
                cluster_id=intent.cluster_id,
                backup=intent.backup,
                phase=phase,
                reason=reason,
                message=message,
                at=self.clock(),
                etcd_revision=revision,
            ),
            source=SOURCE,
            subject=intent.restore_id,
        )
