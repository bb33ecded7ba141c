"""Watches of every kind of object the provisioner owns in the management cluster.

One watch per kind for the whole management cluster (not one per cluster), each on the objects
labelled `nest.io/cluster-id` (a server-side label selector, so the Secrets watch sees Nest's
Secrets only): Namespaces, Secrets, ConfigMaps, Services, StatefulSets, Deployments and
PodDisruptionBudgets. What an event means for the cluster it is labelled for:

- a workload's generation, replica count or status changed (a rollout finishing, a load
  balancer getting its address, a workload turning unavailable): the cluster is woken
  (`on_change(cluster_id, None)`), so the provisioner passes it at once instead of at the next
  poll;
- an object was deleted, or its content (labels, annotations, spec, data; not its status)
  changed: the cluster is woken with an `ObjectChange` naming the object and the
  resourceVersion of the change. The provisioner passes the cluster with that object's "already
  applied" record dropped, unless the change is its own write (same resourceVersion), so an
  object deleted or edited behind its back is re-applied within a second, not at the resync.

Nest's own applies that change nothing change neither status nor content, so they wake
nothing (no feedback loop); its own changes wake one pass that finds nothing to do.

A watch that ends (server timeout) resumes from the last resourceVersion seen; one that is
too old (410) lists again first, and objects that changed while nobody watched are woken
then. Any failure is retried with a growing pause; the provisioner's own polling and the
resync remain the fallback, so a broken watch costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.provisioner import names
from services.provisioner.kube import KubeClient, KubeError, KubeNotConfigured, WatchExpired

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchedKind:
    """One kind of object the provisioner owns, addressed as its REST collection."""

    prefix: str
    """`/api/v1` or `/apis/<group>/<version>`."""
    plural: str
    namespaced: bool = True

    @property
    def collection(self) -> str:
        """The collection across every namespace: what the watch follows."""
        return f"{self.prefix}/{self.plural}"

    def path(self, namespace: str, name: str) -> str:
        """The REST path of one object, as `manifests.resource_path` spells it."""
        if not self.namespaced:
            return f"{self.prefix}/{self.plural}/{name}"
        return f"{self.prefix}/namespaces/{namespace}/{self.plural}/{name}"


WATCHED_KINDS: tuple[WatchedKind, ...] = (
    WatchedKind("/api/v1", "namespaces", namespaced=False),
    WatchedKind("/api/v1", "secrets"),
    WatchedKind("/api/v1", "configmaps"),
    WatchedKind("/api/v1", "services"),
    WatchedKind("/apis/apps/v1", "statefulsets"),
    WatchedKind("/apis/apps/v1", "deployments"),
    WatchedKind("/apis/policy/v1", "poddisruptionbudgets"),
)
WATCHED_PATHS: tuple[str, ...] = tuple(kind.collection for kind in WATCHED_KINDS)
ClientSource = Callable[[], Awaitable[KubeClient]]

_VOLATILE_METADATA = frozenset(
    {"resourceVersion", "managedFields", "generation", "uid", "creationTimestamp", "selfLink"}
)
"""Metadata the API server maintains itself; everything else of an object is its content."""


@dataclass(frozen=True)
class ObjectChange:
    """An object of a cluster that was deleted or whose content changed."""

    path: str
    """Its REST path."""
    version: str | None
    """The resourceVersion of the change; None when the object was deleted."""


@dataclass(frozen=True)
class _Seen:
    collection: str
    readiness: bytes
    content: bytes
    cluster_id: str


def _hash(data: object) -> bytes:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).digest()


def _readiness(obj: dict[str, Any]) -> bytes:
    return _hash(
        {
            "generation": (obj.get("metadata") or {}).get("generation"),
            "status": obj.get("status"),
            "spec": (obj.get("spec") or {}).get("replicas"),
        }
    )


def _content(obj: dict[str, Any]) -> bytes:
    metadata = obj.get("metadata") or {}
    return _hash(
        {
            "metadata": {k: v for k, v in metadata.items() if k not in _VOLATILE_METADATA},
            **{k: v for k, v in obj.items() if k not in ("metadata", "status")},
        }
    )


def _version(obj: dict[str, Any]) -> str | None:
    version = (obj.get("metadata") or {}).get("resourceVersion")
    return str(version) if version else None


class ClusterObjectsWatch:
    """Follows the watched kinds and calls `on_change(cluster_id, change)` for what changed:
    `change` names a deleted or edited object, None when only readiness moved."""

    def __init__(
        self,
        client: ClientSource,
        on_change: Callable[[str, ObjectChange | None], None],
        *,
        timeout_seconds: int = 300,
        retry_delay: float = 1.0,
        unconfigured_delay: float = 30.0,
    ) -> None:
        self._client = client
        self._on_change = on_change
        self.timeout_seconds = timeout_seconds
        self.retry_delay = retry_delay
        self.unconfigured_delay = unconfigured_delay
        self._seen: dict[str, _Seen] = {}
        """Object path -> digests of what was last seen of it, and its cluster."""
        self.events = 0
        """Watch events received (for tests and diagnostics)."""

    async def run(self) -> None:
        await asyncio.gather(*(self._follow(kind) for kind in WATCHED_KINDS))

    async def _follow(self, kind: WatchedKind) -> None:
        version = ""
        listed_once = False
        failures = 0
        while True:
            try:
                client = await self._client()
                if not version:
                    items, version = await client.list_with_version(
                        kind.collection, selector=names.CLUSTER_ID_LABEL
                    )
                    self._relisted(kind, items, wake=listed_once)
                    listed_once = True
                async for event, obj in client.watch(
                    kind.collection,
                    selector=names.CLUSTER_ID_LABEL,
                    resource_version=version,
                    timeout_seconds=self.timeout_seconds,
                ):
                    failures = 0
                    version = _version(obj) or version
                    if event != "BOOKMARK":
                        self.events += 1
                        self._observe(kind, obj, deleted=event == "DELETED")
            except asyncio.CancelledError:
                raise
            except WatchExpired:
                version = ""
            except KubeNotConfigured:
                await asyncio.sleep(self.unconfigured_delay)
            except (KubeError, ValueError) as exc:
                failures += 1
                delay = min(self.retry_delay * 2 ** min(failures - 1, 5), 30.0)
                log.debug("watch of %s failed (%s); again in %.1f s", kind.collection, exc, delay)
                await asyncio.sleep(delay)

    @staticmethod
    def _identify(kind: WatchedKind, obj: dict[str, Any]) -> tuple[str, str] | None:
        """(path, cluster id) of a labelled object, None for anything else."""
        metadata = obj.get("metadata") or {}
        cluster_id = (metadata.get("labels") or {}).get(names.CLUSTER_ID_LABEL)
        if not metadata.get("name") or not cluster_id:
            return None
        return kind.path(str(metadata.get("namespace", "")), str(metadata["name"])), str(cluster_id)

    def _observe(self, kind: WatchedKind, obj: dict[str, Any], *, deleted: bool) -> None:
        identified = self._identify(kind, obj)
        if identified is None:
            return
        path, cluster_id = identified
        if deleted:
            self._seen.pop(path, None)
            self._on_change(cluster_id, ObjectChange(path, None))
            return
        seen = _Seen(kind.collection, _readiness(obj), _content(obj), cluster_id)
        before = self._seen.get(path)
        if before == seen:
            return
        self._seen[path] = seen
        if before is None or before.content != seen.content:
            self._on_change(cluster_id, ObjectChange(path, _version(obj)))
        else:
            self._on_change(cluster_id, None)

    def _relisted(self, kind: WatchedKind, items: Sequence[dict[str, Any]], *, wake: bool) -> None:
        """Take a fresh list as the truth; after the first, wake what changed meanwhile."""
        current: dict[str, tuple[_Seen, str | None]] = {}
        for obj in items:
            identified = self._identify(kind, obj)
            if identified is not None:
                path, cluster_id = identified
                seen = _Seen(kind.collection, _readiness(obj), _content(obj), cluster_id)
                current[path] = (seen, _version(obj))
        changes: list[tuple[str, ObjectChange | None]] = []
        for path, (seen, version) in current.items():
            before = self._seen.get(path)
            if before != seen:
                self._seen[path] = seen
                content_changed = before is None or before.content != seen.content
                changes.append(
                    (seen.cluster_id, ObjectChange(path, version) if content_changed else None)
                )
        gone = [
            path
            for path, seen in self._seen.items()
            if seen.collection == kind.collection and path not in current
        ]
        for path in gone:
            changes.append((self._seen.pop(path).cluster_id, ObjectChange(path, None)))
        if wake:
            for cluster_id, change in changes:
                self._on_change(cluster_id, change)
