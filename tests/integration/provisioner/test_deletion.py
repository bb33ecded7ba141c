"""Deleting a cluster whose namespace takes its time: pods terminating slowly, another
controller's finalizer, or someone else deleting the namespace at the same moment. The
deletion is under way in each case; the cluster goes as soon as its namespace does, and the
delete intent never ends in the dead-letter stream."""

from __future__ import annotations

import asyncio

import httpx

from libs.common.bus import Bus
from libs.common.contract import DLQ_STREAM
from libs.common.settings import Settings
from services.provisioner import names
from tests.support.kube_emulator import TenantApis
from tests.support.kube_harness import (
    ManagementCluster,
    phase,
    provisioner_settings,
    running_provisioner,
    wait_cluster,
)

from .test_provisioner import create


async def dead_letters(bus: Bus) -> list[object]:
    sub = await bus.nc.jetstream().pull_subscribe("nest.dlq.provisioner", stream=DLQ_STREAM)
    try:
        return list(await sub.fetch(100, timeout=0.5))
    except Exception:
        return []
    finally:
        await sub.unsubscribe()


def gone(cluster: dict[str, object]) -> bool:
    return cluster.get("status") == 404


async def test_a_namespace_terminating_past_the_delete_timeout_is_waited_for(
    api: httpx.AsyncClient,
    bus: Bus,
    settings: Settings,
    nats_url: str,
    management: ManagementCluster,
    tenants: TenantApis,
) -> None:
    # Few deliveries and a short wait per delivery: a delete that treated a namespace still
    # terminating as a failure would reach the dead-letter stream within a second.
    configured = provisioner_settings(settings, management.kubeconfig, max_deliver=2)
    async with running_provisioner(configured, nats_url, delete_timeout_seconds=0.3):
        created = await create(api, "slowgone")
        await wait_cluster(api, created["id"], phase("Ready"))
        namespace = names.namespace_for("slowgone")
        management.emulator.namespace_finalize_delay = 3.0  # pods with a grace period
        assert (await api.delete(f"/api/v1/clusters/{created['id']}")).status_code in (200, 202)
        await asyncio.sleep(1.5)
        terminating = management.emulator.get("v1/namespaces", None, namespace)
        assert terminating is not None and terminating["metadata"]["deletionTimestamp"]
        await wait_cluster(api, created["id"], phase("Deleting"), timeout=1.0)
        # The namespace goes 3 s after the delete; the cluster with it (long before the first
        # resync, 10 s after the start, could finish the deletion instead).
        await wait_cluster(api, created["id"], gone, timeout=3.0)
        assert management.emulator.get("v1/namespaces", None, namespace) is None
    assert await dead_letters(bus) == []


async def test_a_namespace_held_by_a_finalizer_is_waited_for_until_it_goes(
    api: httpx.AsyncClient,
    bus: Bus,
    settings: Settings,
    nats_url: str,
    management: ManagementCluster,
    tenants: TenantApis,
) -> None:
    configured = provisioner_settings(settings, management.kubeconfig, max_deliver=2)
    async with running_provisioner(configured, nats_url, delete_timeout_seconds=0.3):
        created = await create(api, "held")
        await wait_cluster(api, created["id"], phase("Ready"))
        namespace = names.namespace_for("held")
        path = f"/api/v1/namespaces/{namespace}"
        async with httpx.AsyncClient(base_url=management.url) as kube:
            # Another controller keeps the namespace until it has cleaned up after itself.
            response = await kube.patch(
                path,
                json={"metadata": {"finalizers": ["example.com/cleanup"]}},
                headers={"Content-Type": "application/merge-patch+json"},
            )
            assert response.status_code == 200, response.text
            await api.delete(f"/api/v1/clusters/{created['id']}")
            # Longer than two deliveries of the delete intent (0.3 s each and a 0.5 s pause).
            await asyncio.sleep(2.0)
            held = management.emulator.get("v1/namespaces", None, namespace)
            assert held is not None and held["status"]["phase"] == "Terminating"
            await wait_cluster(api, created["id"], phase("Deleting"), timeout=1.0)
            response = await kube.patch(
                path,
                json={"metadata": {"finalizers": None}},
                headers={"Content-Type": "application/merge-patch+json"},
            )
            assert response.status_code == 200, response.text
        # No resync runs in this test (its interval is an hour): the provisioner notices itself.
        await wait_cluster(api, created["id"], gone, timeout=3.0)
    assert await dead_letters(bus) == []


async def test_a_conflict_because_someone_else_deleted_the_namespace_is_waited_for(
    api: httpx.AsyncClient,
    bus: Bus,
    settings: Settings,
    nats_url: str,
    management: ManagementCluster,
    tenants: TenantApis,
) -> None:
    configured = provisioner_settings(settings, management.kubeconfig, max_deliver=2)
    async with running_provisioner(configured, nats_url):
        created = await create(api, "raced")
        await wait_cluster(api, created["id"], phase("Ready"))
        namespace = names.namespace_for("raced")
        path = f"/api/v1/namespaces/{namespace}"
        management.emulator.namespace_finalize_delay = 2.0
        # The provisioner's DELETE is held back while an administrator deletes the namespace:
        # the API server answers the provisioner's 409 Conflict (the namespace is terminating).
        held = management.emulator.fail("DELETE", f"^{path}$", status=None, delay=0.5)
        await api.delete(f"/api/v1/clusters/{created['id']}")
        for _ in range(200):
            if held.hits:
                break
            await asyncio.sleep(0.01)
        assert held.hits == 1
        async with httpx.AsyncClient(base_url=management.url) as kube:
            assert (await kube.delete(path)).status_code == 200
        await wait_cluster(api, created["id"], gone, timeout=4.0)
    assert await dead_letters(bus) == []
