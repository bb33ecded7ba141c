"""Writing, reading, listing and cleaning up backups in an object store, whatever their source.

`write_backup` streams a source through size/sha256 measurement and optional encryption into the
store, reads the stored object back to verify it (bytes and, when encrypted, decryption), and
only then writes `manifest.json`. A backup folder without a manifest is incomplete: `list_backups`
never shows it, `read_backup`/`download` refuse it, and `cleanup_incomplete` removes it once it
is older than a grace period (so an upload still in progress is left alone).

`read_backup`/`download` check the manifest's stored and plaintext sha256 and sizes while
streaming; `download` writes to a temp file and renames it only after every check passed, so a
restore never starts from an unverified file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.backup import errors
from services.backup.stores import crypto
from services.backup.stores.layout import MANIFEST_NAME, BackupRef, parse_key
from services.backup.stores.manifest import Encryption, Kind, Manifest
from services.backup.stores.objects import ObjectStore
from services.backup.stores.streams import Measured, collect, iterate

log = logging.getLogger(__name__)

DEFAULT_GRACE = timedelta(hours=6)
"""How old an incomplete backup must be before cleanup removes it."""

ARTIFACT_NAMES: dict[str, str] = {
    "etcd": "etcd-snapshot.db",
    "postgres": "foundry.pgdump",
    "sqlite": "foundry.sqlite3",
}


def artifact_name(kind: Kind, encrypted: bool) -> str:
    return ARTIFACT_NAMES[kind] + (".enc" if encrypted else "")


async def write_backup(
    store: ObjectStore,
    ref: BackupRef,
    kind: Kind,
    source: AsyncIterable[bytes],
    *,
    keyring: crypto.Keyring | None = None,
    verify: bool = True,
    details: Callable[[], dict[str, Any]] | None = None,
    kubernetes_version: str | None = None,
    labels: dict[str, str] | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Manifest:
    """Store `source` as backup `ref` and return its manifest (written last).

    `details()` is called once the source is exhausted and returns extra manifest fields
    (`etcd=...`, `database=...`) that are known only then. On any failure the artifact is
    deleted (best effort) and no manifest is written.
    """
    name = artifact_name(kind, keyring is not None)
    key = ref.key(name)
    plain = Measured(source)
    # Unencrypted, the stored bytes are the plaintext: hash them once, not twice.
    stored = Measured(crypto.encrypt(plain, keyring)) if keyring else plain
    try:
        written = await store.put(key, stored)
        _check_upload(key, plain, stored, written)
        extra = details() if details else {}
        manifest = Manifest(
            target=ref.target,
            backup_id=ref.backup_id,
            kind=kind,
            created_at=ref.created,
            completed_at=now(),
            kubernetes_version=kubernetes_version,
            artifact=name,
            stored_size=stored.size,
            stored_sha256=stored.sha256,
            plaintext_size=plain.size,
            plaintext_sha256=plain.sha256,
            encryption=(
                Encryption(key_id=keyring.active, chunk_size=crypto.CHUNK_SIZE) if keyring else None
            ),
            labels=labels or {},
            **extra,
        )
        if verify:
            await _verify(store, manifest, keyring)
            manifest.verified_at = now()
        await store.put(ref.manifest_key, iterate(manifest.to_json()))
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(store.delete(key))
        raise
    log.info(
        "backup stored",
        extra={"backup": str(ref), "bytes": stored.size, "store": store.description},
    )
    return manifest


def _check_upload(key: str, plain: Measured, stored: Measured, written: int) -> None:
    if not plain.finished or written != stored.size:
        raise errors.StoreError(f"upload of {key} ended early ({written} bytes stored)")


async def _verify(store: ObjectStore, manifest: Manifest, keyring: crypto.Keyring | None) -> None:
    """Read the stored artifact back; sizes and hashes must match (and it must decrypt)."""
    async for _ in _checked(store, manifest, keyring):
        pass


async def read_manifest(store: ObjectStore, ref: BackupRef) -> Manifest:
    try:
        data = await collect(store.get(ref.manifest_key), limit=1 << 20)
    except errors.ObjectNotFound:
        raise errors.ManifestMissing(
            f"backup {ref} has no manifest: it is incomplete (its upload did not finish) "
            "and cannot be restored"
        ) from None
    except ValueError:
        raise errors.ManifestInvalid(f"manifest of {ref} is larger than 1 MiB") from None
    manifest = Manifest.from_json(data, str(ref))
    if (manifest.target, manifest.backup_id) != (ref.target, ref.backup_id):
        raise errors.ManifestInvalid(f"manifest of {ref} describes another backup")
    return manifest


async def _checked(
    store: ObjectStore, manifest: Manifest, keyring: crypto.Keyring | None
) -> AsyncIterator[bytes]:
    """The plaintext of a backup, raising at the end if any size or hash differs."""
    key = manifest.ref.key(manifest.artifact)
    stored = Measured(store.get(key))
    plain = stored
    if manifest.encryption is not None:
        if keyring is None:
            raise errors.UnknownKey(
                f"backup {manifest.ref} is encrypted with key id "
                f"{manifest.encryption.key_id!r} but no encryption keys are configured"
            )
        plain = Measured(crypto.decrypt(stored, keyring))
    async for chunk in plain:
        yield chunk
    if (stored.size, stored.sha256) != (manifest.stored_size, manifest.stored_sha256):
        raise errors.IntegrityError(
            f"stored artifact of {manifest.ref} does not match its manifest: "
            f"{stored.size} bytes sha256 {stored.sha256[:16]}..., expected "
            f"{manifest.stored_size} bytes sha256 {manifest.stored_sha256[:16]}..."
        )
    if (plain.size, plain.sha256) != (manifest.plaintext_size, manifest.plaintext_sha256):
        raise errors.IntegrityError(
            f"decrypted artifact of {manifest.ref} does not match its manifest's plaintext hash"
        )


async def read_backup(
    store: ObjectStore, ref: BackupRef, keyring: crypto.Keyring | None = None
) -> tuple[Manifest, AsyncIterator[bytes]]:
    """The manifest and the plaintext stream; the stream raises at its end if a check fails,
    so only use the bytes once it has been read to the end (see `download`)."""
    manifest = await read_manifest(store, ref)
    return manifest, _checked(store, manifest, keyring)


async def download(
    store: ObjectStore, ref: BackupRef, destination: Path, keyring: crypto.Keyring | None = None
) -> Manifest:
    """Write the verified plaintext of backup `ref` to `destination` (created only if valid)."""
    manifest, stream = await read_backup(store, ref, keyring)
    temp = destination.with_name(f".{destination.name}.partial")
    handle = await asyncio.to_thread(temp.open, "wb")
    try:
        try:
            async for chunk in stream:
                await asyncio.to_thread(handle.write, chunk)
            await asyncio.to_thread(handle.flush)
            await asyncio.to_thread(os.fsync, handle.fileno())
        finally:
            await asyncio.to_thread(handle.close)
        await asyncio.to_thread(os.replace, temp, destination)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return manifest


@dataclass(frozen=True)
class Listing:
    """What a store holds for some targets: complete backups and incomplete folders."""

    complete: list[Manifest]
    """Backups with a valid manifest, oldest first."""
    incomplete: dict[BackupRef, datetime]
    """Folders without a manifest, with the time of their newest object."""
    unreadable: dict[BackupRef, str]
    """Folders whose manifest cannot be read, with the reason; kept, never cleaned up."""


async def scan(store: ObjectStore, target: str | None = None) -> Listing:
    """Group the store's objects into backups; read every manifest."""
    folders: dict[BackupRef, dict[str, datetime]] = {}
    for info in await store.list(f"{target}/" if target else ""):
        parsed = parse_key(info.key)
        if parsed is None:
            continue
        ref, filename = parsed
        folders.setdefault(ref, {})[filename] = info.modified
    complete: list[Manifest] = []
    incomplete: dict[BackupRef, datetime] = {}
    unreadable: dict[BackupRef, str] = {}
    for ref, files in sorted(folders.items()):
        if MANIFEST_NAME not in files:
            incomplete[ref] = max(files.values())
            continue
        try:
            complete.append(await read_manifest(store, ref))
        except (errors.ManifestInvalid, errors.ManifestMissing) as exc:
            # Not restorable by this Nest, but never treated as abandoned: it may be a newer
            # format or need a human. Listed apart, never deleted automatically.
            log.warning("unreadable manifest", extra={"backup": str(ref), "error": str(exc)})
            unreadable[ref] = str(exc)
    return Listing(complete, incomplete, unreadable)


async def list_backups(store: ObjectStore, target: str | None = None) -> list[Manifest]:
    """Complete backups (with a valid manifest), oldest first."""
    return (await scan(store, target)).complete


async def delete_backup(store: ObjectStore, ref: BackupRef) -> None:
    """Delete a backup: manifest first, so a half-deleted backup is never listed as complete."""
    await store.delete(ref.manifest_key)
    for info in await store.list(ref.prefix):
        await store.delete(info.key)


async def cleanup_incomplete(
    store: ObjectStore,
    now: datetime,
    grace: timedelta = DEFAULT_GRACE,
    target: str | None = None,
) -> list[BackupRef]:
    """Remove incomplete backups and interrupted uploads older than `grace`; return the removed."""
    cutoff = now - grace
    listing = await scan(store, target)
    removed: list[BackupRef] = []
    for ref, newest in listing.incomplete.items():
        if newest < cutoff and ref.created < cutoff:
            await delete_backup(store, ref)
            removed.append(ref)
    await store.cleanup_uploads(cutoff)
    return removed


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
