"""The provisioner under faults: a failing or stalling management API, a tenant API that is down,
objects deleted behind its back, leftovers and orphans, and a SIGKILL mid-reconcile."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import httpx

from libs.common.bus import Bus
from libs.common.kv import open_leases
from libs.common.settings import Settings
from services.provisioner import names
from services.provisioner.service import ProvisionerService
from tests.support.kube_emulator import TenantApis, tenant_hostname
from tests.support.kube_harness import (
    ManagementCluster,
    condition,
    phase,
    provisioner_process,
    provisioner_settings,
    reset_buckets,
    running_provisioner,
    silent_endpoint,
    wait_cluster,
)
from tests.support.processes import kill_group

from .test_provisioner import cluster_objects, create


def management_down(cluster: dict[str, object]) -> bool:
    status = cluster.get("status")
    if not isinstance(status, dict):
        return False
    return any(
        c["type"] == "ManagementClusterAvailable" and c["status"] == "False"
        for c in status.get("conditions", [])
    )


class TestManagementApiFaults:
    async def test_500s_are_retried_explained_and_recovered_from(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        fault = management.emulator.fail("PATCH", "/deployments/", status=500, times=None)
        created = await create(api, "flaky")
        cluster = await wait_cluster(api, created["id"], management_down)
        available = condition(cluster, "ManagementClusterAvailable")
        assert available["reason"] == "Unavailable"
        assert "500" in available["message"]
        assert cluster["status"]["phase"] == "Provisioning"
        assert fault.hits >= 3  # every pass retried the request
        fault.times = 0
        await wait_cluster(api, created["id"], phase("Ready"))

    async def test_a_stalling_api_times_out_and_recovers(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        fault = management.emulator.fail(None, "/statefulsets/", status=None, delay=2.5, times=None)
        created = await create(api, "slow")
        cluster = await wait_cluster(api, created["id"], management_down, timeout=30)
        assert "Timeout" in condition(cluster, "ManagementClusterAvailable")["message"]
        fault.times = 0
        await wait_cluster(api, created["id"], phase("Ready"), timeout=30)

    async def test_a_tenant_api_that_is_down_holds_the_addons(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        namespace = names.namespace_for("mute")
        tenants.down.add(namespace)
        created = await create(api, "mute")
        cluster = await wait_cluster(
            api,
            created["id"],
            lambda c: any(
                x["type"] == "AddonsReady" and x["reason"] == "TenantAPIUnavailable"
                for x in c["status"]["conditions"]
            ),
        )
        assert condition(cluster, "ControlPlaneReady")["status"] == "True"
        assert cluster["status"]["phase"] == "Provisioning"
        tenants.down.discard(namespace)
        await wait_cluster(api, created["id"], phase("Ready"))


class TestSilentTenant:
    async def test_a_tenant_that_never_answers_tls_costs_its_own_cluster_only(
        self,
        api: httpx.AsyncClient,
        settings: Settings,
        nats_url: str,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        # One pass at a time: a pass stalled on a wedged tenant would hold up everyone else.
        configured = provisioner_settings(
            settings,
            management.kubeconfig,
            reconcile_concurrency=1,
            tenant_connect_timeout_seconds=1.0,
        )
        silent_host = tenant_hostname(names.namespace_for("wedged"))
        async with (
            silent_endpoint(silent_host) as silent,
            running_provisioner(configured, nats_url),
        ):
            wedged = await create(api, "wedged")
            # Within the 1 s connect bound (and the pass around it), not the 5 s request one.
            cluster = await wait_cluster(
                api,
                wedged["id"],
                lambda c: any(
                    x["type"] == "AddonsReady" and x["reason"] == "TenantAPIUnavailable"
                    for x in c["status"]["conditions"]
                ),
                timeout=4.0,
            )
            assert silent.connections >= 1
            assert condition(cluster, "ControlPlaneReady")["status"] == "True"
            assert "retrying in" in condition(cluster, "AddonsReady")["message"]

            # Other clusters go on while the wedged one keeps being followed.
            lively = await create(api, "lively")
            await wait_cluster(api, lively["id"], phase("Ready"), timeout=3.0)

            # Its add-ons are tried again after growing pauses, not on every pass.
            attempts = silent.connections
            await asyncio.sleep(3.0)
            assert silent.connections - attempts <= 3
            cluster = await wait_cluster(api, wedged["id"], lambda c: True)
            assert cluster["status"]["phase"] == "Provisioning"


class TestResync:
    async def test_objects_deleted_behind_its_back_are_recreated(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        created = await create(api, "drift")
        await wait_cluster(api, created["id"], phase("Ready"))
        namespace = names.namespace_for("drift")
        before = cluster_objects(management, "drift")
        management.emulator.remove("apps/v1/deployments", namespace, "control-plane")
        management.emulator.remove("v1/secrets", namespace, names.SECRET_SCHEDULER_KUBECONFIG)
        management.emulator.remove("v1/services", namespace, names.API_SERVICE)
        await provisioner.resync()
        await wait_cluster(api, created["id"], phase("Ready"))
        after = cluster_objects(management, "drift")
        assert set(after) == set(before)
        kept = {key for key in before if before[key] == after[key]}
        assert "v1/secrets/ca" in kept  # the CA (trusted by workers) is never replaced

    async def test_the_resync_loop_runs_under_a_lease(
        self,
        api: httpx.AsyncClient,
        settings: Settings,
        nats_url: str,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        configured = provisioner_settings(
            settings, management.kubeconfig, resync_interval_seconds=0.2
        )
        async with running_provisioner(configured, nats_url):
            created = await create(api, "healed")
            await wait_cluster(api, created["id"], phase("Ready"))
            namespace = names.namespace_for("healed")
            management.emulator.remove("apps/v1/statefulsets", namespace, "etcd")
            for _ in range(100):
                if management.emulator.get("apps/v1/statefulsets", namespace, "etcd"):
                    break
                await asyncio.sleep(0.05)
            assert management.emulator.get("apps/v1/statefulsets", namespace, "etcd")

    async def test_only_one_replica_holds_the_lease(self, bus: Bus) -> None:
        leases = await open_leases(bus, "provisioner", ttl_seconds=30)
        name = f"test-{uuid.uuid4().hex[:8]}"
        assert await leases.hold(name, "a")
        assert not await leases.hold(name, "b")
        assert await leases.hold(name, "a")  # renewing
        await leases.release(name, "b")  # not b's to release
        assert not await leases.hold(name, "b")
        await leases.release(name, "a")
        assert await leases.hold(name, "b")

    async def test_leftovers_of_deleted_clusters_go_and_unknown_ones_stay(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        created = await create(api, "old")
        await wait_cluster(api, created["id"], phase("Ready"))
        await api.delete(f"/api/v1/clusters/{created['id']}")
        await wait_cluster(api, created["id"], lambda c: c.get("status") == 404)
        emulator = management.emulator
        labels = {names.CLUSTER_ID_LABEL: created["id"], names.MANAGED_BY_LABEL: "nest"}
        stranger = {names.CLUSTER_ID_LABEL: "someone-else", names.MANAGED_BY_LABEL: "nest"}
        for name, labelled in (("nest-old", labels), ("nest-stranger", stranger)):
            response = await httpx.AsyncClient().post(
                f"{management.url}/api/v1/namespaces",
                json={
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": name, "labels": labelled},
                },
            )
            assert response.status_code == 200, response.text
        await provisioner.resync()
        for _ in range(100):
            if emulator.get("v1/namespaces", None, "nest-old") is None:
                break
            await asyncio.sleep(0.02)
        assert emulator.get("v1/namespaces", None, "nest-old") is None
        assert emulator.get("v1/namespaces", None, "nest-stranger") is not None


class TestLosses:
    async def test_a_ready_cluster_that_loses_its_control_plane_is_degraded(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        created = await create(api, "wobbly")
        await wait_cluster(api, created["id"], phase("Ready"))
        management.controller.paused = True
        live = management.emulator.get(
            "apps/v1/deployments", names.namespace_for("wobbly"), "control-plane"
        )
        assert live is not None
        live["status"]["availableReplicas"] = 0
        await provisioner.resync()
        cluster = await wait_cluster(api, created["id"], phase("Degraded"))
        assert cluster["status"]["reason"] == "RollingOut"
        assert condition(cluster, "ControlPlaneReady")["status"] == "False"
        management.controller.resume()
        await provisioner.resync()
        await wait_cluster(api, created["id"], phase("Ready"))

    async def test_a_delete_during_an_outage_finishes_once_the_api_is_back(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        created = await create(api, "stuck")
        await wait_cluster(api, created["id"], phase("Ready"))
        outage = management.emulator.fail("DELETE", "/namespaces/", status=503, times=None)
        await api.delete(f"/api/v1/clusters/{created['id']}")
        for _ in range(200):
            record = await provisioner.store.get(created["id"])
            if record is not None and record.delete_requested and outage.hits >= 3:
                break
            await asyncio.sleep(0.05)
        assert (await api.get(f"/api/v1/clusters/{created['id']}")).json()["status"][
            "phase"
        ] == "Deleting"
        outage.times = 0
        await provisioner.resync()
        await wait_cluster(api, created["id"], lambda c: c.get("status") == 404)
        assert cluster_objects(management, "stuck") == {}


class TestNameReuse:
    async def test_a_new_cluster_with_a_deleted_ones_name_is_left_alone(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        first = await create(api, "reuse")
        await wait_cluster(api, first["id"], phase("Ready"))
        await api.delete(f"/api/v1/clusters/{first['id']}")
        await wait_cluster(api, first["id"], lambda c: c.get("status") == 404)
        second = await create(api, "reuse")
        await wait_cluster(api, second["id"], phase("Ready"))
        await provisioner.resync()  # the first one's tombstone must not touch the second
        ns = management.emulator.get("v1/namespaces", None, names.namespace_for("reuse"))
        assert ns is not None and ns["status"]["phase"] == "Active"
        assert ns["metadata"]["labels"][names.CLUSTER_ID_LABEL] == second["id"]


class TestCrash:
    async def test_sigkill_mid_reconcile_then_restart_converges_without_duplicates(
        self,
        api: httpx.AsyncClient,
        nats_url: str,
        management: ManagementCluster,
        tmp_path: Path,
    ) -> None:
        env = {
            "NEST_NATS_URL": nats_url,
            "NEST_KUBECONFIG": str(management.kubeconfig),
            "NEST_DATA_DIR": str(tmp_path / "data"),
            "NEST_POLL_INTERVAL_SECONDS": "0.05",
            "NEST_RESYNC_INTERVAL_SECONDS": "0.5",
            "NEST_KUBE_TIMEOUT_SECONDS": "2",
        }
        bus = Bus([nats_url], name="reset")
        await bus.connect()
        await reset_buckets(bus)
        await bus.close()
        # Slow writes of Secrets and of the workloads after them, so the kill lands in the
        # middle of the first pass: after some Secrets, before the control-plane Deployment.
        slow = management.emulator.fail(
            "PATCH", "/(secrets|statefulsets|deployments)/", status=None, delay=0.3, times=None
        )
        first = provisioner_process(env, tmp_path / "first.log")
        try:
            created = await create(api, "crashy")
            namespace = names.namespace_for("crashy")
            for _ in range(400):
                if len(management.emulator.items("v1/secrets", namespace)) >= 2:
                    break
                await asyncio.sleep(0.02)
            assert management.emulator.items("v1/secrets", namespace), (
                tmp_path / "first.log"
            ).read_text()
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
        finally:
            kill_group(first)
        assert management.emulator.get("apps/v1/deployments", namespace, "control-plane") is None
        written = {
            s["metadata"]["name"]: s["metadata"]["uid"]
            for s in management.emulator.items("v1/secrets", namespace)
        }
        slow.times = 0
        second = provisioner_process(env, tmp_path / "second.log")
        try:
            cluster = await wait_cluster(
                api,
                created["id"],
                lambda c: any(
                    x["type"] == "ControlPlaneReady" and x["status"] == "True"
                    for x in c["status"]["conditions"]
                ),
                timeout=60,
            )
        finally:
            kill_group(second, signal.SIGTERM)
        # No tenant API is reachable from the subprocess, so the add-ons wait.
        assert condition(cluster, "AddonsReady")["status"] == "False"
        objects = cluster_objects(management, "crashy")
        assert len([k for k in objects if k.startswith("v1/secrets/")]) == 13
        assert len(management.emulator.items("v1/namespaces")) == 1
        assert len(management.emulator.items("apps/v1/deployments")) == 1
        for name, uid in written.items():
            if name == "ca":
                assert objects[f"v1/secrets/{name}"] == uid  # the first CA was kept
