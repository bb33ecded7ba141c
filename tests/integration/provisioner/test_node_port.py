"""A NodePort cluster all the way to Ready: its tenant API is served on the node address and
the cluster's stable NodePort, so the add-ons are applied through it as through a node."""

from __future__ import annotations

import httpx

from libs.common.settings import Settings
from services.provisioner import manifests, names
from tests.support.kube_emulator import TenantApis
from tests.support.kube_harness import (
    ManagementCluster,
    condition,
    phase,
    provisioner_settings,
    running_provisioner,
    wait_cluster,
)


async def test_a_node_port_cluster_gets_its_addons_through_the_node_port(
    api: httpx.AsyncClient,
    settings: Settings,
    nats_url: str,
    management: ManagementCluster,
    tenants: TenantApis,
) -> None:
    tenants.node_address = "127.0.0.1"
    configured = provisioner_settings(settings, management.kubeconfig, node_address="127.0.0.1")
    async with running_provisioner(configured, nats_url):
        response = await api.post(
            "/api/v1/clusters",
            json={"name": "noded", "spec": {"network": {"serviceType": "NodePort"}}},
        )
        assert response.status_code == 201, response.text
        created = response.json()
        cluster = await wait_cluster(api, created["id"], phase("Ready"), timeout=30.0)

    namespace = names.namespace_for("noded")
    service = management.emulator.get("v1/services", namespace, names.API_SERVICE)
    assert service is not None
    node_port = service["spec"]["ports"][0]["nodePort"]
    assert node_port == manifests.stable_node_port(created["id"], "apiserver", 0)
    assert cluster["status"]["endpoint"] == {"host": "127.0.0.1", "port": node_port}
    assert condition(cluster, "AddonsReady")["status"] == "True"
    tenant = tenants.emulators[namespace]
    assert tenant.get("v1/configmaps", "kube-public", "cluster-info") is not None
    assert tenant.get("apps/v1/deployments", "kube-system", "coredns") is not None
