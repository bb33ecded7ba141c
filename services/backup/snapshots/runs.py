"""One backup run, whatever triggered it: clean up, back up, verify, prune.

`run_backup` is the domain function a message handler (or the CLI, or a test) calls with plain
values: it removes abandoned uploads of the target, streams the source into the store
(`artifacts.write_backup`), and applies retention, which never deletes the newest verified
backup. Where the bytes come from is decided by `source_for`: the Foundry DB from its URL, or a
cluster's etcd through an `EtcdAccess` callable that yields the endpoint and client certificate
(issued by whoever owns the cluster's PKI; never carried in an intent).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from services.backup import errors
from services.backup.snapshots.database import (
    PostgresDump,
    PostgresTarget,
    SqliteSnapshot,
    sqlite_path,
)
from services.backup.snapshots.etcd import EtcdEndpoint, EtcdSnapshot
from services.backup.snapshots.retention import Candidate, RetentionPolicy, plan
from services.backup.stores import artifacts, crypto
from services.backup.stores.layout import BackupRef
from services.backup.stores.manifest import Kind, Manifest
from services.backup.stores.objects import ObjectStore

log = logging.getLogger(__name__)

EtcdAccess = Callable[[str], Awaitable[EtcdEndpoint]]
"""Cluster id -> how to reach that cluster's etcd (URL, CA, short-lived client pair)."""


@dataclass
class BackupContext:
    """Everything a run needs besides the request: where to, with which keys and policy."""

    store: ObjectStore
    keyring: crypto.Keyring | None = None
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    grace: timedelta = artifacts.DEFAULT_GRACE
    verify: bool = True
    database_url: str | None = None
    """The Foundry DB (a SQLAlchemy or libpq URL), for `foundry` runs."""
    scratch_dir: Path | None = None
    pg_bin_dir: Path | None = None
    etcd_access: EtcdAccess | None = None


@dataclass(frozen=True)
class RunRequest:
    """What to back up (the domain view of a RunBackup intent)."""

    target: str
    kind: str
    """`foundry` or `etcd`."""
    cluster_id: str | None = None
    kubernetes_version: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunResult:
    manifest: Manifest
    pruned: list[BackupRef]
    cleaned: list[BackupRef]


class _Source:
    """A stream plus the manifest details known once it has been read."""

    def __init__(
        self,
        kind: Kind,
        chunks: AsyncIterator[bytes],
        details: Callable[[], dict[str, Any]],
    ) -> None:
        self.kind = kind
        self.chunks = chunks
        self.details = details


async def source_for(request: RunRequest, context: BackupContext) -> _Source:
    if request.kind == "foundry":
        if not context.database_url:
            raise errors.DumpError("no Foundry database URL configured")
        path = sqlite_path(context.database_url)
        if path is not None:
            sqlite = SqliteSnapshot(path, scratch_dir=context.scratch_dir)
            return _Source("sqlite", sqlite.chunks(), sqlite.details)
        dump = PostgresDump(
            PostgresTarget.from_url(context.database_url), bin_dir=context.pg_bin_dir
        )
        return _Source("postgres", dump.chunks(), dump.details)
    if request.kind == "etcd":
        if context.etcd_access is None or request.cluster_id is None:
            raise errors.SnapshotError(
                f"no way to reach the etcd of {request.target!r} (cluster id or access missing)"
            )
        snapshot = EtcdSnapshot(await context.etcd_access(request.cluster_id))
        return _Source("etcd", snapshot.chunks(), snapshot.details)
    raise ValueError(f"unknown backup kind {request.kind!r}")


async def prune(
    store: ObjectStore, target: str, policy: RetentionPolicy, now: datetime
) -> list[BackupRef]:
    """Delete what `policy` does not keep among the target's complete backups."""
    manifests = await artifacts.list_backups(store, target)
    decision = plan((Candidate(m.ref, m.verified_at is not None) for m in manifests), policy, now)
    for ref in decision.delete:
        await artifacts.delete_backup(store, ref)
        log.info("backup pruned", extra={"backup": str(ref)})
    return list(decision.delete)


async def run_backup(
    request: RunRequest, ref: BackupRef, context: BackupContext, now: datetime
) -> RunResult:
    """Clean up the target's abandoned uploads, take backup `ref`, then apply retention."""
    cleaned = await artifacts.cleanup_incomplete(context.store, now, context.grace, ref.target)
    source = await source_for(request, context)
    manifest = await artifacts.write_backup(
        context.store,
        ref,
        source.kind,
        source.chunks,
        keyring=context.keyring,
        verify=context.verify,
        details=source.details,
        kubernetes_version=request.kubernetes_version,
        labels=request.labels,
    )
    pruned = await prune(context.store, ref.target, context.retention, now)
    return RunResult(manifest=manifest, pruned=pruned, cleaned=cleaned)
