"""Restores from a stored backup: an etcd member's data dir, the Foundry DB, a restore drill.

Each one first downloads the backup to a scratch file through `artifacts.download`, which
checks the stored and plaintext sha256 (and decryption) and only then creates the file; the
restore tool runs on that verified file, which is removed afterwards. A backup of the wrong
kind for the destination is refused before anything is downloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path

from services.backup import artifacts, crypto, errors
from services.backup.database import PostgresTarget, restore_postgres, restore_sqlite
from services.backup.etcd import DrillResult, restore_drill, restore_snapshot
from services.backup.layout import BackupRef
from services.backup.manifest import Manifest
from services.backup.runs import sqlite_path
from services.backup.store import ObjectStore


async def _manifest_of_kind(store: ObjectStore, ref: BackupRef, kinds: set[str]) -> Manifest:
    manifest = await artifacts.read_manifest(store, ref)
    if manifest.kind not in kinds:
        raise errors.RestoreError(
            f"backup {ref} is of kind {manifest.kind!r}; this restore needs "
            f"{' or '.join(repr(k) for k in sorted(kinds))}"
        )
    return manifest


async def restore_etcd(
    store: ObjectStore,
    ref: BackupRef,
    data_dir: Path,
    *,
    keyring: crypto.Keyring | None = None,
    name: str = "default",
    peer_url: str = "http://127.0.0.1:2380",
    initial_cluster: str | None = None,
    scratch_dir: Path | None = None,
    bin_dir: Path | None = None,
) -> Manifest:
    """Restore an etcd backup into a new member data dir (`etcdutl snapshot restore`)."""
    await _manifest_of_kind(store, ref, {"etcd"})
    with tempfile.TemporaryDirectory(prefix="nest-restore-", dir=scratch_dir) as directory:
        snapshot = Path(directory) / "snapshot.db"
        manifest = await artifacts.download(store, ref, snapshot, keyring)
        await restore_snapshot(
            snapshot,
            data_dir,
            name=name,
            peer_url=peer_url,
            initial_cluster=initial_cluster,
            bin_dir=bin_dir,
        )
    return manifest


async def drill(
    store: ObjectStore,
    ref: BackupRef,
    *,
    keyring: crypto.Keyring | None = None,
    scratch_dir: Path | None = None,
    bin_dir: Path | None = None,
) -> DrillResult:
    """Download, restore and start an etcd backup in a scratch dir; check revision and keys."""
    await _manifest_of_kind(store, ref, {"etcd"})
    with tempfile.TemporaryDirectory(prefix="nest-drill-", dir=scratch_dir) as directory:
        scratch = Path(directory)
        snapshot = scratch / "snapshot.db"
        manifest = await artifacts.download(store, ref, snapshot, keyring)
        return await restore_drill(snapshot, scratch, manifest.etcd, bin_dir=bin_dir)


async def restore_foundry(
    store: ObjectStore,
    ref: BackupRef,
    database_url: str,
    *,
    keyring: crypto.Keyring | None = None,
    clean: bool = False,
    scratch_dir: Path | None = None,
    pg_bin_dir: Path | None = None,
) -> Manifest:
    """Restore a Foundry DB backup into `database_url` (a PostgreSQL database that exists, or a
    SQLite file path that nothing has open). `clean` drops existing objects first (PostgreSQL)."""
    destination = sqlite_path(database_url)
    expected = "sqlite" if destination is not None else "postgres"
    await _manifest_of_kind(store, ref, {expected})
    with tempfile.TemporaryDirectory(prefix="nest-restore-", dir=scratch_dir) as directory:
        local = Path(directory) / "foundry"
        manifest = await artifacts.download(store, ref, local, keyring)
        if destination is not None:
            await restore_sqlite(local, destination)
        else:
            await restore_postgres(
                local, PostgresTarget.from_url(database_url), clean=clean, bin_dir=pg_bin_dir
            )
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(local.unlink)
    return manifest
