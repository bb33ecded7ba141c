"""The provisioner end to end on the real management cluster: intents from the API, objects in
the management cluster, readiness, tenant add-ons in the hosted cluster's real API, changes,
deletion, kubeconfigs, and status back in the API.

Clusters that must reach `Ready` run their pods for real (`REAL`, one replica of each kind
unless the test is about scale); the others run fake pods and stop at `Provisioning` with the
management-side conditions true, since no tenant API answers for them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import re
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable
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
from services.provisioner import addons, manifests, names
from services.provisioner.service import ProvisionerService
from tests.support.kube.api import Credentials
from tests.support.kube_harness import (
    REAL,
    SMALL,
    Management,
    condition,
    fast_config,
    phase,
    provisioner_settings,
    reset_buckets,
    running_provisioner,
    unique,
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
MANAGEMENT_SIDE = CONDITIONS[:-1]
"""What a cluster with fake pods reaches: everything but the add-ons (no tenant API answers)."""
READY_TIMEOUT = 180.0
"""Generous: real control planes start on two cores shared with the rest of the suite."""
TENANT_OBJECTS = 29
"""Tenant objects of a cluster with every add-on on (`addons.render_addons`)."""
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Leftovers:
    """Names of the clusters a test creates; their namespaces are deleted when it ends."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def name(self, prefix: str) -> str:
        """A cluster name of its own in the shared management cluster, cleaned up at the end."""
        found = unique(prefix)
        self.names.append(found)
        return found


@pytest.fixture
async def leftovers(management: Management) -> AsyncIterator[Leftovers]:
    """Deletes the namespaces of the test's clusters at its end. Requested by `provisioner`
    (below), so this runs after the provisioner stopped: a running one would apply a deleted
    namespace again."""
    found = Leftovers()
    yield found
    for name in found.names:
        # Also answered 200 for a namespace terminating already.
        await management.api.delete(f"/api/v1/namespaces/{names.namespace_for(name)}")


@contextlib.asynccontextmanager
async def provisioner_without_resync(
    settings: Settings, nats_url: str, **config: Any
) -> AsyncIterator[ProvisionerService]:
    """`running_provisioner`, except that its first resync is an hour away rather than 10 s
    (real control planes take about that long to become Ready): a test that needs a resync
    calls it, and nothing else forces writes meanwhile."""
    bus = Bus([nats_url], name="test-provisioner")
    await bus.connect()
    await bus.ensure_streams()
    await reset_buckets(bus)
    service = ProvisionerService(
        settings,
        config=dataclasses.replace(fast_config(settings), **config),
        first_resync_after=3600.0,
    )
    await service.start(bus)
    try:
        yield service
    finally:
        await service.stop(3.0)
        await bus.close()


@pytest.fixture
async def provisioner(
    settings: Settings, management: Management, nats_url: str, leftovers: Leftovers
) -> AsyncIterator[ProvisionerService]:
    """As in conftest (the chart's ServiceAccount through the proxy, NodePort clusters at the
    first node's address) but without a resync of its own, and stopped before `leftovers`
    cleans up."""
    configured = provisioner_settings(
        settings, management.kubeconfig, node_address=management.node_address
    )
    async with provisioner_without_resync(configured, nats_url) as service:
        yield service


async def create(api: httpx.AsyncClient, name: str, **spec: Any) -> dict[str, Any]:
    return await create_labelled(api, name, {}, spec)


async def create_labelled(
    api: httpx.AsyncClient, name: str, labels: dict[str, str], spec: dict[str, Any]
) -> dict[str, Any]:
    response = await api.post(
        "/api/v1/clusters", json={"name": name, "labels": labels, "spec": spec}
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


async def create_real(api: httpx.AsyncClient, name: str, **spec: Any) -> dict[str, Any]:
    """A cluster whose pods run for real (one of each kind unless `spec` says otherwise),
    once it is `Ready`."""
    created = await create_labelled(api, name, REAL, {**SMALL, **spec})
    return await wait_cluster(api, created["id"], phase("Ready"), timeout=READY_TIMEOUT)


async def patch(api: httpx.AsyncClient, cluster_id: str, spec: dict[str, Any]) -> None:
    response = await api.patch(
        f"/api/v1/clusters/{cluster_id}",
        json={"spec": spec},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert response.status_code == 200, response.text


def management_side_ready(cluster: dict[str, Any]) -> bool:
    """Every condition true but the add-ons: as far as a cluster of fake pods gets."""
    found = {c["type"]: c["status"] for c in cluster.get("status", {}).get("conditions") or []}
    return all(found.get(type_) == "True" for type_ in MANAGEMENT_SIDE)


def at_generation(generation: int, name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda c: (
        c.get("status", {}).get("observedGeneration") == generation and c["status"]["phase"] == name
    )


async def cluster_objects(management: Management, name: str) -> dict[str, str]:
    """`<plural>/<name>` -> uid of everything the provisioner made for cluster `name`, and
    `namespaces` -> its namespace's uid."""
    return await management.objects(names.namespace_for(name))


async def deployment(management: Management, name: str) -> dict[str, Any]:
    namespace = names.namespace_for(name)
    found = await management.get(
        f"/apis/apps/v1/namespaces/{namespace}/deployments/{names.CONTROL_PLANE_DEPLOYMENT}"
    )
    assert found is not None
    return found


async def secret(management: Management, name: str, secret_name: str) -> dict[str, Any]:
    namespace = names.namespace_for(name)
    found = await management.get(f"/api/v1/namespaces/{namespace}/secrets/{secret_name}")
    assert found is not None
    return found


async def endpoint_service(management: Management, name: str) -> dict[str, Any]:
    namespace = names.namespace_for(name)
    found = await management.get(f"/api/v1/namespaces/{namespace}/services/{names.API_SERVICE}")
    assert found is not None
    return found


async def serving_ips(
    management: Management, name: str
) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The IP SANs of the API server's serving certificate the provisioner wrote."""
    stored = await secret(management, name, names.SECRET_APISERVER)
    cert = x509.load_pem_x509_certificate(base64.b64decode(stored["data"]["tls.crt"]))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {
        ip
        for ip in sans.get_values_for_type(x509.IPAddress)
        if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
    }


async def status_events(api: httpx.AsyncClient, cluster_id: str) -> list[dict[str, Any]]:
    """The data of every status event the API recorded for the cluster, oldest first."""
    found: list[dict[str, Any]] = []
    params: dict[str, Any] = {"subject": cluster_id, "type": "io.nest.cluster.status_changed.v1"}
    while True:
        response = await api.get("/api/v1/events", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        found += [event["data"] for event in page["items"]]
        if not page.get("next"):
            return found
        params["cursor"] = page["next"]


async def degraded_events(api: httpx.AsyncClient, cluster_id: str) -> list[dict[str, Any]]:
    """The status events that reported the cluster Degraded (with why)."""
    return [
        {key: event[key] for key in ("observedGeneration", "reason", "message")}
        for event in await status_events(api, cluster_id)
        if event["phase"] == "Degraded"
    ]


async def first_event_of_generation(
    api: httpx.AsyncClient, cluster_id: str, generation: int
) -> dict[str, Any]:
    """The first status the provisioner reported for `generation`: what the pass that took
    the change up saw, however fast the rollout finished after it."""
    for _ in range(1200):
        for event in await status_events(api, cluster_id):
            if event["observedGeneration"] == generation:
                return event
        await asyncio.sleep(0.05)
    raise AssertionError(f"no status event of generation {generation} for {cluster_id}")


async def tenant_applies(management: Management, name: str) -> Counter[str]:
    """Server-side applies of objects (not of their status: the API server applies its own
    objects' status) the hosted cluster's API server answered so far, per resource, from its
    own metrics: the one API server replica of a `SMALL` cluster sees every request."""
    async with await management.tenant(name) as tenant:
        credentials: Credentials = tenant.credentials
    async with httpx.AsyncClient(
        base_url=credentials.server, verify=credentials.ssl_context(), timeout=10
    ) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    found: Counter[str] = Counter()
    for line in response.text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if labels.get("verb") == "APPLY" and not labels.get("subresource"):
            found[labels["resource"]] += int(float(line.rsplit(" ", 1)[1]))
    return found


def rendered_addons(intent: ReconcileCluster) -> Counter[str]:
    """How many tenant objects of each resource Nest applies for `intent`."""
    objects = addons.render_addons(
        intent, addons.AddonInputs(endpoint_host="192.0.2.1", endpoint_port=6443, ca_pem=b"")
    )
    return Counter(manifests.resource_path(obj).rsplit("/", 2)[-2] for obj in objects)


def without(counts: Counter[str], resource: str) -> Counter[str]:
    return Counter({key: n for key, n in counts.items() if key != resource})


def writes(management: Management) -> int:
    """Writes (POST, PUT, PATCH, DELETE) that reached the management API through the proxy."""
    return sum(n for (method, _), n in management.proxy.requests.items() if method in WRITES)


class TestProvisioning:
    async def test_a_new_cluster_becomes_ready_with_its_addons(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
        leftovers: Leftovers,
    ) -> None:
        name = leftovers.name("demo")
        cluster = await create_real(api, name)
        namespace = names.namespace_for(name)
        assert cluster["status"]["observedGeneration"] == 1
        service = await endpoint_service(management, name)
        address = service["status"]["loadBalancer"]["ingress"][0]["ip"]
        assert cluster["status"]["endpoint"] == {"host": address, "port": 6443}
        for type_ in CONDITIONS:
            assert condition(cluster, type_)["status"] == "True", cluster["status"]

        objects = await cluster_objects(management, name)
        secrets = {key for key in objects if key.startswith("secrets/")}
        assert len(secrets) == 13, secrets  # kubeadm's PKI plus the konnectivity kubeconfig
        for key in (
            "statefulsets/etcd",
            "deployments/control-plane",
            "services/kube-apiserver",
            "services/etcd",
            "configmaps/egress-selector",
            "poddisruptionbudgets/etcd",
            "poddisruptionbudgets/control-plane",
        ):
            assert key in objects
        ns = await management.get(f"/api/v1/namespaces/{namespace}")
        assert ns is not None
        assert ns["metadata"]["labels"][names.CLUSTER_ID_LABEL] == cluster["id"]

        async with await management.tenant(name) as tenant:
            info = await tenant.get("/api/v1/namespaces/kube-public/configmaps/cluster-info")
            assert info is not None
            kubeconfig = yaml.safe_load(info["data"]["kubeconfig"])
            assert kubeconfig["clusters"][0]["cluster"]["server"] == f"https://{address}:6443"
            rbac = "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings"
            for binding in (
                "kubeadm:get-nodes",
                "kubeadm:kubelet-bootstrap",
                "kubeadm:node-autoapprove-bootstrap",
                "kubeadm:node-autoapprove-certificate-rotation",
                "system:konnectivity-server",
            ):
                assert await tenant.get(f"{rbac}/{binding}") is not None, binding
            for configmap in ("kubeadm-config", "kubelet-config", "coredns", "kube-proxy"):
                found = await tenant.get(f"/api/v1/namespaces/kube-system/configmaps/{configmap}")
                assert found is not None, configmap
            apps = "/apis/apps/v1/namespaces/kube-system"
            assert await tenant.get(f"{apps}/deployments/coredns") is not None
            assert await tenant.get(f"{apps}/daemonsets/kube-proxy") is not None
            assert (
                await tenant.get(
                    "/api/v1/namespaces/kube-system/serviceaccounts/konnectivity-agent"
                )
                is not None
            )
            assert await tenant.get(f"{apps}/daemonsets/konnectivity-agent") is not None

    async def test_the_serving_certificate_names_the_endpoint_services_cluster_ip(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
        leftovers: Leftovers,
    ) -> None:
        name = leftovers.name("inside")
        cluster = await create_real(api, name)
        namespace = names.namespace_for(name)
        cluster_ip = (await endpoint_service(management, name))["spec"]["clusterIP"]
        # In-management-cluster clients dial the Service's ClusterIP and check it in the SANs.
        assert ipaddress.ip_address(cluster_ip) in await serving_ips(management, name)

        # Re-created behind Nest's back, the Service has another ClusterIP: re-issued for it.
        await management.api.delete(f"/api/v1/namespaces/{namespace}/services/{names.API_SERVICE}")
        service: dict[str, Any] | None = None
        for _ in range(1200):
            service = await management.get(
                f"/api/v1/namespaces/{namespace}/services/{names.API_SERVICE}"
            )
            if service is not None and ipaddress.ip_address(
                service["spec"]["clusterIP"]
            ) in await serving_ips(management, name):
                break
            await asyncio.sleep(0.05)
        assert service is not None
        new_ip = service["spec"]["clusterIP"]
        assert new_ip != cluster_ip
        assert ipaddress.ip_address(new_ip) in await serving_ips(management, name)
        assert ipaddress.ip_address(cluster_ip) not in await serving_ips(management, name)

        # The pods roll with the new certificate: a client dialling the new ClusterIP and
        # checking the name against the cluster CA gets through the TLS handshake.
        ca_pem = base64.b64decode(
            (await secret(management, name, names.SECRET_CA))["data"]["tls.crt"]
        )
        context = ssl.create_default_context(cadata=ca_pem.decode())
        answered = None
        for _ in range(600):
            try:
                async with httpx.AsyncClient(verify=context, timeout=5) as client:
                    answered = await client.get(f"https://{new_ip}:{names.API_PORT}/version")
                break
            except httpx.HTTPError:
                await asyncio.sleep(0.2)
        assert answered is not None, "the API server never served the new ClusterIP"
        await wait_cluster(api, cluster["id"], phase("Ready"), timeout=READY_TIMEOUT)

    async def test_a_repeated_intent_changes_nothing(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
        leftovers: Leftovers,
    ) -> None:
        name = leftovers.name("again")
        created = await create(api, name, **SMALL)  # fake pods: the management side is tested
        await wait_cluster(api, created["id"], management_side_ready)
        before = await cluster_objects(management, name)
        stored = {key: await secret(management, name, key) for key in ("ca", "apiserver")}
        record = await provisioner.store.get(created["id"])
        assert record is not None and record.intent is not None
        written = writes(management)
        await provisioner.on_reconcile(record.intent)
        assert writes(management) == written
        assert await cluster_objects(management, name) == before
        for key, found in stored.items():
            assert await secret(management, name, key) == found

    async def test_tenant_objects_are_applied_again_only_when_changed_or_resynced(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
        leftovers: Leftovers,
    ) -> None:
        name = leftovers.name("quiet")
        cluster = await create_real(api, name)
        record = await provisioner.store.get(cluster["id"])
        assert record is not None and record.intent is not None
        expected = rendered_addons(record.intent)
        assert sum(expected.values()) == TENANT_OBJECTS
        # The tenant's own clusterrole-aggregation controller applies ClusterRoles too (the
        # aggregated admin, edit and view, once its controller-manager leads), whenever that
        # is: ClusterRoles are compared apart.
        applied = await tenant_applies(management, name)
        assert all(applied[resource] >= n for resource, n in expected.items()), applied
        await provisioner.on_reconcile(record.intent)  # a pass with nothing new
        unchanged = await tenant_applies(management, name)
        assert without(unchanged, "clusterroles") == without(applied, "clusterroles")
        assert condition(await wait_cluster(api, cluster["id"], phase("Ready")), "AddonsReady")[
            "status"
        ] == ("True")

        # Someone deletes an add-on in the tenant: the resync re-applies every object.
        coredns = "/apis/apps/v1/namespaces/kube-system/deployments/coredns"
        async with await management.tenant(name) as tenant:
            assert await tenant.delete(coredns)
            await provisioner.resync()
            again = await tenant_applies(management, name)
            again.subtract(unchanged)
            assert without(again, "clusterroles") == without(expected, "clusterroles")
            assert again["clusterroles"] >= expected["clusterroles"]
            assert await tenant.get(coredns) is not None


class TestChanges:
    async def test_scaling_the_control_plane(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
        leftovers: Leftovers,
    ) -> None:
        name = leftovers.name("scaled")
        cluster = await create_real(api, name)
        await patch(api, cluster["id"], {"controlPlane": {"replicas": 3}})
        await wait_cluster(api, cluster["id"], at_generation(2, "Ready"), timeout=READY_TIMEOUT)
        live = await deployment(management, name)
        assert live["spec"]["replicas"] == 3
        assert live["status"]["availableReplicas"] == 3

    async def test_scaling_a_ready_cluster_rolls_out_without_being_degraded(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
        leftovers: Leftovers,
    ) -> None:
        name = leftovers.name("grow")
        cluster = await create_real(api, name)
        await patch(api, cluster["id"], {"controlPlane": {"replicas": 2}})
        # The pass that takes the change up sees it rolling out (the new replica starts for
        # real, which takes its time).
        rolling = await first_event_of_generation(api, cluster["id"], 2)
        assert rolling["phase"] == "Provisioning"
        assert rolling["reason"] == "RollingOut"
        await wait_cluster(api, cluster["id"], at_generation(2, "Ready"), timeout=READY_TIMEOUT)
        assert await degraded_events(api, cluster["id"]) == []

        # Losing what it had while the next change rolls out is Degraded all the same: the
        # replicas it had deleted while the third one starts.
        await patch(api, cluster["id"], {"controlPlane": {"replicas": 3}})
        await first_event_of_generation(api, cluster["id"], 3)
        namespace = names.namespace_for(name)
        available = [
            pod
            for pod in await management.list(
                f"/api/v1/namespaces/{namespace}/pods",
                labelSelector=f"{names.COMPONENT_LABEL}={manifests.COMPONENT_CONTROL_PLANE}",
            )
            if pod_ready(pod) and not pod["metadata"].get("deletionTimestamp")
        ]
        assert len(available) >= 2, available
        for pod in available:  # whether or not the third one is available yet
            await management.api.delete(
                f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}"
            )
        degraded = await wait_for_event(
            api, cluster["id"], lambda e: e["observedGeneration"] == 3 and e["phase"] == "Degraded"
        )
        control_plane = next(c for c in degraded["conditions"] if c["type"] == "ControlPlaneReady")
        assert control_plane["reason"] == "RollingOut"

    async def test_toggling_an_addon_on_a_ready_cluster_is_not_degraded(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
        leftovers: Leftovers,
    ) -> None:
        name = leftovers.name("toggle")
        cluster = await create_real(api, name)
        await patch(api, cluster["id"], {"addons": {"konnectivity": {"enabled": False}}})
        rolling = await first_event_of_generation(api, cluster["id"], 2)
        assert rolling["phase"] == "Provisioning"
        await wait_cluster(api, cluster["id"], at_generation(2, "Ready"), timeout=READY_TIMEOUT)
        assert await degraded_events(api, cluster["id"]) == []
        containers = (await deployment(management, name))["spec"]["template"]["spec"]["containers"]
        assert "konnectivity-server" not in {c["name"] for c in containers}

    async def test_upgrading_one_minor_rolls_the_control_plane(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
        leftovers: Leftovers,
    ) -> None:
        name = leftovers.name("up")
        cluster = await create_real(api, name, kubernetesVersion="1.36.3")
        async with await management.tenant(name) as tenant:
            before = await tenant.get("/version")
        assert before is not None and before["gitVersion"].startswith("v1.36.3")
        await patch(api, cluster["id"], {"kubernetesVersion": "1.37.2"})
        upgrading = await first_event_of_generation(api, cluster["id"], 2)
        assert upgrading["phase"] == "Upgrading"
        await wait_cluster(api, cluster["id"], at_generation(2, "Ready"), timeout=READY_TIMEOUT)
        live = await deployment(management, name)
        assert live["metadata"]["annotations"][manifests.VERSION_ANNOTATION] == "1.37.2"
        images = {c["image"] for c in live["spec"]["template"]["spec"]["containers"]}
        assert "registry.k8s.io/kube-apiserver:v1.37.2" in images
        async with await management.tenant(name) as tenant:
            after = await tenant.get("/version")
        assert after is not None and after["gitVersion"].startswith("v1.37.2")

    async def test_a_skipped_minor_is_refused_against_what_runs(
        self,
        api: httpx.AsyncClient,
        bus: Bus,
        provisioner: ProvisionerService,
        management: Management,
        leftovers: Leftovers,
    ) -> None:
        # Fake pods: what runs is what the control-plane Deployment says it runs.
        name = leftovers.name("skip")
        created = await create(api, name, **SMALL, kubernetesVersion="1.35.4")
        await wait_cluster(api, created["id"], management_side_ready)
        # The API allowed 1.36 and then 1.37 while the provisioner had deployed neither.
        intent = ReconcileCluster.model_validate(
            {
                "clusterId": created["id"],
                "name": name,
                "generation": 3,
                "spec": {**created["spec"], "kubernetesVersion": "1.37.2"},
            }
        )
        await bus.publish(intent, source="api", subject=created["id"])
        cluster = await wait_cluster(api, created["id"], phase("Failed"))
        assert cluster["status"]["reason"] == "UpgradeRefused"
        assert "skips a minor version" in cluster["status"]["message"]
        live = await deployment(management, name)
        assert live["metadata"]["annotations"][manifests.VERSION_ANNOTATION] == "1.35.4"

    async def test_changing_the_service_type_to_node_port(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
        leftovers: Leftovers,
    ) -> None:
        name = leftovers.name("ports")
        created = await create_real(api, name)
        await patch(api, created["id"], {"network": {"serviceType": "NodePort"}})
        await wait_cluster(
            api,
            created["id"],
            lambda c: (c["status"].get("endpoint") or {}).get("host") == management.node_address,
        )
        # Reached at the node's address and the NodePort, the add-ons are applied again.
        cluster = await wait_cluster(
            api, created["id"], at_generation(2, "Ready"), timeout=READY_TIMEOUT
        )
        service = await endpoint_service(management, name)
        assert service["spec"]["type"] == "NodePort"
        node_port = service["spec"]["ports"][0]["nodePort"]
        assert cluster["status"]["endpoint"] == {"host": management.node_address, "port": node_port}
        # The API server listens on the NodePort number, and its kubeconfigs dial that port.
        stored = await secret(management, name, names.SECRET_SCHEDULER_KUBECONFIG)
        kubeconfig = yaml.safe_load(base64.b64decode(stored["data"]["kubeconfig"]))
        assert kubeconfig["clusters"][0]["cluster"]["server"] == f"https://localhost:{node_port}"


def pod_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


async def wait_for_event(
    api: httpx.AsyncClient, cluster_id: str, predicate: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The first recorded status event satisfying `predicate` (waiting for it)."""
    for _ in range(2400):
        for event in await status_events(api, cluster_id):
            if predicate(event):
                return event
        await asyncio.sleep(0.05)
    raise AssertionError(f"no such status event for {cluster_id}")


class TestDeletion:
    async def test_delete_removes_everything_then_the_cluster(
        self,
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
        leftovers: Leftovers,
    ) -> None:
        name = leftovers.name("gone")
        # Fake pods: a real control plane's pods take their grace period to stop (the API
        # server waits for the etcd stopping next to it), which tells nothing more here.
        cluster = await create(api, name, **SMALL)
        await wait_cluster(api, cluster["id"], management_side_ready)
        assert await cluster_objects(management, name)
        assert (await api.delete(f"/api/v1/clusters/{cluster['id']}")).status_code in (200, 202)
        await wait_cluster(api, cluster["id"], lambda c: c.get("status") == 404)
        assert await cluster_objects(management, name) == {}
        record = await provisioner.store.get(cluster["id"])
        assert record is not None and record.deleted


class TestKubeconfigs:
    async def test_issues_a_short_lived_admin_kubeconfig(
        self,
        api: httpx.AsyncClient,
        bus: Bus,
        provisioner: ProvisionerService,
        management: Management,
        leftovers: Leftovers,
        tmp_path: Path,
    ) -> None:
        name = leftovers.name("keys")
        created = await create_real(api, name)
        result = await bus.request(
            KUBECONFIG_RPC_SUBJECT,
            {"clusterId": created["id"], "name": name, "requester": "alice", "ttlSeconds": 3600},
        )
        document = yaml.safe_load(result["kubeconfig"])
        cluster = document["clusters"][0]["cluster"]
        user = document["users"][0]["user"]
        ca_pem = base64.b64decode(cluster["certificate-authority-data"])
        cert = x509.load_pem_x509_certificate(base64.b64decode(user["client-certificate-data"]))
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca)
        stored_ca = await secret(management, name, "ca")
        assert base64.b64decode(stored_ca["data"]["tls.crt"]) == ca_pem
        assert "tls.key" not in str(result)
        expires = datetime.fromisoformat(result["expiresAt"])
        assert timedelta(minutes=55) < expires - datetime.now(UTC) <= timedelta(hours=1)
        assert cert.not_valid_after_utc == expires
        assert cert.subject.rfc4514_string() == "CN=nest:admin:alice,O=system:masters"
        assert cluster["server"] == created_endpoint(
            await api.get(f"/api/v1/clusters/{created['id']}")
        )

        # The kubeconfig works against the hosted cluster's API at its endpoint (TLS both
        # ways with the cluster CA), and it is an administrator there.
        key = base64.b64decode(user["client-key-data"])
        (tmp_path / "client.pem").write_bytes(
            base64.b64decode(user["client-certificate-data"]) + key
        )
        context = ssl.create_default_context(cadata=ca_pem.decode())
        context.load_cert_chain(tmp_path / "client.pem")
        async with httpx.AsyncClient(verify=context, timeout=10) as client:
            version = await client.get(f"{cluster['server']}/version")
            assert version.status_code == 200, version.text
            nodes = await client.get(f"{cluster['server']}/api/v1/nodes")
            assert nodes.status_code == 200, nodes.text

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
        management: Management,
        leftovers: Leftovers,
    ) -> None:
        cluster_id = unique("c-nodeport-taken")
        name = leftovers.name("taken")
        other = leftovers.name("other")  # a namespace of someone else's, holding the port
        taken = manifests.stable_node_port(cluster_id, "apiserver", 0)
        other_namespace = names.namespace_for(other)
        await management.api.create(
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": other_namespace}},
        )
        holder = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "holder", "namespace": other_namespace},
            "spec": {"type": "NodePort", "ports": [{"port": 1, "nodePort": taken}]},
        }
        await management.api.create(f"/api/v1/namespaces/{other_namespace}/services", holder)
        configured = provisioner_settings(
            settings, management.kubeconfig, node_address=management.node_address
        )
        namespace = names.namespace_for(name)
        async with running_provisioner(configured, nats_url):
            intent = ReconcileCluster.model_validate(
                {
                    "clusterId": cluster_id,
                    "name": name,
                    "generation": 1,
                    "spec": {**SMALL, "network": {"serviceType": "NodePort"}},
                }
            )
            await bus.publish(intent, source="api", subject=cluster_id)
            expected = manifests.stable_node_port(cluster_id, "apiserver", 1)
            for _ in range(1200):
                service = await management.get(
                    f"/api/v1/namespaces/{namespace}/services/{names.API_SERVICE}"
                )
                live = await management.get(
                    f"/apis/apps/v1/namespaces/{namespace}/deployments/"
                    f"{names.CONTROL_PLANE_DEPLOYMENT}"
                )
                if service is not None and live is not None:
                    break
                await asyncio.sleep(0.05)
        assert service is not None and live is not None
        assert service["spec"]["ports"][0]["nodePort"] == expected
        apiserver = live["spec"]["template"]["spec"]["containers"][0]
        assert f"--secure-port={expected}" in apiserver["args"]
