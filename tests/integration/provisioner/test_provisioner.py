"""The provisioner end to end: intents from the API, objects in the emulated management cluster,
readiness, tenant add-ons, and status back in the API."""

from __future__ import annotations

import httpx

from services.provisioner import names
from services.provisioner.service import ProvisionerService
from tests.support.kube_emulator import TenantApis
from tests.support.kube_harness import ManagementCluster, condition, phase, wait_cluster


async def test_a_new_cluster_becomes_ready_with_its_addons(
    api: httpx.AsyncClient,
    provisioner: ProvisionerService,
    management: ManagementCluster,
    tenants: TenantApis,
) -> None:
    created = (await api.post("/api/v1/clusters", json={"name": "demo"})).json()
    cluster = await wait_cluster(api, created["id"], phase("Ready"))
    namespace = names.namespace_for("demo")
    assert cluster["status"]["endpoint"] == {
        "host": f"{namespace}.tenants.nest.test",
        "port": 6443,
    }
    for type_ in (
        "ManagementClusterAvailable",
        "PKIReady",
        "DatastoreReady",
        "ControlPlaneReady",
        "EndpointReady",
        "AddonsReady",
    ):
        assert condition(cluster, type_)["status"] == "True", cluster["status"]
    tenant = tenants.emulators[namespace]
    assert tenant.get("v1/configmaps", "kube-public", "cluster-info") is not None
