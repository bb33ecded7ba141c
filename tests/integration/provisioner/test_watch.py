"""Watches: the client's watch stream against the real API server, and the provisioner reporting
a readiness change, or healing an object deleted or edited behind its back, as soon as its
watches tell it (with polling and the resync out of the way)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from libs.common.settings import Settings
from services.provisioner import manifests, names
from services.provisioner.kube import KubeClient, Retry, WatchExpired
from tests.support.kube_harness import (
    REAL,
    SMALL,
    Management,
    condition,
    phase,
    provisioner_settings,
    running_provisioner,
    unique,
    wait_cluster,
)

from .test_faults import (
    another_replica_holds_the_resync,
    compact_management_etcd,
    create,
    management_side_ready,
    own,
)

FAST = Retry(attempts=3, base_delay=0.01, max_delay=0.05, timeout=2.0)


@pytest.fixture
async def owned_namespaces(management: Management) -> AsyncIterator[list[str]]:
    """Namespaces this test made, deleted at its end. Tests request it first, so it is torn
    down after the provisioner stopped: nothing re-creates them."""
    made: list[str] = []
    yield made
    for namespace in made:
        await management.api.delete(f"/api/v1/namespaces/{namespace}")


def configmap(ns: str, name: str, value: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "data": {"value": value},
    }


async def collect(
    client: KubeClient, version: str, count: int, selector: str
) -> list[tuple[str, str, str]]:
    """The first `count` events (bookmarks aside) of a cluster-wide ConfigMap watch."""
    seen: list[tuple[str, str, str]] = []

    async def run() -> None:
        async for kind, obj in client.watch(
            "/api/v1/configmaps", selector=selector, resource_version=version, timeout_seconds=10
        ):
            if kind == "BOOKMARK":  # the real server sends them (allowWatchBookmarks)
                continue
            seen.append((kind, obj["metadata"]["name"], obj.get("data", {}).get("value", "")))
            if len(seen) == count:
                return

    await asyncio.wait_for(run(), 10.0)
    return seen


async def test_watch_streams_changes_from_a_version_and_expires_old_ones(
    management: Management,
) -> None:
    client = await KubeClient.connect(management.kubeconfig, retry=FAST)
    admin = await KubeClient.connect(management.cluster.kubeconfig, retry=FAST)
    ns = unique("w")
    # A label key of this test's own: the cluster is shared, the watch is cluster-wide.
    team = f"test.nest.io/team-{uuid.uuid4().hex[:6]}"
    try:
        await client.apply(
            f"/api/v1/namespaces/{ns}",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        )
        path = f"/api/v1/namespaces/{ns}/configmaps"
        await client.apply(f"{path}/a", configmap(ns, "a", "1", **{team: "x"}))
        items, version = await client.list_with_version("/api/v1/configmaps", selector=team)
        assert [i["metadata"]["name"] for i in items] == ["a"]

        watching = asyncio.create_task(collect(client, version, 4, team))
        await client.apply(f"{path}/a", configmap(ns, "a", "2", **{team: "x"}))
        await client.apply(f"{path}/n", configmap(ns, "n", "1"))  # no label
        await client.apply(f"{path}/b", configmap(ns, "b", "1", **{team: "y"}))
        await client.delete(f"{path}/a")
        # Someone else's change is streamed as well.
        await management.api.merge_patch(f"{path}/b", {"data": {"value": "3"}})
        seen = await watching
        assert seen == [
            ("MODIFIED", "a", "2"),
            ("ADDED", "b", "1"),
            ("DELETED", "a", "2"),
            ("MODIFIED", "b", "3"),
        ]

        # A version older than the store's history answers 410 Expired: the caller must list
        # again. The store's history ends where etcd was compacted, and only kinds the API
        # server does not cache are watched from etcd itself: Events are such a kind (the
        # ConfigMaps above are served from the API server's watch cache, which keeps every
        # change of the last 75 s at least, whatever etcd compacted).
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "test-", "namespace": ns},
            "involvedObject": {"kind": "ConfigMap", "name": "b", "namespace": ns},
            "reason": "Test",
            "message": "before the compaction",
            "type": "Normal",
        }
        await admin.request("POST", f"/api/v1/namespaces/{ns}/events", body=event)
        _, old = await admin.list_with_version(f"/api/v1/namespaces/{ns}/events")
        # Two writes after it: etcd still serves a watch from the compacted revision itself.
        for _ in range(2):
            await admin.request("POST", f"/api/v1/namespaces/{ns}/events", body=event)
        assert await compact_management_etcd(management) > int(old) + 1

        # Resuming from the ConfigMap list's version still replays what happened since, in
        # order (from the watch cache).
        replay = await collect(client, version, 2, team)
        assert [(kind, name) for kind, name, _ in replay] == [("MODIFIED", "a"), ("ADDED", "b")]

        with pytest.raises(WatchExpired, match="too old"):
            async for _ in admin.watch(
                f"/api/v1/namespaces/{ns}/events", resource_version=old, timeout_seconds=10
            ):
                pass
    finally:
        await management.api.delete(f"/api/v1/namespaces/{ns}")
        await client.close()
        await admin.close()


async def test_a_ready_cluster_turning_unavailable_is_reported_through_the_watch(
    owned_namespaces: list[str],
    api: httpx.AsyncClient,
    settings: Settings,
    management: Management,
    nats_url: str,
) -> None:
    # Once Ready, nothing polls the cluster, and another replica holds the resync lease: only
    # a watch event makes this provisioner look again.
    configured = provisioner_settings(settings, management.kubeconfig, poll_interval_seconds=0.2)
    name = unique("watched")
    namespace = own(owned_namespaces, name)
    async with running_provisioner(configured, nats_url) as service:
        await another_replica_holds_the_resync(nats_url)
        created = await create(api, name, labels=REAL, spec=SMALL)
        await wait_cluster(api, created["id"], phase("Ready"), timeout=120.0)
        assert service.watch.events > 0
        # A cluster that is not Ready is followed, but it would wait an hour between passes.
        service.poll_interval = 3600.0

        # Its control plane goes (the pod deleted) and cannot come back (held Pending).
        await management.hold(namespace)
        selector = f"{names.COMPONENT_LABEL}={manifests.COMPONENT_CONTROL_PLANE}"
        pods = await management.list(f"/api/v1/namespaces/{namespace}/pods", labelSelector=selector)
        assert pods
        for pod in pods:
            await management.api.delete(
                f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}"
            )
        degraded = await wait_cluster(api, created["id"], phase("Degraded"))
        assert condition(degraded, "ControlPlaneReady")["status"] == "False"

        await management.hold(namespace, held=False)
        await wait_cluster(api, created["id"], phase("Ready"), timeout=120.0)


# The cluster-wide collections, which only the watches read (each list or watch has a query).
WATCH_PATHS = (
    r"^/(api/v1/(namespaces|secrets|configmaps|services)"
    r"|apis/apps/v1/(deployments|statefulsets)|apis/policy/v1/poddisruptionbudgets)(\?|$)"
)


async def test_the_provisioner_survives_a_watch_failing_and_falls_back_to_polling(
    owned_namespaces: list[str],
    api: httpx.AsyncClient,
    settings: Settings,
    management: Management,
    nats_url: str,
) -> None:
    # Every list and watch of the watches fails from the start; the resync is another
    # replica's: only the provisioner's own polling can see the workloads become ready.
    fault = management.proxy.fail("GET", WATCH_PATHS, status=503, times=None)
    configured = provisioner_settings(settings, management.kubeconfig)
    name = unique("nowatch")
    own(owned_namespaces, name)
    async with running_provisioner(configured, nats_url) as service:
        await another_replica_holds_the_resync(nats_url)
        created = await create(api, name, spec=SMALL)
        cluster = await wait_cluster(api, created["id"], management_side_ready)
        assert service.watch.events == 0
        assert fault.hits > 0
    # Fake pods: no tenant API answers, so the add-ons (and Ready) wait; everything the
    # management cluster shows is there.
    assert cluster["status"]["phase"] == "Provisioning"
    assert condition(cluster, "AddonsReady")["reason"] == "TenantAPIUnavailable"


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def writes(counts: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    return {key: n for key, n in counts.items() if key[0] != "GET"}


async def test_objects_deleted_or_changed_behind_its_back_come_back_at_once(
    owned_namespaces: list[str],
    api: httpx.AsyncClient,
    settings: Settings,
    management: Management,
    nats_url: str,
) -> None:
    # Another replica holds the resync lease and nothing polls a Ready cluster: only watch
    # events can bring the objects back.
    configured = provisioner_settings(settings, management.kubeconfig)
    name = unique("behind")
    namespace = own(owned_namespaces, name)
    async with running_provisioner(configured, nats_url):
        await another_replica_holds_the_resync(nats_url)
        created = await create(api, name, labels=REAL, spec=SMALL)
        await wait_cluster(api, created["id"], phase("Ready"), timeout=120.0)

        # Nest's own writes wake passes that change nothing: no write follows, no loop.
        await asyncio.sleep(0.5)
        before = writes(management.proxy.requests)
        await asyncio.sleep(1.0)
        assert writes(management.proxy.requests) == before

        for path in (
            f"/api/v1/namespaces/{namespace}/services/{names.ETCD_HEADLESS_SERVICE}",  # etcd's DNS
            f"/api/v1/namespaces/{namespace}/configmaps/{names.EGRESS_SELECTOR_CONFIGMAP}",
            f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets/{names.ETCD_STATEFULSET}",
            f"/api/v1/namespaces/{namespace}/secrets/{names.SECRET_SCHEDULER_KUBECONFIG}",
        ):
            old = await management.get(path)
            assert old is not None, path
            assert await management.api.delete(path)

            async def recreated(path: str = path, uid: str = old["metadata"]["uid"]) -> bool:
                found = await management.get(path)
                return found is not None and found["metadata"]["uid"] != uid

            assert await eventually(recreated), f"{path} was not re-created"

        # Someone else's edit of an object Nest does not read back is reverted as soon.
        pdb = f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets/etcd"
        service = f"/api/v1/namespaces/{namespace}/services/etcd"
        for path, patch in (
            (pdb, {"spec": {"maxUnavailable": 0}}),
            (service, {"spec": {"publishNotReadyAddresses": False}}),
        ):
            await management.api.request(
                "PATCH",
                path,
                body=patch,
                params={"fieldManager": "kubectl-edit"},
                content_type="application/merge-patch+json",
            )

        async def reverted() -> bool:
            found_pdb, found_service = await management.get(pdb), await management.get(service)
            return (
                found_pdb is not None
                and found_pdb["spec"]["maxUnavailable"] == 1
                and found_service is not None
                and found_service["spec"]["publishNotReadyAddresses"] is True
            )

        assert await eventually(reverted), "the edits were not reverted"
        await wait_cluster(api, created["id"], phase("Ready"))
