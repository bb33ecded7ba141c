"""Staged restore snapshots and the small HTTP server that hands them to a restore Job.

`StagedSnapshots` serves a verified snapshot staged under `<directory>/<restore id>/snapshot.db`
at `GET /v1/restores/<restore id>/snapshot?expires=<unix seconds>&token=<hex HMAC-SHA256 over
"<restore id>\\n<expires>">`, streamed from disk (never loaded into memory): 403 for a missing,
wrong (compared in constant time) or expired token, 404 when nothing is staged. The HMAC key is
derived from the secrets key (`NEST_SECRETS_KEY`), so a URL stays valid across a restart of the
service, which at start removes only what expired and serves the rest. Files are removed once
their URL expired. The server starts with the first restore, so a replica that never stages
one never binds the port.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from libs.common.secrets import derived_key
from libs.common.settings import Settings
from libs.common.tasks import TaskSet

if TYPE_CHECKING:
    import aiohttp.web

log = logging.getLogger(__name__)

SNAPSHOT_NAME = "snapshot.db"
RESTORE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""What a restore id may look like (it names a directory and a URL path segment)."""


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
        self._tasks = TaskSet()
        self._lock = asyncio.Lock()

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def path_for(self, restore_id: str) -> Path:
        if not RESTORE_ID.match(restore_id):
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
            import aiohttp.web  # with the first restore: an idle service never loads it

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
            self._tasks.spawn("restore-sweeper", self._sweep_loop())
        log.info("serving staged restore snapshots", extra={"url": self.base_url})

    async def stop(self) -> None:
        await self._tasks.stop(2.0)
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
        import aiohttp.web

        restore_id = request.match_info["restore_id"]
        expires = request.query.get("expires", "")
        token = request.query.get("token", "")
        if not RESTORE_ID.match(restore_id) or not token_valid(
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
