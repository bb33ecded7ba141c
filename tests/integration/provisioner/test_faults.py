"""The provisioner under faults on the real management cluster: a failing or stalling management
API (from the fault proxy), a tenant API that is down or never answers, objects deleted behind
its back, leftovers and orphans, a control plane lost, and a SIGKILL mid-reconcile.

The management cluster is shared by every test of the session: each test works in its own
namespaces (`unique` names) and looks at nothing else, and deletes them at its end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats.js.errors
import pytest

from libs.common.bus import Bus
from libs.common.kv import open_leases
from libs.common.settings import Settings
from services.provisioner import manifests, names
from services.provisioner.service import RESYNC_LEASE, ProvisionerService
from tests.support.kube_harness import (
    REAL,
    SMALL,
    Management,
    condition,
    phase,
    provisioner_process,
    provisioner_settings,
    reset_buckets,
    running_provisioner,
    unique,
    wait_cluster,
)

MANAGEMENT_SIDE = (
    "ManagementClusterAvailable",
    "PKIReady",
    "DatastoreReady",
    "ControlPlaneReady",
    "EndpointReady",
)
"""The conditions the management cluster alone decides: true for a cluster whose pods are
fake (no tenant API answers them, so `AddonsReady` never is)."""
CONTROL_PLANE_PODS = f"{names.COMPONENT_LABEL}={manifests.COMPONENT_CONTROL_PLANE}"


# Helpers (also used by test_watch.py)


async def create(
    api: httpx.AsyncClient,
    name: str,
    *,
    labels: dict[str, str] | None = None,
    spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "spec": spec or {}}
    if labels:
        body["labels"] = labels
    response = await api.post("/api/v1/clusters", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def conditions_of(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    status = cluster.get("status")
    if not isinstance(status, dict):
        return {}
    return {c["type"]: c for c in status.get("conditions") or []}


def management_side_ready(cluster: dict[str, Any]) -> bool:
    found = conditions_of(cluster)
    return all(found.get(t, {}).get("status") == "True" for t in MANAGEMENT_SIDE)


def management_down(cluster: dict[str, Any]) -> bool:
    return conditions_of(cluster).get("ManagementClusterAvailable", {}).get("status") == "False"


def retry_pause(cluster: dict[str, Any]) -> float:
    """The pause before the next try of the add-ons that `AddonsReady` announces, else 0."""
    message = conditions_of(cluster).get("AddonsReady", {}).get("message", "")
    found = re.search(r"retrying in ([0-9.]+) s", message)
    return float(found.group(1)) if found else 0.0


def tenant_unavailable(cluster: dict[str, Any]) -> bool:
    return conditions_of(cluster).get("AddonsReady", {}).get("reason") == "TenantAPIUnavailable"


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def another_replica_holds_the_resync(nats_url: str) -> None:
    """Take the resync lease as another replica would: the provisioner under test then never
    resyncs (its first one is due 10 s after it started), so only its watches and its own
    polling can make it look again."""
    bus = Bus([nats_url], name="another-replica")
    await bus.connect()
    try:
        leases = await open_leases(bus, "provisioner", ttl_seconds=3600)
        assert await leases.hold(RESYNC_LEASE, f"another-replica-{uuid.uuid4().hex[:6]}")
    finally:
        await bus.close()


def management_etcd_url(management: Management) -> str:
    """The management cluster's etcd, as its kube-apiserver is told (`--etcd-servers`)."""
    return management.cluster.etcd_url


async def compact_management_etcd(management: Management) -> int:
    """Compact the management cluster's etcd up to now (what kube-apiserver itself does every
    5 minutes, to an older revision); returns the revision."""
    url = management_etcd_url(management)
    async with httpx.AsyncClient(timeout=30) as etcd:
        head = await etcd.post(f"{url}/v3/kv/range", json={"key": "AA=="})
        revision = int(head.json()["header"]["revision"])
        compacted = await etcd.post(
            f"{url}/v3/kv/compaction", json={"revision": str(revision), "physical": True}
        )
        assert compacted.status_code == 200, compacted.text
    return revision


async def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal the process group and wait for it without blocking the loop (the fault proxy the
    process talks to runs on it); SIGKILL after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        await asyncio.to_thread(process.wait, 10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await asyncio.to_thread(process.wait, 10)


@dataclass
class SilentPort:
    """A TCP server that accepts connections and never says a word (no TLS handshake, no
    HTTP), as a wedged API server or a black-holing proxy does."""

    connections: int = 0
    """Connections accepted so far."""
    abandoned: int = 0
    """Connections the client closed (gave up on)."""


@contextlib.asynccontextmanager
async def silent_port(host: str, port: int) -> AsyncIterator[SilentPort]:
    """`SilentPort` on `host:port` (the harness's `silent_endpoint` takes any free port; a
    tenant endpoint's port must be the cluster's NodePort)."""
    silent = SilentPort()
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.connections += 1
        held.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass  # read the ClientHello and whatever follows, answer nothing
        silent.abandoned += 1

    server = await asyncio.start_server(accept, host, port)
    try:
        yield silent
    finally:
        server.close()
        for writer in held:
            writer.close()


@pytest.fixture
async def owned_namespaces(management: Management) -> AsyncIterator[list[str]]:
    """Namespaces this test made, deleted at its end. Tests request it first, so it is torn
    down after the provisioner stopped: nothing re-creates them."""
    made: list[str] = []
    yield made
    for namespace in made:
        await management.api.delete(f"/api/v1/namespaces/{namespace}")


def own(owned: list[str], name: str) -> str:
    """The namespace of cluster `name`, to be deleted at the test's end."""
    namespace = names.namespace_for(name)
    owned.append(namespace)
    return namespace


class TestManagementApiFaults:
    async def test_500s_are_retried_explained_and_recovered_from(
        self,
        owned_namespaces: list[str],
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
    ) -> None:
        fault = management.proxy.fail("PATCH", "/deployments/", status=500, times=None)
        name = unique("flaky")
        own(owned_namespaces, name)
        created = await create(api, name, spec=SMALL)
        cluster = await wait_cluster(api, created["id"], management_down)
        available = condition(cluster, "ManagementClusterAvailable")
        assert available["reason"] == "Unavailable"
        assert "500" in available["message"]
        assert cluster["status"]["phase"] == "Provisioning"
        assert fault.hits >= 3  # every pass retried the request
        fault.times = 0
        await wait_cluster(api, created["id"], management_side_ready)

    async def test_a_stalling_api_times_out_and_recovers(
        self,
        owned_namespaces: list[str],
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
    ) -> None:
        fault = management.proxy.fail("*", "/statefulsets/", status=None, delay=2.5, times=None)
        name = unique("slow")
        own(owned_namespaces, name)
        created = await create(api, name, spec=SMALL)
        cluster = await wait_cluster(api, created["id"], management_down)
        assert "Timeout" in condition(cluster, "ManagementClusterAvailable")["message"]
        fault.times = 0
        await wait_cluster(api, created["id"], management_side_ready)

    async def test_a_tenant_api_that_is_down_holds_the_addons(
        self,
        owned_namespaces: list[str],
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
    ) -> None:
        # Its pods are fake: the control plane reports ready, but nothing answers behind the
        # load balancer's address.
        name = unique("mute")
        namespace = own(owned_namespaces, name)
        created = await create(api, name, spec=SMALL)
        cluster = await wait_cluster(api, created["id"], tenant_unavailable)
        assert condition(cluster, "ControlPlaneReady")["status"] == "True"
        assert cluster["status"]["phase"] == "Provisioning"

        # The tenant API comes up: its pods are started again, for real this time.
        await management.api.merge_patch(
            f"/api/v1/namespaces/{namespace}", {"metadata": {"labels": REAL}}
        )
        for pod in await management.list(f"/api/v1/namespaces/{namespace}/pods"):
            await management.api.delete(
                f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}"
            )
        cluster = await wait_cluster(api, created["id"], phase("Ready"), timeout=180.0)
        assert condition(cluster, "AddonsReady")["status"] == "True"
        assert await management.pod_processes(namespace, CONTROL_PLANE_PODS)


class TestSilentTenant:
    async def test_a_tenant_that_never_answers_tls_costs_its_own_cluster_only(
        self,
        owned_namespaces: list[str],
        api: httpx.AsyncClient,
        settings: Settings,
        nats_url: str,
        management: Management,
    ) -> None:
        # One pass at a time, and one tenant step at a time: a pass stalled on a wedged tenant
        # would hold up everyone else.
        configured = provisioner_settings(
            settings,
            management.kubeconfig,
            reconcile_concurrency=1,
            tenant_connect_timeout_seconds=1.0,
            node_address=management.node_address,
        )
        # A NodePort cluster is reached at the node's address and its NodePort: a server
        # that never speaks takes that address before the Service exists (the provisioner
        # starts after it), as a wedged API server behind a working node would.
        wedged_name = unique("wedged")
        wedged_namespace = own(owned_namespaces, wedged_name)
        wedged = await create(
            api, wedged_name, spec={**SMALL, "network": {"serviceType": "NodePort"}}
        )
        port = manifests.stable_node_port(wedged["id"], "apiserver", 0)
        passes_path = (
            f"/apis/apps/v1/namespaces/{wedged_namespace}/deployments/"
            f"{names.CONTROL_PLANE_DEPLOYMENT}"
        )
        async with (
            silent_port(management.node_address, port) as silent,
            running_provisioner(configured, nats_url),
        ):
            cluster = await wait_cluster(api, wedged["id"], tenant_unavailable)
            assert silent.connections >= 1
            assert condition(cluster, "ControlPlaneReady")["status"] == "True"
            assert cluster["status"]["endpoint"] == {"host": management.node_address, "port": port}
            message = condition(cluster, "AddonsReady")["message"]
            assert "retrying in" in message
            # Bounded by the 1 s connect timeout (TCP and TLS handshake), not by the 5 s one of
            # the whole request: aiohttp names which one fired.
            assert "ConnectionTimeoutError" in message, message

            # Other clusters go on while the wedged one keeps being followed: with a single
            # tenant slot, a wedged attempt that never ended would keep this one from Ready.
            lively_name = unique("lively")
            own(owned_namespaces, lively_name)
            lively = await create(api, lively_name, labels=REAL, spec=SMALL)
            await wait_cluster(api, lively["id"], phase("Ready"), timeout=120.0)

            # Its add-ons are tried again after growing pauses (1 s, 2 s, 4 s, ...), not on
            # every pass; the provisioner gave up every connection itself.
            cluster = await wait_cluster(
                api, wedged["id"], lambda c: retry_pause(c) >= 4, timeout=120.0
            )
            assert cluster["status"]["phase"] == "Provisioning"
            passes = management.proxy.requests[("GET", passes_path)]
            assert 3 <= silent.connections < passes

            async def all_abandoned() -> bool:
                return silent.abandoned == silent.connections

            assert await eventually(all_abandoned, timeout=10.0)


class TestResync:
    async def test_objects_deleted_behind_its_back_are_recreated(
        self,
        owned_namespaces: list[str],
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
    ) -> None:
        name = unique("drift")
        namespace = own(owned_namespaces, name)
        created = await create(api, name, spec=SMALL)
        await wait_cluster(api, created["id"], management_side_ready)
        before = await management.objects(namespace)
        removed = (
            f"deployments/{names.CONTROL_PLANE_DEPLOYMENT}",
            f"secrets/{names.SECRET_SCHEDULER_KUBECONFIG}",
            f"services/{names.API_SERVICE}",
        )
        await management.api.delete(
            f"/apis/apps/v1/namespaces/{namespace}/deployments/{names.CONTROL_PLANE_DEPLOYMENT}"
        )
        await management.api.delete(
            f"/api/v1/namespaces/{namespace}/secrets/{names.SECRET_SCHEDULER_KUBECONFIG}"
        )
        await management.api.delete(f"/api/v1/namespaces/{namespace}/services/{names.API_SERVICE}")
        await provisioner.resync()

        async def healed() -> bool:
            after = await management.objects(namespace)
            return set(after) == set(before) and all(after[k] != before[k] for k in removed)

        assert await eventually(healed), await management.objects(namespace)
        after = await management.objects(namespace)
        kept = {key for key in before if before[key] == after[key]}
        assert "secrets/ca" in kept  # the CA (trusted by workers) is never replaced

        # The new Service has a new load-balancer address, and the cluster reports it.
        async def reported() -> bool:
            service = await management.get(
                f"/api/v1/namespaces/{namespace}/services/{names.API_SERVICE}"
            )
            ingress = ((service or {}).get("status") or {}).get("loadBalancer", {})
            address = (ingress.get("ingress") or [{}])[0].get("ip")
            cluster = (await api.get(f"/api/v1/clusters/{created['id']}")).json()
            endpoint = cluster["status"].get("endpoint") or {}
            return (
                bool(address)
                and endpoint.get("host") == address
                and (management_side_ready(cluster))
            )

        assert await eventually(reported)

    async def test_the_resync_loop_runs_under_a_lease(
        self,
        owned_namespaces: list[str],
        api: httpx.AsyncClient,
        settings: Settings,
        nats_url: str,
        bus: Bus,
        management: Management,
    ) -> None:
        configured = provisioner_settings(
            settings, management.kubeconfig, resync_interval_seconds=0.2
        )
        name = unique("healed")
        namespace = own(owned_namespaces, name)
        async with running_provisioner(configured, nats_url) as service:
            created = await create(api, name, spec=SMALL)
            await wait_cluster(api, created["id"], management_side_ready)
            leases = await open_leases(bus, "provisioner", ttl_seconds=5)

            async def held() -> bool:
                # The lease is renewed between resyncs; a long resync (a tenant timing out)
                # can outlast its 5 s and the next round takes it anew.
                with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                    entry = await leases.kv.get(RESYNC_LEASE)
                    return entry.value is not None and entry.value.decode() == service.instance
                return False

            assert await eventually(held)

            # A resync applies every object again (a pass of its own applies only what
            # changed): the etcd budget is written again and again.
            budget = f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets/etcd"
            written = management.proxy.requests[("PATCH", budget)]

            async def rewritten() -> bool:
                return management.proxy.requests[("PATCH", budget)] >= written + 2

            assert await eventually(rewritten)

            statefulset = f"/apis/apps/v1/namespaces/{namespace}/statefulsets/etcd"
            old = await management.get(statefulset)
            assert old is not None
            await management.api.delete(statefulset)

            async def back() -> bool:
                found = await management.get(statefulset)
                return found is not None and found["metadata"]["uid"] != old["metadata"]["uid"]

            assert await eventually(back)

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
        owned_namespaces: list[str],
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
    ) -> None:
        name = unique("old")
        old_namespace = own(owned_namespaces, name)
        created = await create(api, name, spec=SMALL)
        await wait_cluster(api, created["id"], management_side_ready)
        await api.delete(f"/api/v1/clusters/{created['id']}")
        await wait_cluster(api, created["id"], lambda c: c.get("status") == 404)
        # Its namespace comes back (a restore of the management cluster, say); and a namespace
        # labelled for a cluster this provisioner never knew shows up.
        stranger_namespace = own(owned_namespaces, unique("stranger"))
        ours = {names.CLUSTER_ID_LABEL: created["id"], names.MANAGED_BY_LABEL: "nest"}
        theirs = {
            names.CLUSTER_ID_LABEL: f"someone-else-{uuid.uuid4().hex[:6]}",
            names.MANAGED_BY_LABEL: "nest",
        }
        for namespace, labels in ((old_namespace, ours), (stranger_namespace, theirs)):
            await management.api.create(
                "/api/v1/namespaces",
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": namespace, "labels": labels},
                },
            )
        await provisioner.resync()

        async def going() -> bool:
            found = await management.get(f"/api/v1/namespaces/{old_namespace}")
            return found is None or bool(found["metadata"].get("deletionTimestamp"))

        assert await eventually(going)
        stranger = await management.get(f"/api/v1/namespaces/{stranger_namespace}")
        assert stranger is not None and not stranger["metadata"].get("deletionTimestamp")


class TestLosses:
    async def test_a_ready_cluster_that_loses_its_control_plane_is_degraded(
        self,
        owned_namespaces: list[str],
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
    ) -> None:
        name = unique("wobbly")
        namespace = own(owned_namespaces, name)
        created = await create(api, name, labels=REAL, spec=SMALL)
        await wait_cluster(api, created["id"], phase("Ready"), timeout=120.0)
        deployment = (
            f"/apis/apps/v1/namespaces/{namespace}/deployments/{names.CONTROL_PLANE_DEPLOYMENT}"
        )

        async def available(count: int) -> bool:
            found = await management.get(deployment)
            assert found is not None
            return int((found.get("status") or {}).get("availableReplicas") or 0) == count

        # Its control plane goes (the pod deleted) and cannot come back (held Pending).
        await management.hold(namespace)
        for pod in await management.list(
            f"/api/v1/namespaces/{namespace}/pods", labelSelector=CONTROL_PLANE_PODS
        ):
            await management.api.delete(
                f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}"
            )
        assert await eventually(lambda: available(0))
        await provisioner.resync()
        # The tenant API may be reported unreachable first (its pod is gone before the
        # Deployment's status says so); then the lost replica is the reason.
        cluster = await wait_cluster(
            api,
            created["id"],
            lambda c: phase("Degraded")(c) and c["status"].get("reason") == "RollingOut",
        )
        assert condition(cluster, "ControlPlaneReady")["status"] == "False"

        await management.hold(namespace, held=False)
        assert await eventually(lambda: available(1), timeout=120.0)
        await provisioner.resync()
        await wait_cluster(api, created["id"], phase("Ready"))

    async def test_a_delete_during_an_outage_finishes_once_the_api_is_back(
        self,
        owned_namespaces: list[str],
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
    ) -> None:
        name = unique("stuck")
        namespace = own(owned_namespaces, name)
        created = await create(api, name, spec=SMALL)
        await wait_cluster(api, created["id"], management_side_ready)
        outage = management.proxy.fail("DELETE", "/namespaces/", status=503, times=None)
        await api.delete(f"/api/v1/clusters/{created['id']}")

        async def stuck() -> bool:
            record = await provisioner.store.get(created["id"])
            return record is not None and record.delete_requested and outage.hits >= 3

        assert await eventually(stuck)
        found = (await api.get(f"/api/v1/clusters/{created['id']}")).json()
        assert found["status"]["phase"] == "Deleting"
        assert await management.get(f"/api/v1/namespaces/{namespace}") is not None
        outage.times = 0
        await provisioner.resync()
        await wait_cluster(api, created["id"], lambda c: c.get("status") == 404)
        assert await management.objects(namespace) == {}


class TestNameReuse:
    async def test_a_new_cluster_with_a_deleted_ones_name_is_left_alone(
        self,
        owned_namespaces: list[str],
        api: httpx.AsyncClient,
        provisioner: ProvisionerService,
        management: Management,
    ) -> None:
        name = unique("reuse")
        namespace = own(owned_namespaces, name)
        first = await create(api, name, spec=SMALL)
        await wait_cluster(api, first["id"], management_side_ready)
        await api.delete(f"/api/v1/clusters/{first['id']}")
        await wait_cluster(api, first["id"], lambda c: c.get("status") == 404)
        second = await create(api, name, spec=SMALL)
        await wait_cluster(api, second["id"], management_side_ready)
        await provisioner.resync()  # the first one's tombstone must not touch the second
        ns = await management.get(f"/api/v1/namespaces/{namespace}")
        assert ns is not None and ns["status"]["phase"] == "Active"
        assert not ns["metadata"].get("deletionTimestamp")
        assert ns["metadata"]["labels"][names.CLUSTER_ID_LABEL] == second["id"]


class TestCrash:
    async def test_sigkill_mid_reconcile_then_restart_converges_without_duplicates(
        self,
        owned_namespaces: list[str],
        api: httpx.AsyncClient,
        nats_url: str,
        management: Management,
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
        # Writes of the etcd StatefulSet fail, so the first process gets through the Secrets
        # (written before it) and never to the control-plane Deployment (written after).
        blocked = management.proxy.fail("PATCH", "/statefulsets/", status=503, times=None)
        name = unique("crashy")
        namespace = own(owned_namespaces, name)
        first = provisioner_process(env, tmp_path / "first.log")
        try:
            created = await create(api, name, labels=REAL, spec=SMALL)

            async def mid_pass() -> bool:
                return blocked.hits >= 1

            assert await eventually(mid_pass), (tmp_path / "first.log").read_text()
            await stop_process(first, signal.SIGKILL)
        finally:
            await stop_process(first, signal.SIGKILL)
        deployment = (
            f"/apis/apps/v1/namespaces/{namespace}/deployments/{names.CONTROL_PLANE_DEPLOYMENT}"
        )
        assert await management.get(deployment) is None
        written = {
            s["metadata"]["name"]: s["metadata"]["uid"]
            for s in await management.list(f"/api/v1/namespaces/{namespace}/secrets")
        }
        assert names.SECRET_CA in written

        management.proxy.clear()
        second = provisioner_process(env, tmp_path / "second.log")
        try:
            cluster = await wait_cluster(api, created["id"], phase("Ready"), timeout=120.0)
        finally:
            await stop_process(second)
        # The subprocess reaches the tenant's real API, so the add-ons are there too.
        assert condition(cluster, "AddonsReady")["status"] == "True"
        objects = await management.objects(namespace)
        assert len([k for k in objects if k.startswith("secrets/")]) == 13
        assert objects[f"secrets/{names.SECRET_CA}"] == written[names.SECRET_CA]  # kept
        labelled = f"{names.CLUSTER_ID_LABEL}={created['id']}"
        for collection in (
            "/api/v1/namespaces",
            "/apis/apps/v1/deployments",
            "/apis/apps/v1/statefulsets",
        ):
            assert len(await management.list(collection, labelSelector=labelled)) == 1, collection
