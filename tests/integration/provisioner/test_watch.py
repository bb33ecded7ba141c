"""Watches: the client's watch stream against the emulated API server, and the provisioner
reporting a readiness change as soon as the watch tells it (with polling out of the way)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from libs.common.settings import Settings
from services.provisioner import names
from services.provisioner.kube import KubeClient, Retry, WatchExpired
from services.provisioner.service import ProvisionerService
from tests.support.kube_emulator import TenantApis
from tests.support.kube_harness import (
    ManagementCluster,
    phase,
    provisioner_settings,
    running_provisioner,
    wait_cluster,
)

FAST = Retry(attempts=3, base_delay=0.01, max_delay=0.05, timeout=2.0)


def configmap(ns: str, name: str, value: str, **labels: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "data": {"value": value},
    }


async def collect(
    client: KubeClient, version: str, count: int, selector: str = "team"
) -> list[tuple[str, str, str]]:
    seen: list[tuple[str, str, str]] = []

    async def run() -> None:
        async for kind, obj in client.watch(
            "/api/v1/configmaps", selector=selector, resource_version=version, timeout_seconds=10
        ):
            seen.append((kind, obj["metadata"]["name"], obj.get("data", {}).get("value", "")))
            if len(seen) == count:
                return

    await asyncio.wait_for(run(), 10.0)
    return seen


async def test_watch_streams_changes_from_a_version_and_expires_old_ones(
    management: ManagementCluster,
) -> None:
    client = await KubeClient.connect(management.kubeconfig, retry=FAST)
    try:
        await client.apply(
            "/api/v1/namespaces/w",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "w"}},
        )
        await client.apply("/api/v1/namespaces/w/configmaps/a", configmap("w", "a", "1", team="x"))
        items, version = await client.list_with_version("/api/v1/configmaps", selector="team")
        assert [i["metadata"]["name"] for i in items] == ["a"]

        watching = asyncio.create_task(collect(client, version, 4))
        await asyncio.sleep(0.2)
        await client.apply("/api/v1/namespaces/w/configmaps/a", configmap("w", "a", "2", team="x"))
        await client.apply(
            "/api/v1/namespaces/w/configmaps/n", configmap("w", "n", "1")
        )  # no label
        await client.apply("/api/v1/namespaces/w/configmaps/b", configmap("w", "b", "1", team="y"))
        await client.delete("/api/v1/namespaces/w/configmaps/a")
        obj = management.emulator.get("v1/configmaps", "w", "b")
        assert obj is not None
        obj["data"]["value"] = "3"
        management.emulator.touch("v1/configmaps", obj)
        seen = await watching
        assert seen == [
            ("MODIFIED", "a", "2"),
            ("ADDED", "b", "1"),
            ("DELETED", "a", "2"),
            ("MODIFIED", "b", "3"),
        ]

        # Resuming from the list's version replays what happened since, in order.
        replay = await collect(client, version, 2)
        assert [(kind, name) for kind, name, _ in replay] == [("MODIFIED", "a"), ("ADDED", "b")]

        # A version older than the history kept answers 410: the caller must list again.
        management.emulator.watch_history = 1
        for value in range(3):
            await client.apply(
                "/api/v1/namespaces/w/configmaps/b", configmap("w", "b", str(value), team="y")
            )
        with pytest.raises(WatchExpired):
            await collect(client, version, 1)
    finally:
        await client.close()


async def test_a_ready_cluster_turning_unavailable_is_reported_through_the_watch(
    api: httpx.AsyncClient,
    settings: Settings,
    management: ManagementCluster,
    tenants: TenantApis,
    nats_url: str,
) -> None:
    # Once Ready, polling every 60 s and no resync: only a watch event makes it look again.
    configured = provisioner_settings(settings, management.kubeconfig, poll_interval_seconds=0.2)
    async with running_provisioner(configured, nats_url) as service:
        created = (await api.post("/api/v1/clusters", json={"name": "watched", "spec": {}})).json()
        await wait_cluster(api, created["id"], phase("Ready"))
        assert service.watch.events > 0
        service.poll_interval = 60.0
        management.controller.paused = True  # as kwok would not: nothing re-marks it ready

        namespace = names.namespace_for("watched")
        deployment: dict[str, Any] | None = management.emulator.get(
            "apps/v1/deployments", namespace, names.CONTROL_PLANE_DEPLOYMENT
        )
        assert deployment is not None
        deployment["status"]["readyReplicas"] = 0
        deployment["status"]["availableReplicas"] = 0
        management.emulator.touch("apps/v1/deployments", deployment)
        degraded = await wait_cluster(api, created["id"], phase("Degraded"), timeout=10.0)
        assert degraded["status"]["phase"] == "Degraded"

        replicas = deployment["spec"]["replicas"]
        deployment["status"]["readyReplicas"] = replicas
        deployment["status"]["availableReplicas"] = replicas
        management.emulator.touch("apps/v1/deployments", deployment)
        await wait_cluster(api, created["id"], phase("Ready"), timeout=10.0)


async def test_the_provisioner_survives_a_watch_failing_and_falls_back_to_polling(
    api: httpx.AsyncClient,
    provisioner: ProvisionerService,
    management: ManagementCluster,
    tenants: TenantApis,
) -> None:
    # The cluster-wide collections are only read by the watches: make every such call fail.
    management.emulator.fail(
        "GET",
        r"^/(api/v1/(namespaces|secrets|configmaps|services)"
        r"|apis/apps/v1/(deployments|statefulsets)|apis/policy/v1/poddisruptionbudgets)$",
        times=None,
    )
    created = (await api.post("/api/v1/clusters", json={"name": "nowatch", "spec": {}})).json()
    await wait_cluster(api, created["id"], phase("Ready"))


async def eventually(check: Callable[[], bool], timeout: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_objects_deleted_or_changed_behind_its_back_come_back_at_once(
    api: httpx.AsyncClient,
    settings: Settings,
    management: ManagementCluster,
    tenants: TenantApis,
    nats_url: str,
) -> None:
    # No resync during the test (an hour's interval; the first one 10 s after the start) and
    # no polling of a Ready cluster: only watch events can bring the objects back this soon.
    configured = provisioner_settings(settings, management.kubeconfig)
    async with running_provisioner(configured, nats_url):
        created = (await api.post("/api/v1/clusters", json={"name": "behind", "spec": {}})).json()
        await wait_cluster(api, created["id"], phase("Ready"))
        namespace = names.namespace_for("behind")
        emulator = management.emulator

        # Nest's own writes wake passes that change nothing: no write follows, no loop.
        await asyncio.sleep(0.5)
        writes = {key: n for key, n in emulator.counts.items() if not key.startswith("GET")}
        await asyncio.sleep(0.5)
        assert {k: n for k, n in emulator.counts.items() if not k.startswith("GET")} == writes

        for resource, name in (
            ("v1/services", names.ETCD_HEADLESS_SERVICE),  # etcd's DNS
            ("v1/configmaps", names.EGRESS_SELECTOR_CONFIGMAP),
            ("policy/v1/poddisruptionbudgets", names.ETCD_STATEFULSET),
            ("v1/secrets", names.SECRET_SCHEDULER_KUBECONFIG),
        ):
            emulator.remove(resource, namespace, name)
            back = await eventually(
                lambda r=resource, n=name: emulator.get(r, namespace, n) is not None, 1.0
            )
            assert back, f"{resource}/{name} was not re-created"

        # Someone else's edit of an object Nest does not read back is reverted as soon.
        async with httpx.AsyncClient(base_url=management.url) as kube:
            for path, patch in (
                (
                    f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets/etcd",
                    {"spec": {"maxUnavailable": 0}},
                ),
                (
                    f"/api/v1/namespaces/{namespace}/services/etcd",
                    {"spec": {"publishNotReadyAddresses": False}},
                ),
            ):
                response = await kube.patch(
                    path,
                    params={"fieldManager": "kubectl-edit"},
                    json=patch,
                    headers={"Content-Type": "application/merge-patch+json"},
                )
                assert response.status_code == 200, response.text
        pdb = emulator.get("policy/v1/poddisruptionbudgets", namespace, "etcd")
        service = emulator.get("v1/services", namespace, "etcd")
        assert pdb is not None and service is not None
        assert await eventually(
            lambda: (
                emulator.get("policy/v1/poddisruptionbudgets", namespace, "etcd")["spec"][  # type: ignore[index]
                    "maxUnavailable"
                ]
                == 1
            ),
            1.0,
        )
        assert await eventually(
            lambda: (
                emulator.get("v1/services", namespace, "etcd")["spec"][  # type: ignore[index]
                    "publishNotReadyAddresses"
                ]
                is True
            ),
            1.0,
        )
        await wait_cluster(api, created["id"], phase("Ready"))
