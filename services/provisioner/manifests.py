"""Kubernetes objects for one hosted control plane, rendered from its cluster spec.

Pure functions: a `ReconcileCluster` intent and `RenderSettings` go in, plain JSON-ready dicts
come out. Nothing here reads a clock, a file or the network, so the same input always renders
the same objects and the applier can server-side-apply them on every resync without churn.

What one cluster gets, in its own namespace of the management cluster:

- etcd: a headless Service and a StatefulSet (one PersistentVolumeClaim per member);
- the control plane: one Deployment whose pods run kube-apiserver, kube-controller-manager,
  kube-scheduler and, with the konnectivity add-on, the konnectivity server (plus the API
  server's egress-selector ConfigMap);
- the endpoint Service (LoadBalancer or NodePort) that workers and users reach the API at;
- PodDisruptionBudgets for etcd and the control plane.

The certificates come from `services.provisioner.pki` as Secret data; `secret()` wraps them.
Apply order: the Namespace (first item of `render_cluster`), then the Services (their
rendering needs no Secret, and the API server's certificate names the endpoint Service's
addresses), then the PKI Secrets, then the rest of `render_cluster` in list order. Pods would
wait for a missing Secret rather than fail, but their checksum annotation
(`RenderSettings.secret_hashes`) describes Secrets that must already be there.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from libs.common.contract.cluster import ReconcileCluster
from libs.common.contract.versions import release
from services.provisioner import names

Manifest = dict[str, Any]
"""One Kubernetes object as JSON-ready data."""

COMPONENT_NAMESPACE = "namespace"
COMPONENT_PKI = "pki"
COMPONENT_ETCD = "etcd"
COMPONENT_CONTROL_PLANE = "control-plane"
COMPONENT_ENDPOINT = "endpoint"

CHECKSUM_ANNOTATION = "nest.io/pki-checksum"
"""On pod templates: a digest of the Secrets the pods mount, so a rotation rolls them."""
GENERATION_ANNOTATION = "nest.io/generation"
"""On every object: the cluster generation it was rendered for."""
VERSION_ANNOTATION = "nest.io/kubernetes-version"
"""On the control-plane Deployment: the Kubernetes version it runs, the base of upgrade checks."""

NODE_PORT_MIN = 30000
NODE_PORT_MAX = 32767
"""Kubernetes' default `--service-node-port-range`, both ends included."""

ETCD_METRICS_PORT = 2381
CONTROLLER_MANAGER_PORT = 10257
SCHEDULER_PORT = 10259
KONNECTIVITY_ADMIN_PORT = 8133
KONNECTIVITY_HEALTH_PORT = 8134

PKI_DIR = "/etc/kubernetes/pki"
ETCD_PKI_DIR = f"{PKI_DIR}/etcd"
KUBECONFIG_DIR = "/etc/kubernetes/kubeconfig"
EGRESS_DIR = "/etc/kubernetes/egress"
EGRESS_FILE = "egress-selector-configuration.yaml"
KONNECTIVITY_UDS_DIR = "/run/konnectivity"
KONNECTIVITY_UDS = f"{KONNECTIVITY_UDS_DIR}/konnectivity-server.socket"
ETCD_DATA_MOUNT = "/var/lib/etcd"

KONNECTIVITY_AGENT_NAMESPACE = "kube-system"
KONNECTIVITY_AGENT_SERVICE_ACCOUNT = "konnectivity-agent"
KONNECTIVITY_AUDIENCE = "system:konnectivity-server"
"""Audience of the agents' tokens; the tenant add-on's agent DaemonSet must request it."""

_SECRET_FILE_MODE = 0o400  # every container runs as root, as kubeadm's static pods do
_TLS_KEYS = ("tls.crt", "tls.key")
_SECRET_KEY = "kubeconfig"


@dataclass(frozen=True)
class Resources:
    """Requests (and an optional memory limit) for one container, as Kubernetes quantities.

    No CPU limit on purpose: throttling an API server or etcd turns load into timeouts and
    leader-election loss, while the CPU request already guarantees its share.
    """

    cpu: str
    """CPU request, e.g. `250m`."""
    memory: str
    """Memory request, e.g. `512Mi`."""
    memory_limit: str | None = None
    """Memory limit; unset lets the container use free memory on the node."""

    def render(self) -> Manifest:
        rendered: Manifest = {"requests": {"cpu": self.cpu, "memory": self.memory}}
        if self.memory_limit is not None:
            rendered["limits"] = {"memory": self.memory_limit}
        return rendered


@dataclass(frozen=True)
class RenderSettings:
    """Appliance-wide and per-reconcile inputs that are not part of the cluster spec."""

    image_registry: str = "registry.k8s.io"
    """Registry (and path prefix) every image is pulled from, e.g. a customer's airgap mirror."""
    etcd_resources: Resources = Resources(cpu="100m", memory="256Mi")
    apiserver_resources: Resources = Resources(cpu="250m", memory="512Mi")
    controller_manager_resources: Resources = Resources(cpu="100m", memory="128Mi")
    scheduler_resources: Resources = Resources(cpu="50m", memory="64Mi")
    konnectivity_resources: Resources = Resources(cpu="50m", memory="64Mi")
    node_port: int | None = None
    """NodePort of the API; unset derives `stable_node_port(cluster_id, "apiserver")`. Pass
    the live Service's port once it exists, so a port that works never moves."""
    konnectivity_node_port: int | None = None
    """NodePort of the konnectivity server; unset derives one distinct from the API's."""
    endpoint_host: str | None = None
    """Address clients reach the API at (load-balancer IP or node address) once known."""
    secret_hashes: Mapping[str, str] = field(default_factory=dict)
    """Secret name -> a digest of its data; feeds the pod templates' checksum annotations."""
    service_annotations: Mapping[str, str] = field(default_factory=dict)
    """Extra annotations on the endpoint Service, e.g. a MetalLB address pool."""
    priority_class_name: str | None = None
    """PriorityClass for etcd and control-plane pods; unset uses the cluster default."""

    def __post_init__(self) -> None:
        for name in ("node_port", "konnectivity_node_port"):
            port = getattr(self, name)
            if port is not None and not NODE_PORT_MIN <= port <= NODE_PORT_MAX:
                raise ValueError(
                    f"{name} {port} is outside the NodePort range {NODE_PORT_MIN}-{NODE_PORT_MAX}"
                )
        if self.node_port is not None and self.node_port == self.konnectivity_node_port:
            raise ValueError(f"node_port and konnectivity_node_port are both {self.node_port}")


class ObjectRef(NamedTuple):
    """What the applier needs to address one rendered object."""

    api_version: str
    kind: str
    namespace: str | None
    name: str


_PLURALS: Mapping[str, str] = {
    "Namespace": "namespaces",
    "Secret": "secrets",
    "ConfigMap": "configmaps",
    "Service": "services",
    "StatefulSet": "statefulsets",
    "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "ServiceAccount": "serviceaccounts",
    "DaemonSet": "daemonsets",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "Job": "jobs",
}


# Whole cluster


def render_cluster(intent: ReconcileCluster, settings: RenderSettings) -> list[Manifest]:
    """Every object of the cluster except its Secrets.

    The Namespace comes first; apply the Services next, then the PKI Secrets (`secret()`),
    then the rest in order: ConfigMaps, the etcd StatefulSet, the Deployment, the budgets.
    """
    objects: list[Manifest] = [namespace(intent)]
    if intent.spec.addons.konnectivity.enabled:
        objects.append(egress_selector_configmap(intent))
    return [
        *objects,
        etcd_headless_service(intent),
        endpoint_service(intent, settings),
        etcd_statefulset(intent, settings),
        control_plane_deployment(intent, settings),
        etcd_disruption_budget(intent),
        control_plane_disruption_budget(intent),
    ]


# Labels and metadata


def cluster_labels(intent: ReconcileCluster, component: str) -> dict[str, str]:
    """The labels every object of the cluster carries; the applier prunes by them."""
    return {
        names.CLUSTER_ID_LABEL: intent.cluster_id,
        names.CLUSTER_NAME_LABEL: intent.name,
        names.MANAGED_BY_LABEL: names.MANAGED_BY,
        names.COMPONENT_LABEL: component,
    }


def selector_labels(intent: ReconcileCluster, component: str) -> dict[str, str]:
    """The subset of labels that selects pods; selectors are immutable, so keep it minimal."""
    return {names.CLUSTER_ID_LABEL: intent.cluster_id, names.COMPONENT_LABEL: component}


def _metadata(intent: ReconcileCluster, name: str, component: str) -> Manifest:
    return {
        "name": name,
        "namespace": names.namespace_for(intent.name),
        "labels": cluster_labels(intent, component),
        "annotations": {GENERATION_ANNOTATION: str(intent.generation)},
    }


# Namespace and Secrets


def namespace(intent: ReconcileCluster) -> Manifest:
    """The cluster's namespace.

    The user's cluster labels go here, where policy engines and cost tools look, and not on
    pods, so relabelling a cluster never restarts its control plane.
    """
    labels = {
        **intent.labels,
        # The control plane needs nothing beyond baseline; enforcing it keeps it that way.
        "pod-security.kubernetes.io/enforce": "baseline",
        **cluster_labels(intent, COMPONENT_NAMESPACE),
    }
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": names.namespace_for(intent.name),
            "labels": labels,
            "annotations": {GENERATION_ANNOTATION: str(intent.generation)},
        },
    }


def secret(
    namespace: str,
    name: str,
    data: Mapping[str, bytes],
    tls: bool,
    labels: Mapping[str, str],
) -> Manifest:
    """A Secret holding `data`; `kubernetes.io/tls` when `tls` (needs tls.crt and tls.key).

    Use `cluster_labels(intent, COMPONENT_PKI)` for `labels`, so the Secrets are pruned and
    listed with the rest of the cluster.
    """
    if tls and (missing := [key for key in _TLS_KEYS if key not in data]):
        raise ValueError(f"TLS secret {name!r} lacks {', '.join(missing)}")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "type": "kubernetes.io/tls" if tls else "Opaque",
        "data": {key: base64.b64encode(data[key]).decode("ascii") for key in sorted(data)},
    }


def secrets_checksum(secret_hashes: Mapping[str, str], secret_names: Iterable[str]) -> str:
    """A digest over the hashes of `secret_names` (missing ones count as empty), order-free."""
    digest = hashlib.sha256()
    for name in sorted(set(secret_names)):
        digest.update(f"{name}={secret_hashes.get(name, '')}\n".encode())
    return digest.hexdigest()


def mounted_secrets(pod_spec: Mapping[str, Any]) -> list[str]:
    """Names of the Secrets a pod spec mounts, directly or through projected volumes."""
    found: list[str] = []
    for volume in pod_spec.get("volumes", []):
        if "secret" in volume:
            found.append(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                found.append(source["secret"]["name"])
    return sorted(set(found))


# Images


def image(settings: RenderSettings, repository: str, tag: str) -> str:
    """`<registry>/<repository>:<tag>`, so a mirror only needs the same paths."""
    return f"{settings.image_registry.rstrip('/')}/{repository}:{tag}"


def _kubernetes_image(intent: ReconcileCluster, settings: RenderSettings, component: str) -> str:
    return image(settings, component, f"v{intent.spec.kubernetes_version}")


# Ports and addresses


def stable_node_port(cluster_id: str, purpose: str = "apiserver", attempt: int = 0) -> int:
    """A NodePort for `purpose` of cluster `cluster_id`, the same on every call.

    Collisions: the range has 2768 ports, so two clusters share a port with even odds by
    about 62 NodePort clusters. The management cluster refuses a taken port (422, "provided
    port is already allocated"); the reconciler then retries with `attempt + 1`, a
    deterministic probe sequence, and from then on passes the port the live Service holds as
    `RenderSettings.node_port`: the Service itself is the record, so a working port never
    moves and nothing else has to be stored.
    """
    digest = hashlib.sha256(f"{cluster_id}/{purpose}/{attempt}".encode()).digest()
    span = NODE_PORT_MAX - NODE_PORT_MIN + 1
    return NODE_PORT_MIN + int.from_bytes(digest[:8], "big") % span


class NodePorts(NamedTuple):
    """The NodePorts of one cluster's endpoint Service."""

    apiserver: int
    konnectivity: int


def node_ports(intent: ReconcileCluster, settings: RenderSettings) -> NodePorts:
    """The API and konnectivity NodePorts: explicit settings win, else stable derived ones."""
    api = settings.node_port or stable_node_port(intent.cluster_id, "apiserver")
    if settings.konnectivity_node_port is not None:
        return NodePorts(api, settings.konnectivity_node_port)
    attempt = 0
    while (konnectivity := stable_node_port(intent.cluster_id, "konnectivity", attempt)) == api:
        attempt += 1
    return NodePorts(api, konnectivity)


def apiserver_port(intent: ReconcileCluster, settings: RenderSettings) -> int:
    """The port the API server listens on inside its pod, which is also the public port.

    Behind a NodePort the API server listens on the NodePort number itself: it publishes
    `--advertise-address:--secure-port` as the tenant's `kubernetes` Service endpoint, and
    that pair must be what pods on the workers can dial. Kubeconfigs used inside the pod
    (controller-manager, scheduler, konnectivity) must point at `https://localhost:<this>`.
    """
    if intent.spec.network.service_type == "NodePort":
        return node_ports(intent, settings).apiserver
    return names.API_PORT


def konnectivity_port(intent: ReconcileCluster, settings: RenderSettings) -> int:
    """The port konnectivity agents on the workers dial at the endpoint host."""
    if intent.spec.network.service_type == "NodePort":
        return node_ports(intent, settings).konnectivity
    return names.KONNECTIVITY_PORT


def etcd_client_urls(namespace: str, replicas: int) -> list[str]:
    """Client URLs of every etcd member, through the headless Service."""
    return [
        f"https://{names.ETCD_STATEFULSET}-{ordinal}.{names.ETCD_HEADLESS_SERVICE}.{namespace}"
        f".svc:{names.ETCD_CLIENT_PORT}"
        for ordinal in range(replicas)
    ]


def _etcd_initial_cluster(namespace: str, replicas: int) -> str:
    members = (
        f"{names.ETCD_STATEFULSET}-{ordinal}=https://{names.ETCD_STATEFULSET}-{ordinal}"
        f".{names.ETCD_HEADLESS_SERVICE}.{namespace}.svc:{names.ETCD_PEER_PORT}"
        for ordinal in range(replicas)
    )
    return ",".join(members)


def _advertise_address(settings: RenderSettings) -> str:
    """The address the tenant's `kubernetes` Service points at.

    The endpoint's IP when known, because workers can reach it and pod IPs of the management
    cluster they cannot. Until the load balancer has an address (or when the endpoint is a
    DNS name, which the flag does not take) the pod IP lets the API server start; the
    reconciler renders again once the address is known.
    """
    if settings.endpoint_host is not None:
        try:
            return str(ipaddress.ip_address(settings.endpoint_host))
        except ValueError:
            pass
    return "$(POD_IP)"


# Shared pod parts


def _flags(values: Mapping[str, str]) -> list[str]:
    return [f"--{name}={values[name]}" for name in sorted(values)]


def _env_from_field(name: str, field_path: str) -> Manifest:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def _http_probe(
    path: str,
    port: str,
    scheme: str,
    *,
    period: int = 10,
    failures: int = 3,
    initial_delay: int = 0,
) -> Manifest:
    probe: Manifest = {
        "httpGet": {"path": path, "port": port, "scheme": scheme},
        "periodSeconds": period,
        "timeoutSeconds": 15,
        "failureThreshold": failures,
    }
    if initial_delay:
        probe["initialDelaySeconds"] = initial_delay
    return probe


def _liveness(path: str, port: str, scheme: str = "HTTPS") -> Manifest:
    # kubeadm's values: a busy API server or etcd gets 80 s before it is restarted.
    return _http_probe(path, port, scheme, failures=8, initial_delay=10)


def _startup(path: str, port: str, scheme: str = "HTTPS") -> Manifest:
    # kubeadm's values: up to 4 minutes to start, e.g. while etcd volumes are provisioned.
    return _http_probe(path, port, scheme, failures=24, initial_delay=10)


def _readiness(path: str, port: str, scheme: str = "HTTPS") -> Manifest:
    return _http_probe(path, port, scheme, period=5)


def _container_security() -> Manifest:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _port(name: str, number: int) -> Manifest:
    return {"name": name, "containerPort": number, "protocol": "TCP"}


def _mount(volume: str, path: str) -> Manifest:
    return {"name": volume, "mountPath": path, "readOnly": True}


def _projected_secrets(volume: str, files: Mapping[str, Sequence[tuple[str, str]]]) -> Manifest:
    """A volume of chosen keys from several Secrets: `{secret: [(key, path), ...]}`.

    Picking keys keeps a CA's private key out of every container that only needs to trust it.
    """
    sources = [
        {"secret": {"name": name, "items": [{"key": key, "path": path} for key, path in items]}}
        for name, items in files.items()
    ]
    return {"name": volume, "projected": {"sources": sources, "defaultMode": _SECRET_FILE_MODE}}


def _kubeconfig_volume(volume: str, secret_name: str, filename: str) -> Manifest:
    return {
        "name": volume,
        "secret": {
            "secretName": secret_name,
            "items": [{"key": _SECRET_KEY, "path": filename}],
            "defaultMode": _SECRET_FILE_MODE,
        },
    }


def _spread_by_host(selector: Mapping[str, str]) -> Manifest:
    # Preferred, not required: a small management cluster must still run every replica.
    return {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": dict(selector)},
                        "topologyKey": "kubernetes.io/hostname",
                    },
                }
            ]
        }
    }


def _pod_spec(
    settings: RenderSettings,
    selector: Mapping[str, str],
    containers: list[Manifest],
    volumes: list[Manifest],
) -> Manifest:
    spec: Manifest = {
        # The control plane never talks to the management cluster's API.
        "automountServiceAccountToken": False,
        # Service links would inject ETCD_* variables for the `etcd` Service, which etcd
        # reads as its own configuration.
        "enableServiceLinks": False,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "affinity": _spread_by_host(selector),
        "containers": containers,
        "volumes": volumes,
    }
    if settings.priority_class_name is not None:
        spec["priorityClassName"] = settings.priority_class_name
    return spec


def _pod_template(
    intent: ReconcileCluster, settings: RenderSettings, component: str, pod_spec: Manifest
) -> Manifest:
    checksum = secrets_checksum(settings.secret_hashes, mounted_secrets(pod_spec))
    return {
        "metadata": {
            "labels": cluster_labels(intent, component),
            "annotations": {CHECKSUM_ANNOTATION: checksum},
        },
        "spec": pod_spec,
    }


# etcd


def etcd_headless_service(intent: ReconcileCluster) -> Manifest:
    """Gives every member a stable DNS name, `etcd-<n>.etcd.<namespace>.svc`."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(intent, names.ETCD_HEADLESS_SERVICE, COMPONENT_ETCD),
        "spec": {
            "clusterIP": "None",
            # Members must find each other before any is ready: readiness needs a quorum.
            "publishNotReadyAddresses": True,
            "selector": selector_labels(intent, COMPONENT_ETCD),
            "ports": [
                {"name": "client", "port": names.ETCD_CLIENT_PORT, "targetPort": "client"},
                {"name": "peer", "port": names.ETCD_PEER_PORT, "targetPort": "peer"},
            ],
        },
    }


def _etcd_args(intent: ReconcileCluster) -> list[str]:
    namespace = names.namespace_for(intent.name)
    member = f"https://$(POD_NAME).{names.ETCD_HEADLESS_SERVICE}.{namespace}.svc"
    return _flags(
        {
            "name": "$(POD_NAME)",
            # A subdirectory: a fresh filesystem's lost+found must not sit in etcd's data dir.
            "data-dir": f"{ETCD_DATA_MOUNT}/data",
            "listen-client-urls": f"https://0.0.0.0:{names.ETCD_CLIENT_PORT}",
            "advertise-client-urls": f"{member}:{names.ETCD_CLIENT_PORT}",
            "listen-peer-urls": f"https://0.0.0.0:{names.ETCD_PEER_PORT}",
            "initial-advertise-peer-urls": f"{member}:{names.ETCD_PEER_PORT}",
            "initial-cluster": _etcd_initial_cluster(namespace, intent.spec.datastore.replicas),
            "initial-cluster-state": "new",
            "initial-cluster-token": intent.cluster_id,
            # Plain HTTP, so the kubelet can probe it without a client certificate.
            "listen-metrics-urls": f"http://0.0.0.0:{ETCD_METRICS_PORT}",
            "cert-file": f"{ETCD_PKI_DIR}/server.crt",
            "key-file": f"{ETCD_PKI_DIR}/server.key",
            "trusted-ca-file": f"{ETCD_PKI_DIR}/ca.crt",
            "client-cert-auth": "true",
            "peer-cert-file": f"{ETCD_PKI_DIR}/peer.crt",
            "peer-key-file": f"{ETCD_PKI_DIR}/peer.key",
            "peer-trusted-ca-file": f"{ETCD_PKI_DIR}/ca.crt",
            "peer-client-cert-auth": "true",
        }
    )


def _etcd_container(intent: ReconcileCluster, settings: RenderSettings) -> Manifest:
    return {
        "name": "etcd",
        "image": image(settings, "etcd", release(intent.spec.kubernetes_version).etcd),
        "imagePullPolicy": "IfNotPresent",
        "command": ["etcd"],
        "args": _etcd_args(intent),
        "env": [_env_from_field("POD_NAME", "metadata.name")],
        "ports": [
            _port("client", names.ETCD_CLIENT_PORT),
            _port("peer", names.ETCD_PEER_PORT),
            _port("metrics", ETCD_METRICS_PORT),
        ],
        # /livez needs no quorum, so a member waiting for its peers is not restarted.
        "startupProbe": _startup("/livez", "metrics", "HTTP"),
        "livenessProbe": _liveness("/livez", "metrics", "HTTP"),
        "readinessProbe": _readiness("/readyz", "metrics", "HTTP"),
        "resources": settings.etcd_resources.render(),
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "data", "mountPath": ETCD_DATA_MOUNT},
            _mount("etcd-pki", ETCD_PKI_DIR),
        ],
    }


def _etcd_volumes() -> list[Manifest]:
    return [
        _projected_secrets(
            "etcd-pki",
            {
                names.SECRET_ETCD_SERVER: [("tls.crt", "server.crt"), ("tls.key", "server.key")],
                names.SECRET_ETCD_PEER: [("tls.crt", "peer.crt"), ("tls.key", "peer.key")],
                names.SECRET_ETCD_CA: [("tls.crt", "ca.crt")],
            },
        )
    ]


def _etcd_volume_claim(intent: ReconcileCluster) -> Manifest:
    datastore = intent.spec.datastore
    spec: Manifest = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": datastore.storage_size}},
    }
    if datastore.storage_class_name is not None:
        spec["storageClassName"] = datastore.storage_class_name
    return {
        "metadata": {"name": "data", "labels": cluster_labels(intent, COMPONENT_ETCD)},
        "spec": spec,
    }


def etcd_statefulset(intent: ReconcileCluster, settings: RenderSettings) -> Manifest:
    """The etcd members, one PersistentVolumeClaim each."""
    selector = selector_labels(intent, COMPONENT_ETCD)
    pod_spec = _pod_spec(settings, selector, [_etcd_container(intent, settings)], _etcd_volumes())
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(intent, names.ETCD_STATEFULSET, COMPONENT_ETCD),
        "spec": {
            "serviceName": names.ETCD_HEADLESS_SERVICE,
            "replicas": intent.spec.datastore.replicas,
            # All members must run at once to form the first quorum; ordered start never would.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector},
            "updateStrategy": {"type": "RollingUpdate"},
            # Changing an immutable field means deleting and recreating the StatefulSet; the
            # data must survive that. Deleting the namespace still removes the claims.
            "persistentVolumeClaimRetentionPolicy": {
                "whenDeleted": "Retain",
                "whenScaled": "Retain",
            },
            "template": _pod_template(intent, settings, COMPONENT_ETCD, pod_spec),
            "volumeClaimTemplates": [_etcd_volume_claim(intent)],
        },
    }


# Control plane


def _apiserver_args(intent: ReconcileCluster, settings: RenderSettings) -> list[str]:
    spec = intent.spec
    namespace = names.namespace_for(intent.name)
    flags = {
        "advertise-address": _advertise_address(settings),
        "allow-privileged": "true",
        "authorization-mode": "Node,RBAC",
        "client-ca-file": f"{PKI_DIR}/ca.crt",
        "enable-admission-plugins": "NodeRestriction",
        "enable-bootstrap-token-auth": "true",
        "etcd-cafile": f"{PKI_DIR}/etcd/ca.crt",
        "etcd-certfile": f"{PKI_DIR}/apiserver-etcd-client.crt",
        "etcd-keyfile": f"{PKI_DIR}/apiserver-etcd-client.key",
        "etcd-servers": ",".join(etcd_client_urls(namespace, spec.datastore.replicas)),
        "kubelet-client-certificate": f"{PKI_DIR}/apiserver-kubelet-client.crt",
        "kubelet-client-key": f"{PKI_DIR}/apiserver-kubelet-client.key",
        "kubelet-preferred-address-types": "InternalIP,ExternalIP,Hostname",
        "proxy-client-cert-file": f"{PKI_DIR}/front-proxy-client.crt",
        "proxy-client-key-file": f"{PKI_DIR}/front-proxy-client.key",
        "requestheader-allowed-names": "front-proxy-client",
        "requestheader-client-ca-file": f"{PKI_DIR}/front-proxy-ca.crt",
        "requestheader-extra-headers-prefix": "X-Remote-Extra-",
        "requestheader-group-headers": "X-Remote-Group",
        "requestheader-username-headers": "X-Remote-User",
        "secure-port": str(apiserver_port(intent, settings)),
        "service-account-issuer": f"https://kubernetes.default.svc.{spec.network.dns_domain}",
        "service-account-key-file": f"{PKI_DIR}/sa.pub",
        "service-account-signing-key-file": f"{PKI_DIR}/sa.key",
        "service-cluster-ip-range": spec.network.service_cidr,
        "tls-cert-file": f"{PKI_DIR}/apiserver.crt",
        "tls-private-key-file": f"{PKI_DIR}/apiserver.key",
    }
    if spec.addons.konnectivity.enabled:
        flags["egress-selector-config-file"] = f"{EGRESS_DIR}/{EGRESS_FILE}"
    return _flags(flags)


def _apiserver_container(intent: ReconcileCluster, settings: RenderSettings) -> Manifest:
    mounts = [_mount("apiserver-pki", PKI_DIR)]
    if intent.spec.addons.konnectivity.enabled:
        mounts += [
            _mount("egress-selector", EGRESS_DIR),
            {"name": "konnectivity-uds", "mountPath": KONNECTIVITY_UDS_DIR},
        ]
    return {
        "name": "kube-apiserver",
        "image": _kubernetes_image(intent, settings, "kube-apiserver"),
        "imagePullPolicy": "IfNotPresent",
        "command": ["kube-apiserver"],
        "args": _apiserver_args(intent, settings),
        "env": [_env_from_field("POD_IP", "status.podIP")],
        "ports": [_port("https", apiserver_port(intent, settings))],
        "startupProbe": _startup("/livez", "https"),
        "livenessProbe": _liveness("/livez", "https"),
        # Pod readiness gates the endpoint Service, so only the API server decides it: a
        # sick scheduler must not take a serving API out of the load balancer.
        "readinessProbe": _readiness("/readyz", "https"),
        "resources": settings.apiserver_resources.render(),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }


def _pod_cidr_mask(pod_cidr: str) -> int:
    """Per-node pod range size: the controller-manager's default, kept inside its limits.

    The controller-manager refuses a node mask shorter than the cluster range or more than
    16 bits longer, which an IPv6 pod range such as a /32 or a /120 would otherwise hit.
    """
    network = ipaddress.ip_network(pod_cidr)
    default = 24 if network.version == 4 else 64
    return min(max(default, network.prefixlen), network.prefixlen + 16)


def _controller_manager_args(intent: ReconcileCluster) -> list[str]:
    network = intent.spec.network
    kubeconfig = f"{KUBECONFIG_DIR}/controller-manager.conf"
    return _flags(
        {
            "allocate-node-cidrs": "true",
            "authentication-kubeconfig": kubeconfig,
            "authorization-kubeconfig": kubeconfig,
            "client-ca-file": f"{PKI_DIR}/ca.crt",
            "cluster-cidr": network.pod_cidr,
            "cluster-name": intent.name,
            "cluster-signing-cert-file": f"{PKI_DIR}/ca.crt",
            "cluster-signing-key-file": f"{PKI_DIR}/ca.key",
            "controllers": "*,bootstrapsigner,tokencleaner",
            "kubeconfig": kubeconfig,
            "leader-elect": "true",
            "node-cidr-mask-size": str(_pod_cidr_mask(network.pod_cidr)),
            "requestheader-client-ca-file": f"{PKI_DIR}/front-proxy-ca.crt",
            "root-ca-file": f"{PKI_DIR}/ca.crt",
            "service-account-private-key-file": f"{PKI_DIR}/sa.key",
            "service-cluster-ip-range": network.service_cidr,
            "use-service-account-credentials": "true",
        }
    )


def _controller_manager_container(intent: ReconcileCluster, settings: RenderSettings) -> Manifest:
    return {
        "name": "kube-controller-manager",
        "image": _kubernetes_image(intent, settings, "kube-controller-manager"),
        "imagePullPolicy": "IfNotPresent",
        "command": ["kube-controller-manager"],
        "args": _controller_manager_args(intent),
        "ports": [_port("cm-https", CONTROLLER_MANAGER_PORT)],
        "startupProbe": _startup("/healthz", "cm-https"),
        "livenessProbe": _liveness("/healthz", "cm-https"),
        "resources": settings.controller_manager_resources.render(),
        "securityContext": _container_security(),
        "volumeMounts": [
            _mount("controller-manager-pki", PKI_DIR),
            _mount("controller-manager-kubeconfig", KUBECONFIG_DIR),
        ],
    }


def _scheduler_container(intent: ReconcileCluster, settings: RenderSettings) -> Manifest:
    kubeconfig = f"{KUBECONFIG_DIR}/scheduler.conf"
    args = {
        "authentication-kubeconfig": kubeconfig,
        "authorization-kubeconfig": kubeconfig,
        "kubeconfig": kubeconfig,
        "leader-elect": "true",
    }
    return {
        "name": "kube-scheduler",
        "image": _kubernetes_image(intent, settings, "kube-scheduler"),
        "imagePullPolicy": "IfNotPresent",
        "command": ["kube-scheduler"],
        "args": _flags(args),
        "ports": [_port("sched-https", SCHEDULER_PORT)],
        # No readiness probe: see the API server's.
        "startupProbe": _startup("/livez", "sched-https"),
        "livenessProbe": _liveness("/livez", "sched-https"),
        "resources": settings.scheduler_resources.render(),
        "securityContext": _container_security(),
        "volumeMounts": [_mount("scheduler-kubeconfig", KUBECONFIG_DIR)],
    }


def _konnectivity_args(intent: ReconcileCluster) -> list[str]:
    return _flags(
        {
            "uds-name": KONNECTIVITY_UDS,
            # The socket outlives a container restart in the emptyDir and would block binding.
            "delete-existing-uds-file": "true",
            "mode": "grpc",
            "server-port": "0",
            "agent-port": str(names.KONNECTIVITY_PORT),
            "admin-port": str(KONNECTIVITY_ADMIN_PORT),
            "health-port": str(KONNECTIVITY_HEALTH_PORT),
            # Agents verify the endpoint with the cluster CA, as they do the API server.
            "cluster-cert": f"{PKI_DIR}/apiserver.crt",
            "cluster-key": f"{PKI_DIR}/apiserver.key",
            "kubeconfig": f"{KUBECONFIG_DIR}/konnectivity-server.conf",
            "agent-namespace": KONNECTIVITY_AGENT_NAMESPACE,
            "agent-service-account": KONNECTIVITY_AGENT_SERVICE_ACCOUNT,
            "authentication-audience": KONNECTIVITY_AUDIENCE,
            # Agents keep connecting until they hold a tunnel to this many servers.
            "server-count": str(intent.spec.control_plane.replicas),
        }
    )


def _konnectivity_container(intent: ReconcileCluster, settings: RenderSettings) -> Manifest:
    tag = release(intent.spec.kubernetes_version).konnectivity
    return {
        "name": "konnectivity-server",
        "image": image(settings, "kas-network-proxy/proxy-server", tag),
        "imagePullPolicy": "IfNotPresent",
        "command": ["/proxy-server"],
        "args": _konnectivity_args(intent),
        "ports": [
            _port("konnectivity", names.KONNECTIVITY_PORT),
            _port("konn-health", KONNECTIVITY_HEALTH_PORT),
        ],
        # No readiness probe: the server is not ready until an agent connects, and agents
        # only come once workers join through this very pod's API server.
        "livenessProbe": _liveness("/healthz", "konn-health", "HTTP"),
        "resources": settings.konnectivity_resources.render(),
        "securityContext": _container_security(),
        "volumeMounts": [
            _mount("konnectivity-pki", PKI_DIR),
            _mount("konnectivity-kubeconfig", KUBECONFIG_DIR),
            {"name": "konnectivity-uds", "mountPath": KONNECTIVITY_UDS_DIR},
        ],
    }


def _control_plane_volumes(intent: ReconcileCluster) -> list[Manifest]:
    crt, key = _TLS_KEYS
    volumes = [
        _projected_secrets(
            "apiserver-pki",
            {
                names.SECRET_CA: [(crt, "ca.crt")],
                names.SECRET_APISERVER: [(crt, "apiserver.crt"), (key, "apiserver.key")],
                names.SECRET_APISERVER_KUBELET_CLIENT: [
                    (crt, "apiserver-kubelet-client.crt"),
                    (key, "apiserver-kubelet-client.key"),
                ],
                names.SECRET_APISERVER_ETCD_CLIENT: [
                    (crt, "apiserver-etcd-client.crt"),
                    (key, "apiserver-etcd-client.key"),
                ],
                names.SECRET_FRONT_PROXY_CA: [(crt, "front-proxy-ca.crt")],
                names.SECRET_FRONT_PROXY_CLIENT: [
                    (crt, "front-proxy-client.crt"),
                    (key, "front-proxy-client.key"),
                ],
                names.SECRET_SERVICE_ACCOUNT: [("sa.key", "sa.key"), ("sa.pub", "sa.pub")],
                names.SECRET_ETCD_CA: [(crt, "etcd/ca.crt")],
            },
        ),
        _projected_secrets(
            "controller-manager-pki",
            {
                names.SECRET_CA: [(crt, "ca.crt"), (key, "ca.key")],
                names.SECRET_FRONT_PROXY_CA: [(crt, "front-proxy-ca.crt")],
                names.SECRET_SERVICE_ACCOUNT: [("sa.key", "sa.key")],
            },
        ),
        _kubeconfig_volume(
            "controller-manager-kubeconfig",
            names.SECRET_CONTROLLER_MANAGER_KUBECONFIG,
            "controller-manager.conf",
        ),
        _kubeconfig_volume(
            "scheduler-kubeconfig", names.SECRET_SCHEDULER_KUBECONFIG, "scheduler.conf"
        ),
    ]
    if intent.spec.addons.konnectivity.enabled:
        volumes += [
            _projected_secrets(
                "konnectivity-pki",
                {names.SECRET_APISERVER: [(crt, "apiserver.crt"), (key, "apiserver.key")]},
            ),
            _kubeconfig_volume(
                "konnectivity-kubeconfig",
                names.SECRET_KONNECTIVITY_KUBECONFIG,
                "konnectivity-server.conf",
            ),
            {"name": "konnectivity-uds", "emptyDir": {"medium": "Memory"}},
            {
                "name": "egress-selector",
                "configMap": {"name": names.EGRESS_SELECTOR_CONFIGMAP},
            },
        ]
    return volumes


def control_plane_deployment(intent: ReconcileCluster, settings: RenderSettings) -> Manifest:
    """kube-apiserver, kube-controller-manager, kube-scheduler (and konnectivity) per pod."""
    containers = [
        _apiserver_container(intent, settings),
        _controller_manager_container(intent, settings),
        _scheduler_container(intent, settings),
    ]
    if intent.spec.addons.konnectivity.enabled:
        containers.append(_konnectivity_container(intent, settings))
    selector = selector_labels(intent, COMPONENT_CONTROL_PLANE)
    pod_spec = _pod_spec(settings, selector, containers, _control_plane_volumes(intent))
    metadata = _metadata(intent, names.CONTROL_PLANE_DEPLOYMENT, COMPONENT_CONTROL_PLANE)
    metadata["annotations"][VERSION_ANNOTATION] = intent.spec.kubernetes_version
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": intent.spec.control_plane.replicas,
            "selector": {"matchLabels": selector},
            # Surge first: a single-replica control plane keeps serving while it rolls.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": _pod_template(intent, settings, COMPONENT_CONTROL_PLANE, pod_spec),
        },
    }


def egress_selector_configuration() -> str:
    """The API server's egress selector: traffic to the cluster goes through konnectivity.

    JSON, which is YAML too, so it renders without a YAML library and byte-stably.
    """
    config = {
        "apiVersion": "apiserver.k8s.io/v1beta1",
        "kind": "EgressSelectorConfiguration",
        "egressSelections": [
            {
                "name": "cluster",
                "connection": {
                    "proxyProtocol": "GRPC",
                    "transport": {"uds": {"udsName": KONNECTIVITY_UDS}},
                },
            }
        ],
    }
    return json.dumps(config, indent=2) + "\n"


def egress_selector_configmap(intent: ReconcileCluster) -> Manifest:
    """Holds `egress_selector_configuration()`; only rendered with konnectivity on."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(intent, names.EGRESS_SELECTOR_CONFIGMAP, COMPONENT_CONTROL_PLANE),
        "data": {EGRESS_FILE: egress_selector_configuration()},
    }


# Endpoint


def endpoint_service(intent: ReconcileCluster, settings: RenderSettings) -> Manifest:
    """Where workers and users reach the API (and konnectivity): LoadBalancer or NodePort.

    The Service port is 6443 in both modes, so clients inside the management cluster need
    not know the mode; behind a NodePort the target is the NodePort number (`apiserver_port`).
    """
    node_port = intent.spec.network.service_type == "NodePort"
    ports_by_mode = node_ports(intent, settings) if node_port else None
    ports: list[Manifest] = [
        {"name": "https", "port": names.API_PORT, "targetPort": "https", "protocol": "TCP"}
    ]
    if intent.spec.addons.konnectivity.enabled:
        ports.append(
            {
                "name": "konnectivity",
                "port": names.KONNECTIVITY_PORT,
                "targetPort": "konnectivity",
                "protocol": "TCP",
            }
        )
    if ports_by_mode is not None:
        ports[0]["nodePort"] = ports_by_mode.apiserver
        if len(ports) > 1:
            ports[1]["nodePort"] = ports_by_mode.konnectivity
    metadata = _metadata(intent, names.API_SERVICE, COMPONENT_ENDPOINT)
    metadata["annotations"] = {
        **dict(sorted(settings.service_annotations.items())),
        **metadata["annotations"],
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": intent.spec.network.service_type,
            "selector": selector_labels(intent, COMPONENT_CONTROL_PLANE),
            "ports": ports,
        },
    }


# Disruption budgets


def control_plane_disruption_budget(intent: ReconcileCluster) -> Manifest:
    """Lets drains take one control-plane pod at a time, and never blocks them for good.

    maxUnavailable 1 for every replica count: with one replica a `minAvailable: 1` budget
    would block every node drain forever, and the user who chose one replica chose a short
    outage instead; with more, it keeps all but one serving (minAvailable 1 would let a
    five-replica control plane lose four at once). Unhealthy pods may always be evicted:
    they serve nothing, and keeping a crash-looping pod must not stall a drain.
    """
    return _disruption_budget(
        intent, names.CONTROL_PLANE_DEPLOYMENT, COMPONENT_CONTROL_PLANE, "AlwaysAllow"
    )


def etcd_disruption_budget(intent: ReconcileCluster) -> Manifest:
    """Keeps etcd's quorum through drains: one member at a time.

    Unready members are evicted only while the budget is healthy (the default, made
    explicit): a member that is only catching up may be what keeps the quorum.
    """
    return _disruption_budget(intent, names.ETCD_STATEFULSET, COMPONENT_ETCD, "IfHealthyBudget")


def _disruption_budget(
    intent: ReconcileCluster, name: str, component: str, unhealthy_policy: str
) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(intent, name, component),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(intent, component)},
            "unhealthyPodEvictionPolicy": unhealthy_policy,
        },
    }


# Restoring etcd from a snapshot (services/provisioner/restore.py)

COMPONENT_RESTORE = "etcd-restore"
RESTORE_ID_LABEL = "nest.io/restore-id"
RESTORE_URL_KEY = "url"
RESTORE_MODULE = "services.provisioner.restore_member"


def restore_suffix(restore_id: str) -> str:
    """A short, DNS-safe stand-in for a restore id in object names."""
    return hashlib.sha256(restore_id.encode()).hexdigest()[:10]


def restore_job_name(restore_id: str, ordinal: int) -> str:
    return f"{names.ETCD_STATEFULSET}-restore-{restore_suffix(restore_id)}-{ordinal}"


def restore_secret_name(restore_id: str) -> str:
    return f"{names.ETCD_STATEFULSET}-restore-{restore_suffix(restore_id)}"


def etcd_member_volume_claim(ordinal: int) -> str:
    """The PersistentVolumeClaim the StatefulSet made for member `ordinal`."""
    return f"data-{names.ETCD_STATEFULSET}-{ordinal}"


def _etcd_peer_hosts(namespace: str, replicas: int) -> list[str]:
    """The host names in the members' peer URLs (`_etcd_initial_cluster`)."""
    return [
        f"{names.ETCD_STATEFULSET}-{ordinal}.{names.ETCD_HEADLESS_SERVICE}.{namespace}.svc"
        for ordinal in range(replicas)
    ]


def _restore_labels(intent: ReconcileCluster, restore_id: str) -> dict[str, str]:
    return {
        **cluster_labels(intent, COMPONENT_RESTORE),
        RESTORE_ID_LABEL: restore_suffix(restore_id),
    }


def etcd_restore_secret(intent: ReconcileCluster, restore_id: str, snapshot_url: str) -> Manifest:
    """The snapshot URL (its token is a credential) for the restore Jobs, kept out of their
    spec: the Jobs read it from here into `NEST_RESTORE_URL`."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": restore_secret_name(restore_id),
            "namespace": names.namespace_for(intent.name),
            "labels": _restore_labels(intent, restore_id),
        },
        "type": "Opaque",
        "data": {RESTORE_URL_KEY: base64.b64encode(snapshot_url.encode()).decode("ascii")},
    }


def etcd_restore_job(
    intent: ReconcileCluster,
    *,
    restore_id: str,
    ordinal: int,
    image: str,
    snapshot_sha256: str,
    backoff_limit: int = 2,
) -> Manifest:
    """One Job restoring etcd member `ordinal` into its own volume (the StatefulSet must be
    scaled to zero: the volume is ReadWriteOnce and etcd must not run on it meanwhile).

    The container runs `python -m services.provisioner.restore_member` from the Nest image,
    as root like etcd itself (it renames etcd's root-owned data dir), with no capabilities.
    """
    namespace = names.namespace_for(intent.name)
    replicas = intent.spec.datastore.replicas
    member = f"{names.ETCD_STATEFULSET}-{ordinal}"
    peer = f"https://{member}.{names.ETCD_HEADLESS_SERVICE}.{namespace}.svc:{names.ETCD_PEER_PORT}"
    labels = _restore_labels(intent, restore_id)
    args = [
        "-m",
        RESTORE_MODULE,
        "--url=$(NEST_RESTORE_URL)",
        f"--sha256={snapshot_sha256}",
        f"--data-dir={ETCD_DATA_MOUNT}/data",
        f"--name={member}",
        f"--initial-cluster={_etcd_initial_cluster(namespace, replicas)}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster-token={intent.cluster_id}",
        f"--restore-id={restore_id}",
    ]
    container: Manifest = {
        "name": "restore",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python"],
        "args": args,
        "env": [
            {
                "name": "NEST_RESTORE_URL",
                "valueFrom": {
                    "secretKeyRef": {
                        "name": restore_secret_name(restore_id),
                        "key": RESTORE_URL_KEY,
                    }
                },
            }
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "data", "mountPath": ETCD_DATA_MOUNT}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": restore_job_name(restore_id, ordinal),
            "namespace": namespace,
            "labels": labels,
            "annotations": {RESTORE_ID_LABEL: restore_id},
        },
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    # etcdutl resolves the peer URLs to check that this member's advertise URL
                    # is its --initial-cluster entry; with etcd scaled to zero the headless
                    # Service has no records, so the names resolve here (nothing is dialled).
                    "hostAliases": [
                        {"ip": "127.0.0.1", "hostnames": _etcd_peer_hosts(namespace, replicas)}
                    ],
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "data",
                            "persistentVolumeClaim": {
                                "claimName": etcd_member_volume_claim(ordinal)
                            },
                        }
                    ],
                },
            },
        },
    }


# Addressing rendered objects


def object_ref(obj: Mapping[str, Any]) -> ObjectRef:
    """apiVersion, kind, namespace (None for cluster-scoped objects) and name of `obj`."""
    metadata = obj["metadata"]
    return ObjectRef(obj["apiVersion"], obj["kind"], metadata.get("namespace"), metadata["name"])


def api_version_kind_name(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    """`(apiVersion, kind, name)` of `obj`, e.g. for log fields and field-manager keys."""
    ref = object_ref(obj)
    return ref.api_version, ref.kind, ref.name


def collection_path(obj: Mapping[str, Any]) -> str:
    """The REST path of the collection `obj` belongs to (where a POST creates it)."""
    ref = object_ref(obj)
    try:
        plural = _PLURALS[ref.kind]
    except KeyError:
        raise ValueError(f"no REST path known for kind {ref.kind!r}") from None
    prefix = "/api/v1" if ref.api_version == "v1" else f"/apis/{ref.api_version}"
    if ref.namespace is None:
        return f"{prefix}/{plural}"
    return f"{prefix}/namespaces/{ref.namespace}/{plural}"


def resource_path(obj: Mapping[str, Any]) -> str:
    """The REST path of `obj` itself (GET, PATCH with server-side apply, DELETE)."""
    return f"{collection_path(obj)}/{object_ref(obj).name}"
