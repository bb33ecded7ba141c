"""A NodePort cluster all the way to Ready: its tenant API runs for real and is reached at a
node's address and the cluster's stable NodePort (the harness forwards NodePorts as kube-proxy
does), so the add-ons are applied through it as through a node."""

from __future__ import annotations

import httpx

from libs.common.settings import Settings
from services.provisioner import manifests, names
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


async def test_a_node_port_cluster_gets_its_addons_through_the_node_port(
    api: httpx.AsyncClient,
    settings: Settings,
    nats_url: str,
    management: Management,
) -> None:
    name = unique("noded")
    configured = provisioner_settings(
        settings, management.kubeconfig, node_address=management.node_address
    )
    async with running_provisioner(configured, nats_url):
        response = await api.post(
            "/api/v1/clusters",
            json={
                "name": name,
                "labels": REAL,
                "spec": {**SMALL, "network": {"serviceType": "NodePort"}},
            },
        )
        assert response.status_code == 201, response.text
        created = response.json()
        cluster = await wait_cluster(api, created["id"], phase("Ready"), timeout=120.0)

    namespace = names.namespace_for(name)
    service = await management.get(f"/api/v1/namespaces/{namespace}/services/{names.API_SERVICE}")
    assert service is not None
    node_port = service["spec"]["ports"][0]["nodePort"]
    assert node_port == manifests.stable_node_port(created["id"], "apiserver", 0)
    assert cluster["status"]["endpoint"] == {"host": management.node_address, "port": node_port}
    assert condition(cluster, "AddonsReady")["status"] == "True"
    async with await management.tenant(name) as tenant:
        assert await tenant.get("/api/v1/namespaces/kube-public/configmaps/cluster-info")
        assert await tenant.get("/apis/apps/v1/namespaces/kube-system/deployments/coredns")
    await management.api.delete(f"/api/v1/namespaces/{namespace}")
