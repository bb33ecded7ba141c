"""The backup service's copy of backup locations, policies and clusters, in JetStream KV.

The API owns locations and policies and stages `Apply*`/`Delete*` intents for every change; the
set of clusters comes from `ClusterDeclared`/`ClusterDeleted` events. Each copy lives in its own
bucket (`nest_backup_locations`, `nest_backup_policies`, `nest_backup_clusters`), one entry per
id, written by compare-and-set so concurrent replicas never lose an update:

- an entry is replaced only by a higher `generation` (a redelivered or re-staged message at the
  same generation changes nothing);
- for a cluster, a deletion request at the same generation also counts as newer;
- a delete leaves a tombstone (`deleted: true`), so a stale Apply that arrives after it cannot
  bring the resource back (ids are never reused).

Locations keep their secret access key sealed (libs.common.secrets), exactly as the API stored it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import nats.js.errors
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue
from pydantic import ValidationError

from libs.common.bus import Bus
from libs.common.contract.backup_policy import (
    ApplyBackupLocation,
    ApplyBackupPolicy,
    BackupPolicySpec,
    DeleteBackupLocation,
    DeleteBackupPolicy,
    SealedBackupLocation,
)
from libs.common.contract.base import WireModel
from libs.common.contract.cluster import ClusterDeclared, ClusterDeleted
from libs.common.kv import bucket_keys, open_bucket

log = logging.getLogger(__name__)

LOCATIONS_BUCKET = "nest_backup_locations"
POLICIES_BUCKET = "nest_backup_policies"
CLUSTERS_BUCKET = "nest_backup_clusters"
CAS_ATTEMPTS = 20

CatalogMessage = (
    ApplyBackupLocation
    | DeleteBackupLocation
    | ApplyBackupPolicy
    | DeleteBackupPolicy
    | ClusterDeclared
    | ClusterDeleted
)


class LocationEntry(WireModel):
    location_id: str
    name: str = ""
    generation: int
    location: SealedBackupLocation | None = None
    deleted: bool = False


class PolicyEntry(WireModel):
    policy_id: str
    name: str = ""
    generation: int
    spec: BackupPolicySpec | None = None
    deleted: bool = False


class ClusterEntry(WireModel):
    cluster_id: str
    name: str = ""
    generation: int = 0
    kubernetes_version: str | None = None
    deletion_requested: bool = False
    deleted: bool = False

    @property
    def target(self) -> str:
        return f"cluster-{self.name}"


E = TypeVar("E", LocationEntry, PolicyEntry, ClusterEntry)
Decide = Callable[[E | None], E | None]
"""Given the entry held (or None), the entry to write, or None to leave it."""


class _Entries(Generic[E]):
    """One bucket of entries of one type, with compare-and-set updates."""

    def __init__(self, kv: KeyValue, model: type[E]) -> None:
        self.kv = kv
        self.model: type[E] = model

    async def get(self, key: str) -> tuple[E | None, int | None]:
        try:
            entry = await self.kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None, None
        if entry.value is None:
            return None, entry.revision
        try:
            return self.model.model_validate_json(entry.value), entry.revision
        except ValidationError:
            log.warning("ignoring a malformed catalog entry", extra={"key": key})
            return None, entry.revision

    async def change(self, key: str, decide: Decide[E]) -> bool:
        """Apply `decide` to the held entry by compare-and-set; True if something was written."""
        for _ in range(CAS_ATTEMPTS):
            held, revision = await self.get(key)
            wanted = decide(held)
            if wanted is None:
                return False
            data = wanted.model_dump_json(by_alias=True).encode()
            try:
                if revision is None:
                    await self.kv.create(key, data)
                else:
                    await self.kv.update(key, data, last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            return True
        raise RuntimeError(f"catalog entry {key!r} kept changing; giving up for now")

    async def all(self) -> list[E]:
        keys = await bucket_keys(self.kv)
        found: list[E] = []
        for key in keys:
            entry, _ = await self.get(key)
            if entry is not None:
                found.append(entry)
        return found


def _newer(generation: int) -> Callable[[E | None], bool]:
    def check(held: E | None) -> bool:
        return held is None or (not held.deleted and generation > held.generation)

    return check


def _tombstone(held: E | None, fresh: E) -> E | None:
    return None if held is not None and held.deleted else fresh


class Catalog:
    """Locations, policies and clusters as the backup service knows them."""

    def __init__(
        self,
        locations: _Entries[LocationEntry],
        policies: _Entries[PolicyEntry],
        clusters: _Entries[ClusterEntry],
    ) -> None:
        self._locations = locations
        self._policies = policies
        self._clusters = clusters
        self.listeners: list[Callable[[CatalogMessage], Awaitable[None]]] = []
        """Called after a message changed the copy (e.g. to close a deleted location's store)."""

    @classmethod
    async def open(cls, bus: Bus) -> Catalog:
        async def bucket(name: str) -> KeyValue:
            return await open_bucket(bus, KeyValueConfig(bucket=name, history=1))

        return cls(
            _Entries(await bucket(LOCATIONS_BUCKET), LocationEntry),
            _Entries(await bucket(POLICIES_BUCKET), PolicyEntry),
            _Entries(await bucket(CLUSTERS_BUCKET), ClusterEntry),
        )

    async def apply(self, message: CatalogMessage) -> bool:
        """Take one intent or event into the copy; True if it changed anything."""
        changed = await self._apply(message)
        if changed:
            for listener in self.listeners:
                await listener(message)
        log.info(
            "catalog updated" if changed else "catalog message ignored (stale or equal)",
            extra={"kind": type(message).__name__},
        )
        return changed

    async def _apply(self, message: CatalogMessage) -> bool:
        match message:
            case ApplyBackupLocation():
                fresh_location = LocationEntry(
                    location_id=message.location_id,
                    name=message.name,
                    generation=message.generation,
                    location=message.location,
                )
                newer_location = _newer(message.generation)
                return await self._locations.change(
                    message.location_id,
                    lambda held: fresh_location if newer_location(held) else None,
                )
            case DeleteBackupLocation():
                gone_location = LocationEntry(
                    location_id=message.location_id, generation=message.generation, deleted=True
                )
                return await self._locations.change(
                    message.location_id, lambda held: _tombstone(held, gone_location)
                )
            case ApplyBackupPolicy():
                fresh_policy = PolicyEntry(
                    policy_id=message.policy_id,
                    name=message.name,
                    generation=message.generation,
                    spec=message.spec,
                )
                newer_policy = _newer(message.generation)
                return await self._policies.change(
                    message.policy_id,
                    lambda held: fresh_policy if newer_policy(held) else None,
                )
            case DeleteBackupPolicy():
                gone_policy = PolicyEntry(
                    policy_id=message.policy_id, generation=message.generation, deleted=True
                )
                return await self._policies.change(
                    message.policy_id, lambda held: _tombstone(held, gone_policy)
                )
            case ClusterDeclared():
                declared = message
                fresh_cluster = ClusterEntry(
                    cluster_id=declared.cluster_id,
                    name=declared.name,
                    generation=declared.generation,
                    kubernetes_version=declared.kubernetes_version,
                    deletion_requested=declared.deletion_requested,
                )

                def newer_cluster(held: ClusterEntry | None) -> ClusterEntry | None:
                    if held is None:
                        return fresh_cluster
                    if held.deleted:
                        return None
                    if declared.generation > held.generation or (
                        declared.generation == held.generation
                        and declared.deletion_requested
                        and not held.deletion_requested
                    ):
                        return fresh_cluster
                    return None

                return await self._clusters.change(declared.cluster_id, newer_cluster)
            case ClusterDeleted():
                gone_cluster = ClusterEntry(cluster_id=message.cluster_id, deleted=True)

                def bury(held: ClusterEntry | None) -> ClusterEntry | None:
                    if held is not None and held.deleted:
                        return None
                    if held is not None:
                        return held.model_copy(update={"deleted": True})
                    return gone_cluster

                return await self._clusters.change(message.cluster_id, bury)
        raise TypeError(f"{type(message).__name__} is not a catalog message")

    # Reads: live entries only (tombstones hidden).

    async def location(self, location_id: str) -> LocationEntry | None:
        entry, _ = await self._locations.get(location_id)
        return None if entry is None or entry.deleted or entry.location is None else entry

    async def policy(self, policy_id: str) -> PolicyEntry | None:
        entry, _ = await self._policies.get(policy_id)
        return None if entry is None or entry.deleted or entry.spec is None else entry

    async def policies(self) -> list[PolicyEntry]:
        return [p for p in await self._policies.all() if not p.deleted and p.spec is not None]

    async def clusters(self) -> list[ClusterEntry]:
        """Known clusters that are neither deleted nor being deleted."""
        return [c for c in await self._clusters.all() if not (c.deleted or c.deletion_requested)]

    async def default_policy(self) -> PolicyEntry | None:
        return next((p for p in await self.policies() if p.name == "default"), None)
