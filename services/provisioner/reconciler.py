"""One reconcile pass for one cluster: bring the management cluster (and the tenant's add-ons)
to the intent, and observe how far the world got.

Level-triggered and idempotent: every pass renders everything, server-side applies it (a no-op
when nothing changed) and reads readiness from what the API server answers. Nothing here waits
for pods: a cluster that is not Ready yet is simply passed again later by the service.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from libs.common.clock import Clock, utcnow
from libs.common.contract.cluster import ClusterEndpoint, DeleteCluster, ReconcileCluster
from libs.common.contract.versions import UpgradeRefused, check_upgrade
from services.provisioner import addons, kube, manifests, names, pki, status
from services.provisioner.kube import KubeClient, KubeNotConfigured, KubeRejected, KubeUnavailable
from services.provisioner.store import ClusterRecord

log = logging.getLogger(__name__)

TENANT_CONNECTIONS = 4
"""Connections (and so concurrent requests) per tenant API during a pass."""
TENANT_BACKOFF_FIRST = 1.0
TENANT_BACKOFF_MAX = 60.0
"""Pause (seconds) before the add-ons of a cluster whose tenant API did not answer are tried
again: the first, doubled after each failure up to the last; passes in between skip them."""


@dataclass(frozen=True)
class ProvisionerConfig:
    """How the provisioner renders and reaches clusters (from `Settings`)."""

    kubeconfig: Path | None = None
    """The management cluster's kubeconfig; None: in-cluster config."""
    image_registry: str = "registry.k8s.io"
    renew_before: timedelta = pki.RENEW_BEFORE
    management_dns_domain: str = "cluster.local"
    node_address: str | None = None
    """Endpoint host of NodePort clusters."""
    retry: kube.Retry = field(default_factory=kube.Retry)
    """Retries of management-cluster requests."""
    tenant_retry: kube.Retry = field(
        default_factory=lambda: kube.Retry(attempts=1, timeout=5.0, connect_timeout=3.0)
    )
    """Retries of tenant requests: one try per pass, the next pass is the retry; connecting
    (TCP and TLS) is bounded apart, so a tenant that never answers costs little."""
    concurrency: int = 16
    """Passes against the management cluster at the same time; tenant add-on steps have as
    many slots of their own, so tenants that stall never hold up management passes."""
    delete_timeout_seconds: float = 30.0
    """How long a delete intent waits for the namespace to disappear; a namespace still
    terminating then is followed by the service until it is gone (the intent is done)."""
    tenant_credential_lifetime: timedelta = timedelta(hours=1)
    """Lifetime of the admin certificate the provisioner uses on tenant APIs."""


class ManagementCluster:
    """The management cluster's client, connected on first use."""

    def __init__(self, config: ProvisionerConfig) -> None:
        self.config = config
        self._client: KubeClient | None = None
        self._lock = asyncio.Lock()

    async def client(self) -> KubeClient:
        """The client; raises `KubeNotConfigured` while no management cluster is configured."""
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    self._client = await KubeClient.connect(
                        self.config.kubeconfig, retry=self.config.retry
                    )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


class TenantClients:
    """Admin clients of tenant APIs, each with a short-lived certificate from the cluster CA.

    A client lives for one pass only: keeping one per cluster would hold its connections and
    TLS state for every cluster the provisioner manages, which is what a pass costs anyway.
    """

    def __init__(self, config: ProvisionerConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock

    @contextlib.asynccontextmanager
    async def client(
        self, intent: ReconcileCluster, server: str, ca_secret: Mapping[str, bytes]
    ) -> AsyncIterator[KubeClient]:
        issued = pki.issue_admin_kubeconfig(
            ca_secret,
            cluster_name=intent.name,
            server_url=server,
            requester="provisioner",
            now=self.clock(),
            lifetime=self.config.tenant_credential_lifetime,
        )
        user = json.loads(issued.kubeconfig)["users"][0]["user"]
        # Synchronous on purpose: the client's connector binds to the running loop.
        client = KubeClient.with_client_certificate(
            server,
            ca_pem=ca_secret[pki.TLS_CRT],
            cert_pem=base64.b64decode(user["client-certificate-data"]),
            key_pem=base64.b64decode(user["client-key-data"]),
            retry=self.config.tenant_retry,
            connections=TENANT_CONNECTIONS,
        )
        try:
            yield client
        finally:
            await client.close()


def secret_hash(data: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for key in sorted(data):
        digest.update(key.encode() + b"\0" + data[key] + b"\0")
    return digest.hexdigest()


def _decode(secret: Mapping[str, Any]) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}


def _annotations(obj: Mapping[str, Any] | None) -> Mapping[str, str]:
    if not obj:
        return {}
    found: Mapping[str, str] = obj.get("metadata", {}).get("annotations") or {}
    return found


def statefulset_ready(obj: Mapping[str, Any], replicas: int) -> tuple[bool, str]:
    """Whether every etcd member runs the current revision and is ready."""
    observed = obj.get("status") or {}
    generation = obj.get("metadata", {}).get("generation")
    if generation is not None and observed.get("observedGeneration", 0) < generation:
        return False, "the etcd StatefulSet has not picked up its latest change yet"
    ready = int(observed.get("readyReplicas", 0))
    updated = int(observed.get("updatedReplicas", 0))
    if ready < replicas or updated < replicas:
        return False, f"{min(ready, updated)}/{replicas} etcd members ready on the current revision"
    return True, f"{ready}/{replicas} etcd members ready"


def deployment_rolled_out(obj: Mapping[str, Any], replicas: int) -> tuple[bool, str]:
    """Whether the control-plane Deployment finished rolling out with every replica available."""
    observed = obj.get("status") or {}
    generation = obj.get("metadata", {}).get("generation")
    if generation is not None and observed.get("observedGeneration", 0) < generation:
        return False, "the control-plane Deployment has not picked up its latest change yet"
    updated = int(observed.get("updatedReplicas", 0))
    available = int(observed.get("availableReplicas", 0))
    total = int(observed.get("replicas", 0))
    if updated < replicas or available < replicas or total > replicas:
        return False, (
            f"control plane rolling out: {updated}/{replicas} updated, "
            f"{available}/{replicas} available"
        )
    return True, f"{available}/{replicas} control-plane replicas available"


def _count(obj: Mapping[str, Any], field_name: str) -> int:
    return int((obj.get("status") or {}).get(field_name) or 0)


def control_plane_lost(obj: Mapping[str, Any], replicas: int, had: int) -> bool:
    """Whether the control plane has fewer available replicas than it had when last Ready
    (`had`), or than the spec asks for now if that is fewer: a loss, not a rollout.

    Rollouts surge first (maxUnavailable 0), so a scale or a template change never takes
    availability below that."""
    return _count(obj, "availableReplicas") < min(replicas, had)


def datastore_lost(obj: Mapping[str, Any], replicas: int, had: int) -> bool:
    """Whether fewer etcd members are ready than when the cluster was last Ready (`had`), or
    than the spec asks for now if that is fewer, beyond the one member a rolling update of
    the StatefulSet restarts at a time: a member gone, not a rollout."""
    observed = obj.get("status") or {}
    generation = (obj.get("metadata") or {}).get("generation")
    rolling = (
        (generation is not None and observed.get("observedGeneration", 0) < generation)
        or observed.get("updateRevision") != observed.get("currentRevision")
        or _count(obj, "updatedReplicas") < _count(obj, "replicas")
    )
    return _count(obj, "readyReplicas") < min(replicas, had) - (1 if rolling else 0)


def endpoint_of(
    intent: ReconcileCluster, service: Mapping[str, Any] | None, node_address: str | None
) -> tuple[ClusterEndpoint | None, str, str]:
    """The endpoint the Service offers now, or None with a reason and message why not yet."""
    if service is None:
        return None, "ServiceMissing", f"Service {names.API_SERVICE} does not exist yet"
    spec = service.get("spec") or {}
    if intent.spec.network.service_type == "NodePort":
        if spec.get("type") != "NodePort":
            return None, "ServiceTypeChanging", "the Service is changing to NodePort"
        if not node_address:
            return (
                None,
                "NodeAddressUnset",
                (
                    "NodePort clusters need a node address: set NEST_NODE_ADDRESS to an address "
                    "of a management-cluster node that workers can reach"
                ),
            )
        for port in spec.get("ports", []):
            if port.get("name") == "https" and port.get("nodePort"):
                return ClusterEndpoint(host=node_address, port=int(port["nodePort"])), "", ""
        return None, "NodePortPending", "the Service has no NodePort assigned yet"
    if spec.get("type") != "LoadBalancer":
        return None, "ServiceTypeChanging", "the Service is changing to LoadBalancer"
    for ingress in (service.get("status") or {}).get("loadBalancer", {}).get("ingress") or []:
        host = ingress.get("ip") or ingress.get("hostname")
        if host:
            return ClusterEndpoint(host=str(host), port=names.API_PORT), "", ""
    return (
        None,
        "WaitingForLoadBalancer",
        (f"the load balancer has not given Service {names.API_SERVICE} an address yet"),
    )


def service_cluster_ips(service: Mapping[str, Any]) -> list[str]:
    """The ClusterIPs of a Service (`spec.clusterIPs`, else `spec.clusterIP`); none if headless."""
    spec = service.get("spec") or {}
    found = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    return [str(ip) for ip in found if ip and ip != "None"]


def _live_node_ports(service: Mapping[str, Any] | None) -> dict[str, int]:
    """Port name -> NodePort of the live endpoint Service, if it is a NodePort Service."""
    if not service or (service.get("spec") or {}).get("type") != "NodePort":
        return {}
    found = {}
    for port in service["spec"].get("ports", []):
        node_port = port.get("nodePort")
        if node_port and manifests.NODE_PORT_MIN <= int(node_port) <= manifests.NODE_PORT_MAX:
            found[str(port.get("name"))] = int(node_port)
    return found


def _node_ports(
    cluster_id: str, live: Mapping[str, int], attempt: int
) -> tuple[int | None, int | None]:
    """The NodePorts to render: what the live Service holds (a port that works never moves),
    else, after `attempt` collisions, the next ports of the stable probe sequence."""
    api, konnectivity = live.get("https"), live.get("konnectivity")
    if attempt and api is None:
        api = manifests.stable_node_port(cluster_id, "apiserver", attempt)
    if attempt and konnectivity is None:
        konnectivity = manifests.stable_node_port(cluster_id, "konnectivity", attempt)
        if konnectivity == api:
            konnectivity = manifests.stable_node_port(cluster_id, "konnectivity", attempt + 100)
    return api, konnectivity


@dataclass(frozen=True)
class _Applied:
    """What this process last applied at one REST path."""

    digest: bytes
    """A digest of the rendered object."""
    version: str | None
    """The resourceVersion the API server answered the apply with."""


@dataclass(frozen=True)
class _AddonsDue:
    """What the tenant add-ons of a pass need once the control plane is ready."""

    endpoint: ClusterEndpoint
    ca_secret: Mapping[str, bytes]
    konnectivity_port: int


@dataclass(frozen=True)
class _TenantBackoff:
    """A tenant API that did not answer, and when its add-ons may be tried again."""

    url: str
    delay: float
    until: float
    """`time.monotonic()` after which the next try is due."""
    message: str


class _PortTaken(Exception):
    """The management cluster refused the endpoint Service's NodePort: another holds it."""


NODE_PORT_ATTEMPTS = 8
"""NodePort pairs tried before a cluster is reported Failed (NodePortUnavailable)."""


class Reconciler:
    """Reconcile and delete passes against the management cluster and tenant APIs."""

    def __init__(self, config: ProvisionerConfig, clock: Clock = utcnow) -> None:
        self.config = config
        self.clock = clock
        self.management = ManagementCluster(config)
        self.tenants = TenantClients(config, clock)
        self._applied: dict[str, dict[str, _Applied]] = {}
        """Cluster id -> REST path -> what was last applied there. A pass that would apply
        the same again skips the write (a resync forces it, to heal drift)."""
        self._management_slots = asyncio.Semaphore(config.concurrency)
        self._tenant_slots = asyncio.Semaphore(config.concurrency)
        self._tenant_applied: dict[str, dict[str, bytes]] = {}
        """Cluster id -> tenant REST path -> digest of what was last applied there: a pass
        applies only tenant objects whose rendering changed (the resync applies them all)."""
        self._tenant_backoff: dict[str, _TenantBackoff] = {}
        """Cluster id -> when its add-ons may be tried again after its tenant API failed."""
        self._addons_were_due: dict[str, bool] = {}
        """Cluster id -> whether its last pass found the control plane ready at its endpoint."""
        self._suspects: dict[str, dict[str, str | None]] = {}
        """Cluster id -> REST path -> resourceVersion of a change a watch reported (None:
        deleted); checked against `_applied` at the start of the cluster's next pass."""

    async def close(self) -> None:
        await self.management.close()

    def suspect(self, cluster_id: str, path: str, version: str | None) -> None:
        """A watch saw the object at `path` deleted (`version` None) or its content changed
        at `version`: unless that was this process's own write, the next pass applies it
        again instead of trusting what it applied before."""
        if path in self._applied.get(cluster_id, {}):
            self._suspects.setdefault(cluster_id, {})[path] = version

    def _drop_stale(self, cluster_id: str) -> None:
        """Forget what was applied to objects changed by someone else since (see `suspect`).

        Checked at the start of a pass rather than when the watch event arrives: the event of
        this process's own write may arrive before the write's answer is recorded."""
        suspects = self._suspects.pop(cluster_id, {})
        applied = self._applied.get(cluster_id, {})
        for path, version in suspects.items():
            entry = applied.get(path)
            if entry is not None and (version is None or version != entry.version):
                del applied[path]

    async def reconcile(
        self, intent: ReconcileCluster, record: ClusterRecord, *, force: bool = False
    ) -> status.Observation:
        """One pass; updates `record` (applied, upgrade_from, endpoint) as a side effect.

        `force` re-applies every object even if this process applied the same before (the
        resync does, so objects deleted or changed behind Nest's back come back). The
        management part and the tenant add-ons take a slot each of their own concurrency.
        """
        if force:
            self._tenant_applied.pop(intent.cluster_id, None)
        async with self._management_slots:
            observation, addons_due = await self._reconcile_management(intent, record, force)
        due_before = self._addons_were_due.get(intent.cluster_id, False)
        self._addons_were_due[intent.cluster_id] = addons_due is not None
        if addons_due is not None and not due_before:
            # A control plane that has just (again) become ready at its endpoint is tried at
            # once: failures while it rolled out say nothing about it now.
            self._tenant_backoff.pop(intent.cluster_id, None)
        if addons_due is not None and not self._addons_paused(intent, addons_due, observation):
            async with self._tenant_slots:
                await self._reconcile_addons(intent, addons_due, observation)
        return observation

    def _addons_paused(
        self, intent: ReconcileCluster, due: _AddonsDue, observation: status.Observation
    ) -> bool:
        """Whether the cluster's tenant API failed lately and its add-ons wait for their next
        try (reported as that failure); a new endpoint ends the pause."""
        backoff = self._tenant_backoff.get(intent.cluster_id)
        if backoff is None or backoff.url != due.endpoint.url:
            return False
        if time.monotonic() >= backoff.until:
            return False
        observation.set(status.ADDONS, False, "TenantAPIUnavailable", backoff.message)
        return True

    async def _reconcile_management(
        self, intent: ReconcileCluster, record: ClusterRecord, force: bool
    ) -> tuple[status.Observation, _AddonsDue | None]:
        """The management cluster's part of a pass, and the add-ons to apply if it is ready."""
        if force:
            self._applied.pop(intent.cluster_id, None)
            self._suspects.pop(intent.cluster_id, None)
        else:
            self._drop_stale(intent.cluster_id)
        observation = status.Observation(
            intent.cluster_id, intent.generation, was_ready=record.was_ready
        )
        try:
            client = await self.management.client()
        except KubeNotConfigured as exc:
            observation.not_configured = True
            observation.set(status.MANAGEMENT, False, "NotConfigured", str(exc))
            observation.unknown_from(
                status.PKI, "ManagementClusterUnavailable", "waiting for a management cluster"
            )
            return observation, None
        addons_due: _AddonsDue | None = None
        try:
            for attempt in range(NODE_PORT_ATTEMPTS):
                try:
                    addons_due = await self._reconcile(client, intent, record, observation, attempt)
                    break
                except _PortTaken:
                    log.info("NodePort taken; trying the next", extra=_ids(intent))
                    observation = status.Observation(
                        intent.cluster_id, intent.generation, was_ready=record.was_ready
                    )
            else:
                observation.failure = (
                    "NodePortUnavailable",
                    f"{NODE_PORT_ATTEMPTS} NodePort pairs were all taken in the management "
                    "cluster; free some or use a LoadBalancer",
                )
                observation.set(status.MANAGEMENT, True, "Available")
                observation.unknown_from(status.PKI, "NodePortUnavailable", "")
                return observation, None
        except KubeUnavailable as exc:
            addons_due = None
            observation.checks.clear()
            observation.set(
                status.MANAGEMENT,
                False,
                "Unavailable",
                f"the management cluster's API does not answer; retrying: {exc}",
            )
            observation.unknown_from(
                status.PKI, "ManagementClusterUnavailable", "waiting for the management API"
            )
        except KubeRejected as exc:
            addons_due = None
            observation.failure = ("Rejected", f"the management cluster refused a change: {exc}")
            observation.unknown_from(status.PKI, "Rejected", str(exc))
        return observation, addons_due

    async def _reconcile(
        self,
        client: KubeClient,
        intent: ReconcileCluster,
        record: ClusterRecord,
        observation: status.Observation,
        port_attempt: int = 0,
    ) -> _AddonsDue | None:
        """The management objects of one render; the add-ons to apply if they are due."""
        namespace = names.namespace_for(intent.name)
        deployment_path = (
            f"/apis/apps/v1/namespaces/{namespace}/deployments/{names.CONTROL_PLANE_DEPLOYMENT}"
        )
        service_path = f"/api/v1/namespaces/{namespace}/services/{names.API_SERVICE}"
        live_deployment, live_service = await asyncio.gather(
            client.get(deployment_path), client.get(service_path)
        )
        observation.set(status.MANAGEMENT, True, "Available", f"{client.server} answers")

        deployed = _annotations(live_deployment).get(manifests.VERSION_ANNOTATION)
        target = intent.spec.kubernetes_version
        if deployed and deployed != target:
            try:
                check_upgrade(deployed, target)
            except UpgradeRefused as exc:
                observation.failure = (
                    "UpgradeRefused",
                    f"{exc}; the control plane keeps running {deployed}",
                )
                observation.unknown_from(status.PKI, "UpgradeRefused", str(exc))
                return None
            record.upgrade_from = deployed

        api_port, konnectivity_port = _node_ports(
            intent.cluster_id, _live_node_ports(live_service), port_attempt
        )
        base = manifests.RenderSettings(
            image_registry=self.config.image_registry,
            node_port=api_port,
            konnectivity_node_port=konnectivity_port,
        )
        namespace_object = manifests.namespace(intent)
        await self._apply(client, intent.cluster_id, namespace_object, need_answer=False)
        record.applied = True

        # The Services first: the certificates and the advertise address name the addresses
        # the endpoint Service has now (its load balancer's or node's, and its ClusterIPs).
        applied: dict[tuple[str, str], dict[str, Any]] = {}
        for obj in manifests.render_cluster(intent, base)[1:]:
            if obj["kind"] == "Service":
                await self._apply_rendered(client, intent.cluster_id, obj, applied)
        service = applied[("Service", names.API_SERVICE)]
        endpoint, endpoint_reason, endpoint_message = endpoint_of(
            intent, service, self.config.node_address
        )

        secrets = await self._reconcile_pki(
            client, intent, endpoint, service_cluster_ips(service), base, observation
        )
        hashes = {name: secret_hash(data) for name, data in secrets.items()}
        render = manifests.RenderSettings(
            image_registry=base.image_registry,
            node_port=base.node_port,
            konnectivity_node_port=base.konnectivity_node_port,
            endpoint_host=endpoint.host if endpoint else None,
            secret_hashes=hashes,
        )
        # A new control plane waits for its load balancer's address: started before it, it
        # would advertise its pod IP and serve a certificate without the address, and roll
        # again (every pod restarted) as soon as the address arrived.
        hold_control_plane = (
            endpoint is None
            and live_deployment is None
            and intent.spec.network.service_type == "LoadBalancer"
        )
        for obj in manifests.render_cluster(intent, render)[1:]:
            if obj["kind"] == "Service":
                continue
            if hold_control_plane and obj["kind"] == "Deployment":
                continue
            await self._apply_rendered(client, intent.cluster_id, obj, applied)

        # What the cluster had when last Ready tells a change rolling out from a loss.
        had = record.ready_capacity or status.Capacity.of(intent.spec)
        etcd = applied[("StatefulSet", names.ETCD_STATEFULSET)]
        ok, message = statefulset_ready(etcd, intent.spec.datastore.replicas)
        observation.set(
            status.DATASTORE, ok, "MembersReady" if ok else "WaitingForMembers", message
        )
        datastore_ok = ok
        if not ok and not datastore_lost(etcd, intent.spec.datastore.replicas, had.datastore):
            observation.changing.add(status.DATASTORE)

        control_plane = applied.get(("Deployment", names.CONTROL_PLANE_DEPLOYMENT), {})
        if hold_control_plane:
            ok, message = False, "waiting for the endpoint's address to start the control plane"
        else:
            ok, message = deployment_rolled_out(control_plane, intent.spec.control_plane.replicas)
        control_plane_ok = ok and datastore_ok
        if ok and not datastore_ok:
            message = f"{message}; waiting for etcd"
        observation.set(
            status.CONTROL_PLANE,
            control_plane_ok,
            "RolledOut" if control_plane_ok else "RollingOut",
            message,
        )
        etcd_kept = datastore_ok or status.DATASTORE in observation.changing
        replicas_kept = ok or not control_plane_lost(
            control_plane, intent.spec.control_plane.replicas, had.control_plane
        )
        if not control_plane_ok and etcd_kept and replicas_kept:
            observation.changing.add(status.CONTROL_PLANE)
        if record.upgrade_from is not None:
            if control_plane_ok:
                log.info(
                    "cluster upgraded",
                    extra={"clusterId": intent.cluster_id, "from": record.upgrade_from},
                )
                record.upgrade_from = None
            else:
                observation.upgrading = True

        if endpoint is None:
            observation.set(status.ENDPOINT, False, endpoint_reason, endpoint_message)
            if had.service_type != intent.spec.network.service_type:
                observation.changing.add(status.ENDPOINT)  # a new type needs a new address
        else:
            observation.set(status.ENDPOINT, True, "Assigned", endpoint.url)
        observation.endpoint = endpoint
        record.endpoint = endpoint

        if endpoint is None or not control_plane_ok:
            observation.set(
                status.ADDONS,
                False,
                "WaitingForControlPlane",
                "add-ons are installed once the control plane is ready at its endpoint",
            )
            waiting_for = {
                type_
                for type_ in (status.CONTROL_PLANE, status.ENDPOINT)
                if observation.checks[type_].status != "True"
            }
            if waiting_for <= observation.changing:
                observation.changing.add(status.ADDONS)
            return None
        return _AddonsDue(
            endpoint, secrets[names.SECRET_CA], manifests.konnectivity_port(intent, render)
        )

    async def _apply_rendered(
        self,
        client: KubeClient,
        cluster_id: str,
        obj: Mapping[str, Any],
        applied: dict[tuple[str, str], dict[str, Any]],
    ) -> None:
        """`_apply` one rendered object; what the API server answers for the objects a pass
        reads (`_OBSERVED`) goes into `applied`."""
        key = (obj["kind"], obj["metadata"]["name"])
        try:
            answer = await self._apply(client, cluster_id, obj, need_answer=key in _OBSERVED)
        except KubeRejected as exc:
            if key == ("Service", names.API_SERVICE) and "already allocated" in str(exc):
                raise _PortTaken from exc
            raise
        if answer is not None:
            applied[key] = answer

    async def _apply(
        self,
        client: KubeClient,
        cluster_id: str,
        obj: Mapping[str, Any],
        *,
        need_answer: bool,
    ) -> dict[str, Any] | None:
        """Server-side apply `obj` unless this process applied exactly it before; then only
        read it back if the caller needs its status (or recreate it if it went away)."""
        path = manifests.resource_path(obj)
        digest = _digest(obj)
        applied = self._applied.setdefault(cluster_id, {})
        known = applied.get(path)
        if known is not None and known.digest == digest:
            if not need_answer:
                return None
            live = await client.get(path)
            if live is not None:
                return live
        answer = await client.apply(path, obj)
        version = (answer.get("metadata") or {}).get("resourceVersion")
        applied[path] = _Applied(digest, str(version) if version else None)
        return answer

    async def _reconcile_pki(
        self,
        client: KubeClient,
        intent: ReconcileCluster,
        endpoint: ClusterEndpoint | None,
        service_ips: Sequence[str],
        render: manifests.RenderSettings,
        observation: status.Observation,
    ) -> dict[str, dict[str, bytes]]:
        namespace = names.namespace_for(intent.name)
        labels = manifests.cluster_labels(intent, manifests.COMPONENT_PKI)
        listed = await client.list(
            f"/api/v1/namespaces/{namespace}/secrets",
            labels={
                names.CLUSTER_ID_LABEL: intent.cluster_id,
                names.COMPONENT_LABEL: manifests.COMPONENT_PKI,
            },
        )
        existing = {item["metadata"]["name"]: _decode(item) for item in listed}
        inputs = pki.PKIInputs.for_cluster(
            intent.name,
            intent.spec,
            endpoint_hosts=[endpoint.host] if endpoint else [],
            service_ips=service_ips,
            management_dns_domain=self.config.management_dns_domain,
            apiserver_port=manifests.apiserver_port(intent, render),
        )
        result = await asyncio.to_thread(
            pki.reconcile_pki,
            existing,
            inputs,
            now=self.clock(),
            renew_before=self.config.renew_before,
        )
        to_write = [
            name
            for name, data in result.secrets.items()
            if name in result.report.changed or existing.get(name) != data
        ]
        await asyncio.gather(
            *(
                self._apply_secret(client, namespace, name, result.secrets[name], labels)
                for name in to_write
            )
        )
        message = "every certificate is current"
        if result.report.changes:
            message = "; ".join(
                f"{change.name} {change.action} ({change.reason})"
                for change in result.report.changes
            )[:1000]
        if result.report.expiring_cas:
            message = (
                f"CA {', '.join(result.report.expiring_cas)} expires soon and needs a rotation"
            )
        observation.set(status.PKI, True, "Issued", message)
        return result.secrets

    @staticmethod
    async def _apply_secret(
        client: KubeClient,
        namespace: str,
        name: str,
        data: Mapping[str, bytes],
        labels: Mapping[str, str],
    ) -> None:
        obj = manifests.secret(
            namespace, name, data, pki.SECRET_TYPES[name] == pki.SECRET_TYPE_TLS, labels
        )
        await client.apply(manifests.resource_path(obj), obj)

    async def _reconcile_addons(
        self, intent: ReconcileCluster, due: _AddonsDue, observation: status.Observation
    ) -> None:
        endpoint, ca_secret = due.endpoint, due.ca_secret
        backoff = self._tenant_backoff.get(intent.cluster_id)
        if backoff is not None and backoff.url != endpoint.url:
            backoff = None
        objects = addons.render_addons(
            intent,
            addons.AddonInputs(
                endpoint_host=endpoint.host,
                endpoint_port=endpoint.port,
                ca_pem=ca_secret[pki.TLS_CRT],
                image_registry=self.config.image_registry,
                konnectivity_port=due.konnectivity_port,
            ),
        )
        # Only what changed since this process applied it (the resync applies everything).
        applied = self._tenant_applied.setdefault(intent.cluster_id, {})
        digests = {manifests.resource_path(obj): _digest(obj) for obj in objects}
        changed = [
            obj
            for obj in objects
            if applied.get(path := manifests.resource_path(obj)) != digests[path]
        ]

        def done(path: str) -> None:
            applied[path] = digests[path]

        try:
            async with self.tenants.client(intent, endpoint.url, ca_secret) as tenant:
                await tenant.ping()  # AddonsReady also says that the tenant API answers
                await apply_in_order(tenant, changed, concurrency=TENANT_CONNECTIONS, done=done)
        except KubeUnavailable as exc:
            delay = (
                TENANT_BACKOFF_FIRST
                if backoff is None
                else min(backoff.delay * 2, TENANT_BACKOFF_MAX)
            )
            message = (
                f"waiting for the cluster's API at {endpoint.url}: {exc}; retrying in {delay:g} s"
            )
            self._tenant_backoff[intent.cluster_id] = _TenantBackoff(
                endpoint.url, delay, time.monotonic() + delay, message
            )
            observation.set(status.ADDONS, False, "TenantAPIUnavailable", message)
            return
        except KubeRejected as exc:
            self._tenant_backoff.pop(intent.cluster_id, None)
            observation.set(status.ADDONS, False, "Rejected", f"the tenant API refused: {exc}")
            return
        self._tenant_backoff.pop(intent.cluster_id, None)
        observation.set(status.ADDONS, True, "Applied", f"{len(objects)} tenant objects applied")

    async def delete(self, intent: DeleteCluster, *, wait: float | None = None) -> bool:
        """Delete the cluster's namespace, unless its deletion is under way already, and wait
        up to `wait` seconds (default: the delete timeout) for it to be gone.

        True once it is gone (or is not this cluster's: gone already, or a newer cluster's of
        the same name); False while it is still terminating: its content is being removed or
        a finalizer holds it, and the deletion only needs time. A namespace with a
        `deletionTimestamp` is not deleted again, and a 409 Conflict answer (the API server's
        "the system is ensuring all content is removed from this namespace", for a namespace
        someone else deleted meanwhile) means the same: under way. Raises `KubeUnavailable`
        when the API does not answer and `KubeNotConfigured` without a management cluster.
        """
        client = await self.management.client()
        self._applied.pop(intent.cluster_id, None)
        self._suspects.pop(intent.cluster_id, None)
        self._tenant_backoff.pop(intent.cluster_id, None)
        self._addons_were_due.pop(intent.cluster_id, None)
        self._tenant_applied.pop(intent.cluster_id, None)
        path = f"/api/v1/namespaces/{names.namespace_for(intent.name)}"
        found = await client.get(path)
        if not _labelled_for(found, intent.cluster_id):
            return True
        assert found is not None
        uid = found["metadata"].get("uid")
        if not found["metadata"].get("deletionTimestamp"):
            await _delete_namespace(client, path)
        deadline = time.monotonic() + (self.config.delete_timeout_seconds if wait is None else wait)
        pause = 0.05
        while True:
            current = await client.get(path)
            if current is None or current["metadata"].get("uid") != uid:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 2.0)

    async def admin_kubeconfig(
        self, record: ClusterRecord, requester: str, lifetime: timedelta
    ) -> pki.IssuedKubeconfig:
        """A short-lived admin kubeconfig for the cluster of `record`, signed by its CA.

        Raises `LookupError` when the CA Secret does not exist, `KubeNotConfigured` /
        `KubeUnavailable` when the management cluster cannot be asked, and the PKI errors.
        """
        if record.endpoint is None:
            raise KubeUnavailable("the cluster has no endpoint yet")
        client = await self.management.client()
        namespace = names.namespace_for(record.name)
        found = await client.get(f"/api/v1/namespaces/{namespace}/secrets/{names.SECRET_CA}")
        if found is None:
            raise LookupError(f"cluster {record.name!r} has no CA yet")
        return pki.issue_admin_kubeconfig(
            _decode(found),
            cluster_name=record.name,
            server_url=record.endpoint.url,
            requester=requester,
            now=self.clock(),
            lifetime=lifetime,
        )

    async def etcd_client(
        self, record: ClusterRecord, requester: str, lifetime: timedelta
    ) -> tuple[str, pki.IssuedCertificate]:
        """The etcd client URL of the cluster of `record` and a short-lived client certificate
        from its etcd CA, for a one-off job such as a snapshot.

        Raises `LookupError` without an etcd CA, `KubeUnavailable` while etcd is not ready,
        `KubeNotConfigured` without a management cluster, and the PKI errors.
        """
        datastore = next((c for c in record.conditions if c.type == status.DATASTORE), None)
        if datastore is None or datastore.status != "True":
            raise KubeUnavailable(f"the etcd of cluster {record.name!r} is not ready yet")
        client = await self.management.client()
        namespace = names.namespace_for(record.name)
        found = await client.get(f"/api/v1/namespaces/{namespace}/secrets/{names.SECRET_ETCD_CA}")
        if found is None:
            raise LookupError(f"cluster {record.name!r} has no etcd CA yet")
        issued = pki.issue_etcd_client(
            _decode(found),
            common_name=f"nest:{requester}"[:64],
            now=self.clock(),
            lifetime=lifetime,
        )
        host = f"{names.ETCD_HEADLESS_SERVICE}.{namespace}.svc.{self.config.management_dns_domain}"
        return f"https://{host}:{names.ETCD_CLIENT_PORT}", issued

    async def remove_leftovers(self, record: ClusterRecord) -> bool:
        """Delete the namespace of a cluster whose deletion is confirmed, if it is still that
        cluster's (a new cluster may have reused the name); True if one was deleted."""
        client = await self.management.client()
        path = f"/api/v1/namespaces/{names.namespace_for(record.name)}"
        found = await client.get(path)
        if not _labelled_for(found, record.cluster_id):
            return False
        assert found is not None
        if found["metadata"].get("deletionTimestamp"):
            return False  # under way already
        return await _delete_namespace(client, path)

    async def labelled_namespaces(self) -> list[tuple[str, str]]:
        """(namespace, cluster id) of every namespace Nest labelled for a cluster."""
        client = await self.management.client()
        found = await client.list(
            "/api/v1/namespaces", labels={names.MANAGED_BY_LABEL: names.MANAGED_BY}
        )
        result = []
        for item in found:
            labels = item.get("metadata", {}).get("labels") or {}
            if names.CLUSTER_ID_LABEL in labels:
                result.append((item["metadata"]["name"], labels[names.CLUSTER_ID_LABEL]))
        return result


def _labelled_for(namespace: Mapping[str, Any] | None, cluster_id: str) -> bool:
    """Whether `namespace` exists and is labelled for cluster `cluster_id`."""
    labels = (namespace or {}).get("metadata", {}).get("labels") or {}
    return bool(labels.get(names.CLUSTER_ID_LABEL) == cluster_id)


async def _delete_namespace(client: KubeClient, path: str) -> bool:
    """Delete the namespace at `path`; True if this request started its deletion.

    A namespace already terminating answers 409 Conflict while its content is being
    removed: its deletion is under way, which is what was asked for.
    """
    try:
        return await client.delete(path)
    except KubeRejected as exc:
        if exc.status == 409:
            return False
        raise


def _ids(intent: ReconcileCluster) -> dict[str, object]:
    return {"clusterId": intent.cluster_id, "generation": intent.generation}


_CLUSTER_SCOPED = frozenset({"ClusterRole", "ClusterRoleBinding", "Namespace"})
_OBSERVED = frozenset(
    {
        ("StatefulSet", names.ETCD_STATEFULSET),
        ("Deployment", names.CONTROL_PLANE_DEPLOYMENT),
        ("Service", names.API_SERVICE),
    }
)
"""Objects whose status a pass reads."""


def _digest(obj: Mapping[str, Any]) -> bytes:
    """A digest of a rendered object, to tell whether it is what was applied before."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).digest()


async def apply_in_order(
    client: KubeClient,
    objects: Sequence[Mapping[str, Any]],
    *,
    concurrency: int,
    done: Callable[[str], None] | None = None,
) -> None:
    """Cluster-scoped objects first, then the rest; each group `concurrency` at a time.
    `done(path)` is called for each object applied (also when another one fails)."""
    limit = asyncio.Semaphore(concurrency)

    async def apply(obj: Mapping[str, Any]) -> None:
        path = manifests.resource_path(obj)
        async with limit:
            await client.apply(path, obj)
        if done is not None:
            done(path)

    first = [obj for obj in objects if obj["kind"] in _CLUSTER_SCOPED]
    rest = [obj for obj in objects if obj["kind"] not in _CLUSTER_SCOPED]
    for group in (first, rest):
        await asyncio.gather(*(apply(obj) for obj in group))
