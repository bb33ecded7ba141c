"""The provisioner end to end: intents from the API, objects in the emulated management cluster,
readiness, tenant add-ons, changes, deletion, kubeconfigs, and status back in the API."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509

from libs.common.bus import Bus, RpcError
from libs.common.contract.cluster import ReconcileCluster
from libs.common.contract.kubeconfig import KUBECONFIG_RPC_SUBJECT
from libs.common.settings import Settings
from services.provisioner import manifests, names
from services.provisioner.service import ProvisionerService
from tests.support.kube_emulator import TenantApis, tenant_hostname
from tests.support.kube_harness import (
    ManagementCluster,
    condition,
    phase,
    provisioner_settings,
    running_provisioner,
    wait_cluster,
)

CONDITIONS = (
    "ManagementClusterAvailable",
    "PKIReady",
    "DatastoreReady",
    "ControlPlaneReady",
    "EndpointReady",
    "AddonsReady",
)


async def create(api: httpx.AsyncClient, name: str, **spec: Any) -> dict[str, Any]:
    response = await api.post("/api/v1/clusters", json={"name": name, "spec": spec})
    assert response.status_code == 201, response.text
    return dict(response.json())


def deployment(management: ManagementCluster, name: str) -> dict[str, Any]:
    found = management.emulator.get(
        "apps/v1/deployments", names.namespace_for(name), names.CONTROL_PLANE_DEPLOYMENT
    )
    assert found is not None
    return found


def serving_ips(
    management: ManagementCluster, namespace: str
) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The IP SANs of the API server's serving certificate the provisioner wrote."""
    secret = management.emulator.get("v1/secrets", namespace, names.SECRET_APISERVER)
    assert secret is not None
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(sans.get_values_for_type(x509.IPAddress))


async def reported_phases(api: httpx.AsyncClient, cluster_id: str) -> list[str]:
    """The phase of every status event the API recorded for the cluster, oldest first."""
    response = await api.get(
        "/api/v1/events",
        params={"subject": cluster_id, "type": "io.nest.cluster.status_changed.v1"},
    )
    assert response.status_code == 200, response.text
    return [event["data"]["phase"] for event in response.json()["items"]]


def cluster_objects(management: ManagementCluster, name: str) -> dict[str, str]:
    """(resource/name) -> uid of everything in the cluster's namespace, and the namespace."""
    namespace = names.namespace_for(name)
    found = {}
    for resource, buckets in management.emulator.store.items():
        for obj in buckets.get(namespace, {}).values():
            found[f"{resource}/{obj['metadata']['name']}"] = obj["metadata"]["uid"]
    ns = management.emulator.get("v1/namespaces", None, namespace)
    if ns is not None:
        found["v1/namespaces"] = ns["metadata"]["uid"]
    return found


class TestProvisioning:
    async def test_a_new_cluster_becomes_ready_with_its_addons(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        created = await create(api, "demo")
        cluster = await wait_cluster(api, created["id"], phase("Ready"))
        namespace = names.namespace_for("demo")
        assert cluster["status"]["observedGeneration"] == 1
        assert cluster["status"]["endpoint"] == {"host": tenant_hostname(namespace), "port": 6443}
        for type_ in CONDITIONS:
            assert condition(cluster, type_)["status"] == "True", cluster["status"]

        objects = cluster_objects(management, "demo")
        secrets = {key for key in objects if key.startswith("v1/secrets/")}
        assert len(secrets) == 13  # kubeadm's PKI plus the konnectivity kubeconfig
        for key in (
            "apps/v1/statefulsets/etcd",
            "apps/v1/deployments/control-plane",
            "v1/services/kube-apiserver",
            "v1/services/etcd",
            "v1/configmaps/egress-selector",
            "policy/v1/poddisruptionbudgets/etcd",
            "policy/v1/poddisruptionbudgets/control-plane",
        ):
            assert key in objects
        ns = management.emulator.get("v1/namespaces", None, namespace)
        assert ns is not None
        assert ns["metadata"]["labels"][names.CLUSTER_ID_LABEL] == created["id"]

        tenant = tenants.emulators[namespace]
        info = tenant.get("v1/configmaps", "kube-public", "cluster-info")
        assert info is not None
        kubeconfig = yaml.safe_load(info["data"]["kubeconfig"])
        assert kubeconfig["clusters"][0]["cluster"]["server"] == (
            f"https://{tenant_hostname(namespace)}:6443"
        )
        rbac = "rbac.authorization.k8s.io/v1/clusterrolebindings"
        for binding in (
            "kubeadm:get-nodes",
            "kubeadm:kubelet-bootstrap",
            "kubeadm:node-autoapprove-bootstrap",
            "kubeadm:node-autoapprove-certificate-rotation",
            "system:konnectivity-server",
        ):
            assert tenant.get(rbac, None, binding) is not None, binding
        for configmap in ("kubeadm-config", "kubelet-config", "coredns", "kube-proxy"):
            assert tenant.get("v1/configmaps", "kube-system", configmap) is not None
        assert tenant.get("apps/v1/deployments", "kube-system", "coredns") is not None
        assert tenant.get("apps/v1/daemonsets", "kube-system", "kube-proxy") is not None
        assert tenant.get("v1/serviceaccounts", "kube-system", "konnectivity-agent") is not None
        agent = tenant.get("apps/v1/daemonsets", "kube-system", "konnectivity-agent")
        assert agent is not None

    async def test_the_serving_certificate_names_the_endpoint_services_cluster_ip(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        created = await create(api, "inside")
        await wait_cluster(api, created["id"], phase("Ready"))
        namespace = names.namespace_for("inside")
        service = management.emulator.get("v1/services", namespace, names.API_SERVICE)
        assert service is not None
        cluster_ip = service["spec"]["clusterIP"]
        # In-management-cluster clients dial the Service's ClusterIP and check it in the SANs.
        assert ipaddress.ip_address(cluster_ip) in serving_ips(management, namespace)

        # Re-created behind Nest's back, the Service has another ClusterIP: re-issued for it.
        management.emulator.remove("v1/services", namespace, names.API_SERVICE)
        for _ in range(100):
            service = management.emulator.get("v1/services", namespace, names.API_SERVICE)
            if service is not None and ipaddress.ip_address(
                service["spec"]["clusterIP"]
            ) in serving_ips(management, namespace):
                break
            await asyncio.sleep(0.05)
        assert service is not None and service["spec"]["clusterIP"] != cluster_ip
        assert ipaddress.ip_address(service["spec"]["clusterIP"]) in serving_ips(
            management, namespace
        )
        assert ipaddress.ip_address(cluster_ip) not in serving_ips(management, namespace)
        await wait_cluster(api, created["id"], phase("Ready"))

    async def test_a_repeated_intent_changes_nothing(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        created = await create(api, "again")
        await wait_cluster(api, created["id"], phase("Ready"))
        before = cluster_objects(management, "again")
        versions = {
            key: management.emulator.get("v1/secrets", names.namespace_for("again"), key)
            for key in ("ca", "apiserver")
        }
        record = await provisioner.store.get(created["id"])
        assert record is not None and record.intent is not None
        await provisioner.on_reconcile(record.intent)
        assert cluster_objects(management, "again") == before
        for key, secret in versions.items():
            now = management.emulator.get("v1/secrets", names.namespace_for("again"), key)
            assert now == secret

    async def test_tenant_objects_are_applied_again_only_when_changed_or_resynced(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        created = await create(api, "quiet")
        await wait_cluster(api, created["id"], phase("Ready"))
        tenant = tenants.emulators[names.namespace_for("quiet")]
        writes = sum(n for key, n in tenant.counts.items() if key.startswith("PATCH"))
        assert writes >= 29
        record = await provisioner.store.get(created["id"])
        assert record is not None and record.intent is not None
        before = dict(tenant.counts)
        await provisioner.on_reconcile(record.intent)  # a pass with nothing new
        assert dict(tenant.counts) == before
        assert condition(await wait_cluster(api, created["id"], phase("Ready")), "AddonsReady")[
            "status"
        ] == ("True")

        # Someone deletes an add-on in the tenant: the resync re-applies every object.
        tenant.remove("apps/v1/deployments", "kube-system", "coredns")
        await provisioner.resync()
        rewritten = sum(n for key, n in tenant.counts.items() if key.startswith("PATCH"))
        assert rewritten - writes == 29
        assert tenant.get("apps/v1/deployments", "kube-system", "coredns") is not None


class TestChanges:
    async def test_scaling_the_control_plane(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        created = await create(api, "scaled")
        await wait_cluster(api, created["id"], phase("Ready"))
        response = await api.patch(
            f"/api/v1/clusters/{created['id']}",
            json={"spec": {"controlPlane": {"replicas": 3}}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert response.status_code == 200, response.text
        await wait_cluster(
            api,
            created["id"],
            lambda c: c["status"]["observedGeneration"] == 2 and c["status"]["phase"] == "Ready",
        )
        assert deployment(management, "scaled")["spec"]["replicas"] == 3

    async def test_scaling_a_ready_cluster_rolls_out_without_being_degraded(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        created = await create(api, "grow", controlPlane={"replicas": 1})
        await wait_cluster(api, created["id"], phase("Ready"))
        management.controller.paused = True  # the rollout takes its time, as on a real cluster
        await api.patch(
            f"/api/v1/clusters/{created['id']}",
            json={"spec": {"controlPlane": {"replicas": 3}}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        rolling = await wait_cluster(
            api, created["id"], lambda c: c["status"]["observedGeneration"] == 2
        )
        assert rolling["status"]["phase"] == "Provisioning"
        assert rolling["status"]["reason"] == "RollingOut"
        live = deployment(management, "grow")
        live["status"].update(replicas=2, updatedReplicas=2, availableReplicas=2)
        management.emulator.touch("apps/v1/deployments", live)  # one more pod available
        await asyncio.sleep(0.3)
        management.controller.resume()
        management.emulator.touch("apps/v1/deployments", live)
        await wait_cluster(api, created["id"], phase("Ready"))
        assert "Degraded" not in await reported_phases(api, created["id"])

        # Losing what it had while the next change rolls out is Degraded all the same.
        management.controller.paused = True
        await api.patch(
            f"/api/v1/clusters/{created['id']}",
            json={"spec": {"controlPlane": {"replicas": 4}}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        await wait_cluster(api, created["id"], lambda c: c["status"]["observedGeneration"] == 3)
        live = deployment(management, "grow")
        live["status"].update(availableReplicas=2)
        management.emulator.touch("apps/v1/deployments", live)
        degraded = await wait_cluster(api, created["id"], phase("Degraded"))
        assert condition(degraded, "ControlPlaneReady")["reason"] == "RollingOut"

    async def test_toggling_an_addon_on_a_ready_cluster_is_not_degraded(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        created = await create(api, "toggle")
        await wait_cluster(api, created["id"], phase("Ready"))
        management.controller.paused = True
        await api.patch(
            f"/api/v1/clusters/{created['id']}",
            json={"spec": {"addons": {"konnectivity": {"enabled": False}}}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        rolling = await wait_cluster(
            api, created["id"], lambda c: c["status"]["observedGeneration"] == 2
        )
        assert rolling["status"]["phase"] == "Provisioning"
        await asyncio.sleep(0.3)
        management.controller.resume()
        management.emulator.touch("apps/v1/deployments", deployment(management, "toggle"))
        await wait_cluster(api, created["id"], phase("Ready"))
        assert "Degraded" not in await reported_phases(api, created["id"])
        containers = deployment(management, "toggle")["spec"]["template"]["spec"]["containers"]
        assert "konnectivity-server" not in {c["name"] for c in containers}

    async def test_upgrading_one_minor_rolls_the_control_plane(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        created = await create(api, "up", kubernetesVersion="1.34.2")
        await wait_cluster(api, created["id"], phase("Ready"))
        management.controller.paused = True
        response = await api.patch(
            f"/api/v1/clusters/{created['id']}",
            json={"spec": {"kubernetesVersion": "1.35.0"}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert response.status_code == 200, response.text
        upgrading = await wait_cluster(api, created["id"], phase("Upgrading"))
        assert upgrading["status"]["observedGeneration"] == 2
        management.controller.resume()
        await wait_cluster(api, created["id"], phase("Ready"))
        live = deployment(management, "up")
        assert live["metadata"]["annotations"][manifests.VERSION_ANNOTATION] == "1.35.0"
        images = {c["image"] for c in live["spec"]["template"]["spec"]["containers"]}
        assert "registry.k8s.io/kube-apiserver:v1.35.0" in images

    async def test_a_skipped_minor_is_refused_against_what_runs(
        self,
        api: httpx.AsyncClient,
        bus: Bus,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        created = await create(api, "skip", kubernetesVersion="1.33.5")
        await wait_cluster(api, created["id"], phase("Ready"))
        # The API allowed 1.34 and then 1.35 while the provisioner had deployed neither.
        intent = ReconcileCluster.model_validate(
            {
                "clusterId": created["id"],
                "name": "skip",
                "generation": 3,
                "spec": {**created["spec"], "kubernetesVersion": "1.35.0"},
            }
        )
        await bus.publish(intent, source="api", subject=created["id"])
        cluster = await wait_cluster(api, created["id"], phase("Failed"))
        assert cluster["status"]["reason"] == "UpgradeRefused"
        assert "skips a minor version" in cluster["status"]["message"]
        live = deployment(management, "skip")
        assert live["metadata"]["annotations"][manifests.VERSION_ANNOTATION] == "1.33.5"

    async def test_changing_the_service_type_to_node_port(
        self,
        api: httpx.AsyncClient,
        settings: Settings,
        nats_url: str,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        configured = provisioner_settings(settings, management.kubeconfig, node_address="192.0.2.7")
        async with running_provisioner(configured, nats_url):
            created = await create(api, "ports")
            await wait_cluster(api, created["id"], phase("Ready"))
            await api.patch(
                f"/api/v1/clusters/{created['id']}",
                json={"spec": {"network": {"serviceType": "NodePort"}}},
                headers={"Content-Type": "application/merge-patch+json"},
            )
            cluster = await wait_cluster(
                api,
                created["id"],
                lambda c: (c["status"].get("endpoint") or {}).get("host") == "192.0.2.7",
            )
        service = management.emulator.get(
            "v1/services", names.namespace_for("ports"), names.API_SERVICE
        )
        assert service is not None and service["spec"]["type"] == "NodePort"
        node_port = service["spec"]["ports"][0]["nodePort"]
        assert cluster["status"]["endpoint"]["port"] == node_port
        # The API server listens on the NodePort number, and its kubeconfigs dial that port.
        secret = management.emulator.get(
            "v1/secrets", names.namespace_for("ports"), names.SECRET_SCHEDULER_KUBECONFIG
        )
        assert secret is not None
        kubeconfig = yaml.safe_load(base64.b64decode(secret["data"]["kubeconfig"]))
        assert kubeconfig["clusters"][0]["cluster"]["server"] == f"https://localhost:{node_port}"


class TestDeletion:
    async def test_delete_removes_everything_then_the_cluster(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        created = await create(api, "gone")
        await wait_cluster(api, created["id"], phase("Ready"))
        assert (await api.delete(f"/api/v1/clusters/{created['id']}")).status_code in (200, 202)
        await wait_cluster(api, created["id"], lambda c: c.get("status") == 404)
        assert cluster_objects(management, "gone") == {}
        record = await provisioner.store.get(created["id"])
        assert record is not None and record.deleted


class TestKubeconfigs:
    async def test_issues_a_short_lived_admin_kubeconfig(
        self,
        api: httpx.AsyncClient,
        bus: Bus,
        provisioner: ProvisionerService,
        management: ManagementCluster,
        tenants: TenantApis,
        tmp_path: Path,
    ) -> None:
        created = await create(api, "keys")
        await wait_cluster(api, created["id"], phase("Ready"))
        result = await bus.request(
            KUBECONFIG_RPC_SUBJECT,
            {"clusterId": created["id"], "name": "keys", "requester": "alice", "ttlSeconds": 3600},
        )
        document = yaml.safe_load(result["kubeconfig"])
        cluster = document["clusters"][0]["cluster"]
        user = document["users"][0]["user"]
        ca_pem = base64.b64decode(cluster["certificate-authority-data"])
        cert = x509.load_pem_x509_certificate(base64.b64decode(user["client-certificate-data"]))
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca)
        stored_ca = management.emulator.get("v1/secrets", names.namespace_for("keys"), "ca")
        assert stored_ca is not None
        assert base64.b64decode(stored_ca["data"]["tls.crt"]) == ca_pem
        assert "tls.key" not in str(result)
        expires = datetime.fromisoformat(result["expiresAt"])
        assert timedelta(minutes=55) < expires - datetime.now(UTC) <= timedelta(hours=1)
        assert cert.not_valid_after_utc == expires
        assert cert.subject.rfc4514_string() == "CN=nest:admin:alice,O=system:masters"
        assert cluster["server"] == created_endpoint(
            await api.get(f"/api/v1/clusters/{created['id']}")
        )

        # The kubeconfig works against the tenant API (TLS both ways with the cluster CA).
        key = base64.b64decode(user["client-key-data"])
        (tmp_path / "client.pem").write_bytes(
            base64.b64decode(user["client-certificate-data"]) + key
        )
        context = ssl.create_default_context(cadata=ca_pem.decode())
        context.load_cert_chain(tmp_path / "client.pem")
        async with httpx.AsyncClient(verify=context) as client:
            # httpx resolves names itself, so dial the tenant port and name the host for SNI.
            response = await client.get(
                f"https://127.0.0.1:{tenants.port}/version",
                extensions={"sni_hostname": tenant_hostname(names.namespace_for("keys"))},
                headers={"Host": tenant_hostname(names.namespace_for("keys"))},
            )
        assert response.status_code == 200

    @pytest.mark.parametrize(
        ("body", "kind"),
        [
            ({"clusterId": "nope", "requester": "alice"}, "not-found"),
            ({"clusterId": "x", "requester": "alice", "ttlSeconds": 86401}, "invalid"),
            ({"clusterId": "x"}, "invalid"),
        ],
    )
    async def test_refusals(
        self, bus: Bus, provisioner: ProvisionerService, body: dict[str, Any], kind: str
    ) -> None:
        with pytest.raises(RpcError) as refused:
            await bus.request(KUBECONFIG_RPC_SUBJECT, body)
        assert refused.value.kind == kind


def created_endpoint(response: httpx.Response) -> str:
    endpoint = response.json()["status"]["endpoint"]
    return f"https://{endpoint['host']}:{endpoint['port']}"


class TestWithoutManagementCluster:
    async def test_clusters_wait_with_a_clear_condition(
        self, api: httpx.AsyncClient, settings: Settings, nats_url: str
    ) -> None:
        configured = provisioner_settings(settings, None)
        async with running_provisioner(configured, nats_url):
            created = await create(api, "lonely")
            cluster = await wait_cluster(
                api, created["id"], lambda c: c["status"]["observedGeneration"] == 1
            )
            assert cluster["status"]["phase"] == "Pending"
            available = condition(cluster, "ManagementClusterAvailable")
            assert available["status"] == "False"
            assert available["reason"] == "NotConfigured"
            assert "NEST_KUBECONFIG" in available["message"]
            # Deleting works too: nothing was ever created.
            await api.delete(f"/api/v1/clusters/{created['id']}")
            await wait_cluster(api, created["id"], lambda c: c.get("status") == 404)


class TestNodePorts:
    async def test_a_taken_node_port_moves_to_the_next_stable_one(
        self,
        bus: Bus,
        settings: Settings,
        nats_url: str,
        management: ManagementCluster,
        tenants: TenantApis,
    ) -> None:
        cluster_id = "c-nodeport-taken"
        taken = manifests.stable_node_port(cluster_id, "apiserver", 0)
        async with httpx.AsyncClient(base_url=management.url) as kube:
            namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}}
            assert (await kube.post("/api/v1/namespaces", json=namespace)).status_code == 200
            holder = {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "holder", "namespace": "other"},
                "spec": {"type": "NodePort", "ports": [{"port": 1, "nodePort": taken}]},
            }
            response = await kube.post("/api/v1/namespaces/other/services", json=holder)
            assert response.status_code == 200, response.text
        configured = provisioner_settings(settings, management.kubeconfig, node_address="192.0.2.7")
        async with running_provisioner(configured, nats_url):
            intent = ReconcileCluster.model_validate(
                {
                    "clusterId": cluster_id,
                    "name": "taken",
                    "generation": 1,
                    "spec": {"network": {"serviceType": "NodePort"}},
                }
            )
            await bus.publish(intent, source="api", subject=cluster_id)
            expected = manifests.stable_node_port(cluster_id, "apiserver", 1)
            for _ in range(200):
                service = management.emulator.get(
                    "v1/services", names.namespace_for("taken"), names.API_SERVICE
                )
                live = deployment_or_none(management, "taken")
                if service is not None and live is not None:
                    break
                await asyncio.sleep(0.05)
        assert service is not None and live is not None
        assert service["spec"]["ports"][0]["nodePort"] == expected
        apiserver = live["spec"]["template"]["spec"]["containers"][0]
        assert f"--secure-port={expected}" in apiserver["args"]


def deployment_or_none(management: ManagementCluster, name: str) -> dict[str, Any] | None:
    return management.emulator.get(
        "apps/v1/deployments", names.namespace_for(name), names.CONTROL_PLANE_DEPLOYMENT
    )
