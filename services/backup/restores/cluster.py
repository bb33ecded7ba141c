"""Preparing a cluster's etcd restore (`nest.intent.backup.restore_prepare`): fetch, verify,
stage, and hand the snapshot to the provisioner.

`RestorePreparer.prepare` reports `RestoreProgressed` `Verifying`, then:

1. downloads the backup with `artifacts.download` (stored sha256, decryption with the keyring,
   plaintext sha256; written to a temp file and renamed only when every check passed) to
   `<data dir>/restores/<restore id>/snapshot.db`;
2. checks etcd's own sha256 trailer (the last 32 bytes) and reads the snapshot's revision with
   `etcdutl snapshot status`;
3. reads the cluster's current etcd revision through the service's etcd access (the
   provisioner's short-lived client certificate, `etcd.status`); an older snapshot is refused
   (`SnapshotOlder`) unless `force`, and so is any snapshot when the current revision cannot be
   read (`CurrentRevisionUnknown`) unless `force`;
4. publishes `Staged` and sends `RestoreEtcd` with a short-lived URL to the file.

Any backup-domain error ends the restore with `Failed` and the error's reason
(`IntegrityError`, `CiphertextCorrupt`, `WrongKey`, `UnknownKey`, `ManifestMissing`,
`SnapshotCorrupt`, ...), and the staged file is removed.

`StagedSnapshots` serves the staged files: `GET /v1/restores/<restore id>/snapshot?expires=
<unix seconds>&token=<hex HMAC-SHA256 over "<restore id>\\n<expires>">`, streamed from disk
(never loaded into memory), 403 for a missing, wrong (compared in constant time) or expired
token, 404 when nothing is staged. The HMAC key is derived from the secrets key
(`NEST_SECRETS_KEY`), so a URL stays valid across a restart of the service, which at start
removes only what expired and serves the rest. Files are removed once their URL expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp.web
import httpx

from libs.common.bus import Bus
from libs.common.contract.restore import PrepareRestore, RestoreEtcd, RestoreProgressed
from libs.common.secrets import derived_key
from libs.common.settings import Settings
from services.backup import artifacts, crypto, errors, etcd
from services.backup.layout import parse_ref
from services.backup.runs import EtcdAccess
from services.backup.store import ObjectStore

log = logging.getLogger(__name__)

SOURCE = "backup"
SNAPSHOT_NAME = "snapshot.db"
_RESTORE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHUNK = 1 << 20

StoreFor = Callable[[str | None], contextlib.AbstractAsyncContextManager[ObjectStore]]
"""Location id (None: the service's configured store) -> the store holding the backup, for
the time of one download."""
Clock = Callable[[], datetime]


class RestoreRefused(errors.BackupError):
    """The restore must not go on; `reason` says why (SnapshotOlder, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# --- signed URLs and the file server ------------------------------------------------------


def sign(key: bytes, restore_id: str, expires: int) -> str:
    """The token of the URL of `restore_id` valid until `expires` (unix seconds)."""
    return hmac.new(key, f"{restore_id}\n{expires}".encode(), hashlib.sha256).hexdigest()


def token_valid(key: bytes, restore_id: str, expires: str, token: str, now: float) -> bool:
    """Whether `token` is the signature of (`restore_id`, `expires`) and has not expired."""
    try:
        until = int(expires)
    except ValueError:
        return False
    expected = sign(key, restore_id, until)
    # Compare first, whatever the expiry, so the time taken tells nothing about the token.
    matches = hmac.compare_digest(expected.encode(), token.encode())
    return matches and now < until


@dataclass
class StagedSnapshots:
    """Staged plaintext snapshots under `directory` and the HTTP server handing them out."""

    directory: Path
    host: str = "127.0.0.1"
    port: int = 0
    public_url: str | None = None
    ttl: timedelta = timedelta(hours=1)
    key: bytes = b""
    wall_clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self.key = self.key or secrets.token_bytes(32)
        self._runner: aiohttp.web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def path_for(self, restore_id: str) -> Path:
        if not _RESTORE_ID.match(restore_id):
            raise ValueError(f"not a restore id: {restore_id!r}")
        return self.directory / restore_id / SNAPSHOT_NAME

    def url_for(self, restore_id: str, expires: int) -> str:
        token = sign(self.key, restore_id, expires)
        return f"{self.base_url}/v1/restores/{restore_id}/snapshot?expires={expires}&token={token}"

    def remove(self, restore_id: str) -> None:
        shutil.rmtree(self.path_for(restore_id).parent, ignore_errors=True)

    async def start(self) -> None:
        """Remove what an earlier process staged whose URL expired, and serve the rest at once:
        a restore Job may still be fetching it (the URL key is derived from the secrets key, so
        it outlives the process). Otherwise the server starts with the first restore (`serve`),
        so a replica that never stages one never binds the port."""
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(self.sweep)
        if await asyncio.to_thread(lambda: any(self.directory.iterdir())):
            await self.serve()

    async def serve(self) -> None:
        """Serve the staged files (once; later calls return at once)."""
        async with self._lock:
            if self._runner is not None:
                return
            app = aiohttp.web.Application()
            app.router.add_get("/v1/restores/{restore_id}/snapshot", self._serve)
            runner = aiohttp.web.AppRunner(app, access_log=None)
            await runner.setup()
            site = aiohttp.web.TCPSite(runner, self.host, self.port)
            try:
                await site.start()
            except OSError:
                await runner.cleanup()
                raise
            self._runner = runner
            if self.port == 0:
                self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="restore-sweeper")
        log.info("serving staged restore snapshots", extra={"url": self.base_url})

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def sweep(self) -> list[str]:
        """Remove staged snapshots whose URL expired (by the file's age); their restore ids."""
        removed: list[str] = []
        cutoff = self.wall_clock() - self.ttl.total_seconds()
        if not self.directory.is_dir():
            return removed
        for entry in self.directory.iterdir():
            try:
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry.name)
            except FileNotFoundError:
                continue
        return removed

    async def _sweep_loop(self) -> None:
        interval = max(1.0, min(self.ttl.total_seconds() / 4, 60.0))
        while True:
            await asyncio.sleep(interval)
            try:
                for restore_id in await asyncio.to_thread(self.sweep):
                    log.info("staged snapshot expired", extra={"restoreId": restore_id})
            except OSError as exc:
                log.warning("could not sweep staged snapshots: %s", exc)

    async def _serve(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        restore_id = request.match_info["restore_id"]
        expires = request.query.get("expires", "")
        token = request.query.get("token", "")
        if not _RESTORE_ID.match(restore_id) or not token_valid(
            self.key, restore_id, expires, token, self.wall_clock()
        ):
            return aiohttp.web.json_response(
                {"title": "Forbidden", "detail": "missing, wrong or expired token"}, status=403
            )
        path = self.path_for(restore_id)
        if not await asyncio.to_thread(path.is_file):
            return aiohttp.web.json_response(
                {"title": "Not Found", "detail": "nothing staged for this restore"}, status=404
            )
        log.info("staged snapshot fetched", extra={"restoreId": restore_id})
        return aiohttp.web.FileResponse(path, chunk_size=256 * 1024)


# --- preparing a restore ------------------------------------------------------------------


def check_trailer(path: Path) -> None:
    """etcd's own hash: the last 32 bytes are the sha256 of everything before them."""
    size = path.stat().st_size
    if size <= etcd.TRAILER_SIZE:
        raise errors.SnapshotCorrupt(f"the snapshot is {size} bytes, too short to be one")
    digest = hashlib.sha256()
    remaining = size - etcd.TRAILER_SIZE
    with path.open("rb") as handle:
        while remaining:
            block = handle.read(min(_CHUNK, remaining))
            if not block:
                raise errors.SnapshotCorrupt("the snapshot shrank while it was checked")
            digest.update(block)
            remaining -= len(block)
        trailer = handle.read(etcd.TRAILER_SIZE)
    if not hmac.compare_digest(digest.digest(), trailer):
        raise errors.SnapshotCorrupt(
            "the snapshot's sha256 trailer does not match its contents (corrupt, or not an etcd "
            "snapshot)"
        )


async def current_revision(access: EtcdAccess | None, cluster_id: str) -> tuple[int | None, str]:
    """The cluster's etcd revision now, or None with the reason it could not be read."""
    if access is None:
        return None, "no etcd access is configured"
    try:
        endpoint = await access(cluster_id)
        async with httpx.AsyncClient(
            base_url=endpoint.url, verify=endpoint.ssl_context(), timeout=10.0
        ) as client:
            found = await etcd.status(client)
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
    clock: Clock = lambda: datetime.now(UTC)

    async def prepare(self, intent: PrepareRestore) -> None:
        await self._progress(intent, "Verifying", message=f"fetching and checking {intent.backup}")
        try:
            staged = await self._verify_and_stage(intent)
        except errors.BackupError as exc:
            if _RESTORE_ID.match(intent.restore_id):
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
            raise RestoreRefused("InvalidBackup", str(exc)) from None
        try:
            await self.staged.serve()
        except OSError as exc:
            raise RestoreRefused(
                "StagingUnavailable",
                f"cannot serve staged snapshots at {self.staged.host}:{self.staged.port}: {exc}",
            ) from None
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        async with self.store_for(intent.location_id) as store:
            manifest = await artifacts.download(store, ref, path, self.keyring())
        if manifest.kind != "etcd":
            raise RestoreRefused(
                "NotAnEtcdBackup", f"backup {ref} is a {manifest.kind} backup, not etcd"
            )
        await asyncio.to_thread(check_trailer, path)
        status = await etcd.snapshot_status(path, bin_dir=self.etcd_bin_dir)
        # `snapshot status` reads the newest key's revision (0 for an empty store, whose header
        # revision is 1); the manifest's is the header's when the snapshot started.
        revision = max(status.revision, manifest.etcd.revision if manifest.etcd else 0)
        current, why = await current_revision(self.etcd_access(), intent.cluster_id)
        if current is None and not intent.force:
            raise RestoreRefused(
                "CurrentRevisionUnknown",
                f"the cluster's current etcd revision cannot be read ({why}); restore with "
                "force to go ahead anyway",
            )
        if current is not None and revision < current and not intent.force:
            raise RestoreRefused(
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


def staged_from_settings(settings: Settings) -> StagedSnapshots:
    """The staging server configured by NEST_BACKUP_SERVE_HOST/PORT, NEST_BACKUP_PUBLIC_URL and
    NEST_BACKUP_RESTORE_URL_TTL_SECONDS, under `<data dir>/restores`."""
    return StagedSnapshots(
        directory=settings.data_dir / "restores",
        host=settings.backup_serve_host,
        port=settings.backup_serve_port,
        public_url=settings.backup_public_url,
        ttl=timedelta(seconds=settings.backup_restore_url_ttl_seconds),
        # Derived from the secrets key: a URL handed to a restore Job stays valid across a
        # restart of this service (the staged file survives it too, until it expires).
        key=derived_key(settings, "restore-url"),
    )


def preparer_for(service: Any) -> RestorePreparer:
    """The preparer of a running `BackupService`: staging per its settings, the backup from
    its configured store (location None) or from a backup location through the service's
    location stores (`locations.LocationStores.use`, when present), its keyring, etcd access
    and bus."""
    settings: Settings = service.settings

    @contextlib.asynccontextmanager
    async def store_for(location_id: str | None) -> AsyncIterator[ObjectStore]:
        if location_id is None:
            yield service.context.store
            return
        stores = getattr(service, "_stores", None)
        if stores is None:
            raise RestoreRefused(
                "LocationNotFound", f"backup location {location_id!r} is not known here"
            )
        async with stores.use(location_id) as (_, store):
            yield store

    return RestorePreparer(
        staged=staged_from_settings(settings),
        store_for=store_for,
        keyring=lambda: service.context.keyring,
        etcd_access=lambda: service.context.etcd_access,
        bus=lambda: service.bus,
        etcd_bin_dir=settings.backup_etcd_bin_dir,
        clock=service.clock,
    )
