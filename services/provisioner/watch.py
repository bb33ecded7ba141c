"""Watches of what decides a cluster's readiness: Deployments, StatefulSets and Services.

Three watches for the whole management cluster (not three per cluster), each on the objects
labelled `nest.io/cluster-id`. When an object's generation or status changes, or it is
deleted, the cluster it is labelled for is woken (`on_change(cluster_id)`): the provisioner
passes it at once, so a rollout finishing, a load balancer getting its address or a workload
turning unavailable is reported as soon as the API server tells us, not at the next poll.
Nest's own applies that change nothing in a spec bump neither the generation nor the status,
so they do not wake anything (no feedback loop).

A watch that ends (server timeout) resumes from the last resourceVersion seen; one that is
too old (410) lists again first, and objects that changed while nobody watched are woken
then. Any failure is retried with a growing pause; the provisioner's own polling remains the
fallback, so a broken watch costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from services.provisioner import names
from services.provisioner.kube import KubeClient, KubeError, KubeNotConfigured, WatchExpired

log = logging.getLogger(__name__)

WATCHED_PATHS = ("/apis/apps/v1/deployments", "/apis/apps/v1/statefulsets", "/api/v1/services")
ClientSource = Callable[[], Awaitable[KubeClient]]


def _digest(obj: dict[str, Any]) -> str:
    seen = {
        "generation": (obj.get("metadata") or {}).get("generation"),
        "status": obj.get("status"),
        "spec": (obj.get("spec") or {}).get("replicas"),
    }
    return hashlib.sha256(json.dumps(seen, sort_keys=True, default=str).encode()).hexdigest()


class ReadinessWatch:
    """Follows the watched kinds and calls `on_change` with the cluster id of what changed."""

    def __init__(
        self,
        client: ClientSource,
        on_change: Callable[[str], None],
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
        self._seen: dict[tuple[str, str, str], tuple[str, str]] = {}
        """(path, namespace, name) -> (digest, cluster id)."""
        self.events = 0
        """Watch events received (for tests and diagnostics)."""

    async def run(self) -> None:
        await asyncio.gather(*(self._follow(path) for path in WATCHED_PATHS))

    async def _follow(self, path: str) -> None:
        version = ""
        listed_once = False
        failures = 0
        while True:
            try:
                client = await self._client()
                if not version:
                    items, version = await client.list_with_version(
                        path, selector=names.CLUSTER_ID_LABEL
                    )
                    self._relisted(path, items, wake=listed_once)
                    listed_once = True
                async for kind, obj in client.watch(
                    path,
                    selector=names.CLUSTER_ID_LABEL,
                    resource_version=version,
                    timeout_seconds=self.timeout_seconds,
                ):
                    failures = 0
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if kind != "BOOKMARK":
                        self.events += 1
                        self._observe(path, obj, deleted=kind == "DELETED")
            except asyncio.CancelledError:
                raise
            except WatchExpired:
                version = ""
            except KubeNotConfigured:
                await asyncio.sleep(self.unconfigured_delay)
            except (KubeError, ValueError) as exc:
                failures += 1
                delay = min(self.retry_delay * 2 ** min(failures - 1, 5), 30.0)
                log.debug("watch of %s failed (%s); again in %.1f s", path, exc, delay)
                await asyncio.sleep(delay)

    def _key(self, path: str, obj: dict[str, Any]) -> tuple[str, str, str] | None:
        metadata = obj.get("metadata") or {}
        if not metadata.get("name"):
            return None
        return path, str(metadata.get("namespace", "")), str(metadata["name"])

    @staticmethod
    def _cluster(obj: dict[str, Any]) -> str | None:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        cluster_id = labels.get(names.CLUSTER_ID_LABEL)
        return str(cluster_id) if cluster_id else None

    def _observe(self, path: str, obj: dict[str, Any], *, deleted: bool) -> None:
        key = self._key(path, obj)
        cluster_id = self._cluster(obj)
        if key is None or cluster_id is None:
            return
        if deleted:
            self._seen.pop(key, None)
            self._on_change(cluster_id)
            return
        digest = _digest(obj)
        if self._seen.get(key) != (digest, cluster_id):
            self._seen[key] = (digest, cluster_id)
            self._on_change(cluster_id)

    def _relisted(self, path: str, items: Sequence[dict[str, Any]], *, wake: bool) -> None:
        """Take a fresh list as the truth; after the first, wake what changed meanwhile."""
        current: dict[tuple[str, str, str], tuple[str, str]] = {}
        for obj in items:
            key, cluster_id = self._key(path, obj), self._cluster(obj)
            if key is not None and cluster_id is not None:
                current[key] = (_digest(obj), cluster_id)
        woken: set[str] = set()
        for key, seen in current.items():
            if self._seen.get(key) != seen:
                self._seen[key] = seen
                woken.add(seen[1])
        for key in [k for k in self._seen if k[0] == path and k not in current]:
            woken.add(self._seen.pop(key)[1])
        if wake:
            for cluster_id in woken:
                self._on_change(cluster_id)
