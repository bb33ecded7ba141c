"""Names of everything the provisioner creates for a cluster in the management cluster.

PKI, manifests, the applier and the resync all derive names from here, so they always agree.
"""

from __future__ import annotations

import hashlib

CLUSTER_ID_LABEL = "nest.io/cluster-id"
CLUSTER_NAME_LABEL = "nest.io/cluster-name"
COMPONENT_LABEL = "nest.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "nest"
FIELD_MANAGER = "nest-provisioner"

# Secrets holding the cluster PKI (kubeadm's layout). TLS secrets carry tls.crt, tls.key, ca.crt.
SECRET_CA = "ca"
SECRET_FRONT_PROXY_CA = "front-proxy-ca"
SECRET_ETCD_CA = "etcd-ca"
SECRET_SERVICE_ACCOUNT = "sa"  # sa.key, sa.pub
SECRET_APISERVER = "apiserver"
SECRET_APISERVER_KUBELET_CLIENT = "apiserver-kubelet-client"
SECRET_APISERVER_ETCD_CLIENT = "apiserver-etcd-client"
SECRET_FRONT_PROXY_CLIENT = "front-proxy-client"
SECRET_ETCD_SERVER = "etcd-server"
SECRET_ETCD_PEER = "etcd-peer"
SECRET_CONTROLLER_MANAGER_KUBECONFIG = "controller-manager-kubeconfig"  # key: kubeconfig
SECRET_SCHEDULER_KUBECONFIG = "scheduler-kubeconfig"  # key: kubeconfig
# Only when the konnectivity add-on is on: the server checks agents' tokens with the tenant API.
SECRET_KONNECTIVITY_KUBECONFIG = "konnectivity-server-kubeconfig"  # key: kubeconfig

ETCD_STATEFULSET = "etcd"
ETCD_HEADLESS_SERVICE = "etcd"  # pods are etcd-0.etcd.<namespace>.svc
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
CONTROL_PLANE_DEPLOYMENT = "control-plane"
API_SERVICE = "kube-apiserver"  # the endpoint Service
API_PORT = 6443
KONNECTIVITY_PORT = 8132
EGRESS_SELECTOR_CONFIGMAP = "egress-selector"  # the API server's route to konnectivity


def namespace_for(name: str) -> str:
    """The cluster's namespace: `nest-<name>`, shortened with a stable hash past 63 characters."""
    candidate = f"nest-{name}"
    if len(candidate) <= 63:
        return candidate
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"nest-{name[: 63 - 5 - 9].rstrip('-')}-{digest}"


def etcd_member_hosts(
    namespace: str, replicas: int, dns_domain: str = "cluster.local"
) -> list[str]:
    """DNS names of every etcd member behind the headless Service (short and fully qualified)."""
    hosts: list[str] = []
    for ordinal in range(replicas):
        pod = f"{ETCD_STATEFULSET}-{ordinal}"
        base = f"{pod}.{ETCD_HEADLESS_SERVICE}.{namespace}"
        hosts += [pod, f"{base}", f"{base}.svc", f"{base}.svc.{dns_domain}"]
    return hosts


def api_service_hosts(namespace: str, dns_domain: str = "cluster.local") -> list[str]:
    """DNS names of the endpoint Service inside the management cluster."""
    return [
        API_SERVICE,
        f"{API_SERVICE}.{namespace}",
        f"{API_SERVICE}.{namespace}.svc",
        f"{API_SERVICE}.{namespace}.svc.{dns_domain}",
    ]
