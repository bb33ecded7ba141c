"""Objects Nest installs into a tenant cluster once its API answers, rendered as plain data.

Pure functions, like `manifests`: a `ReconcileCluster` intent and `AddonInputs` go in, JSON-ready
dicts come out, in apply order (cluster-scoped RBAC before what uses it). What a tenant gets:

- the kubeadm-compatible bootstrap objects, so a worker can `kubeadm join` with a bootstrap
  token: the `cluster-info` ConfigMap in `kube-public` (CA and endpoint) readable anonymously,
  the bootstrap-token RBAC (kubeadm:get-nodes, kubeadm:kubelet-bootstrap,
  kubeadm:node-autoapprove-bootstrap, kubeadm:node-autoapprove-certificate-rotation) and the
  `kubeadm-config` / `kubelet-config` ConfigMaps in `kube-system` with their read access;
- CoreDNS (when enabled) at the tenth address of the Service range, as kubeadm places it;
- kube-proxy (when enabled), pointed at the public endpoint since workers cannot reach the
  control-plane pods' addresses;
- with konnectivity: the server's user bound to `system:auth-delegator` (it checks the agents'
  tokens) and the agents' ServiceAccount.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from typing import Any

import yaml

from libs.common.contract.cluster import ReconcileCluster
from libs.common.contract.versions import release
from services.provisioner import manifests, pki

Manifest = dict[str, Any]

KUBE_SYSTEM = "kube-system"
KUBE_PUBLIC = "kube-public"
BOOTSTRAPPERS = "system:bootstrappers:kubeadm:default-node-token"
NODES = "system:nodes"
ADDON_LABEL = "nest.io/addon"
COREDNS_IMAGE = "coredns/coredns"
KUBE_PROXY_IMAGE = "kube-proxy"
KUBEADM_API = "kubeadm.k8s.io/v1beta4"
RBAC = "rbac.authorization.k8s.io/v1"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True)
class AddonInputs:
    """What the tenant objects depend on besides the spec."""

    endpoint_host: str
    """Where workers reach the API (load-balancer address or node address)."""
    endpoint_port: int
    """The public API port."""
    ca_pem: bytes
    """The cluster CA certificate (PEM), which joining workers trust."""
    image_registry: str = "registry.k8s.io"
    """Registry every image is pulled from."""
    konnectivity_port: int = 8132
    """Where konnectivity agents on the workers reach the server at `endpoint_host`."""

    @property
    def server(self) -> str:
        host = self.endpoint_host
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        return f"https://{host}:{self.endpoint_port}"


def render_addons(intent: ReconcileCluster, inputs: AddonInputs) -> list[Manifest]:
    """Every tenant object for `intent`, in apply order."""
    objects = bootstrap_objects(intent, inputs)
    addons = intent.spec.addons
    if addons.core_dns.enabled:
        objects += coredns(intent, inputs)
    if addons.kube_proxy.enabled:
        objects += kube_proxy(intent, inputs)
    if addons.konnectivity.enabled:
        objects += konnectivity_rbac()
        objects.append(konnectivity_agent(intent, inputs))
    return objects


# Small builders


def _meta(name: str, namespace: str | None = None, addon: str = "bootstrap") -> Manifest:
    metadata: Manifest = {"name": name, "labels": {ADDON_LABEL: addon}}
    if namespace is not None:
        metadata["namespace"] = namespace
    return metadata


def _cluster_role(name: str, rules: list[Manifest], addon: str = "bootstrap") -> Manifest:
    return {
        "apiVersion": RBAC,
        "kind": "ClusterRole",
        "metadata": _meta(name, addon=addon),
        "rules": rules,
    }


def _subject(kind: str, name: str, namespace: str | None = None) -> Manifest:
    if kind == "ServiceAccount":
        return {"kind": kind, "name": name, "namespace": namespace}
    return {"kind": kind, "name": name, "apiGroup": "rbac.authorization.k8s.io"}


def _cluster_binding(
    name: str, role: str, subjects: list[Manifest], addon: str = "bootstrap"
) -> Manifest:
    return {
        "apiVersion": RBAC,
        "kind": "ClusterRoleBinding",
        "metadata": _meta(name, addon=addon),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": subjects,
    }


def _role(name: str, namespace: str, rules: list[Manifest], addon: str = "bootstrap") -> Manifest:
    return {
        "apiVersion": RBAC,
        "kind": "Role",
        "metadata": _meta(name, namespace, addon),
        "rules": rules,
    }


def _role_binding(
    name: str, namespace: str, role: str, subjects: list[Manifest], addon: str = "bootstrap"
) -> Manifest:
    return {
        "apiVersion": RBAC,
        "kind": "RoleBinding",
        "metadata": _meta(name, namespace, addon),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
        "subjects": subjects,
    }


def _configmap(name: str, namespace: str, data: dict[str, str], addon: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(name, namespace, addon),
        "data": data,
    }


_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
"""libyaml's emitter when PyYAML has it: the pure-Python one costs tens of ms per cluster."""


def _yaml(document: Any) -> str:
    text: str = yaml.dump(document, Dumper=_DUMPER, sort_keys=True, default_flow_style=False)
    return text


def _read_configmap_rule(name: str) -> Manifest:
    return {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": [name],
        "verbs": ["get"],
    }


# kubeadm join


def cluster_info_kubeconfig(intent: ReconcileCluster, inputs: AddonInputs) -> str:
    """The kubeconfig kubeadm publishes in `cluster-info`: server and CA, no user."""
    return _yaml(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "",
                    "cluster": {
                        "server": inputs.server,
                        "certificate-authority-data": base64.b64encode(inputs.ca_pem).decode(),
                    },
                }
            ],
            "contexts": [],
            "current-context": "",
            "preferences": {},
            "users": [],
        }
    )


def cluster_configuration(intent: ReconcileCluster, inputs: AddonInputs) -> str:
    network = intent.spec.network
    return _yaml(
        {
            "apiVersion": KUBEADM_API,
            "kind": "ClusterConfiguration",
            "clusterName": intent.name,
            "kubernetesVersion": f"v{intent.spec.kubernetes_version}",
            "controlPlaneEndpoint": f"{inputs.server.removeprefix('https://')}",
            "imageRepository": inputs.image_registry,
            "certificatesDir": manifests.PKI_DIR,
            "networking": {
                "dnsDomain": network.dns_domain,
                "podSubnet": network.pod_cidr,
                "serviceSubnet": network.service_cidr,
            },
        }
    )


def kubelet_configuration(intent: ReconcileCluster) -> str:
    return _yaml(
        {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": f"{manifests.PKI_DIR}/ca.crt"},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "systemd",
            "clusterDNS": [dns_service_ip(intent)],
            "clusterDomain": intent.spec.network.dns_domain,
            "rotateCertificates": True,
            "staticPodPath": "/etc/kubernetes/manifests",
        }
    )


def bootstrap_objects(intent: ReconcileCluster, inputs: AddonInputs) -> list[Manifest]:
    """kubeadm's bootstrap-token objects: what `kubeadm join` reads and may do."""
    bootstrappers = [_subject("Group", BOOTSTRAPPERS)]
    nodes_and_bootstrappers = [*bootstrappers, _subject("Group", NODES)]
    return [
        _cluster_role(
            "kubeadm:get-nodes", [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
        ),
        _cluster_binding("kubeadm:get-nodes", "kubeadm:get-nodes", bootstrappers),
        _cluster_binding("kubeadm:kubelet-bootstrap", "system:node-bootstrapper", bootstrappers),
        _cluster_binding(
            "kubeadm:node-autoapprove-bootstrap",
            "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
            bootstrappers,
        ),
        _cluster_binding(
            "kubeadm:node-autoapprove-certificate-rotation",
            "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient",
            [_subject("Group", NODES)],
        ),
        _configmap(
            "cluster-info",
            KUBE_PUBLIC,
            {"kubeconfig": cluster_info_kubeconfig(intent, inputs)},
            "bootstrap",
        ),
        _role(
            "kubeadm:bootstrap-signer-clusterinfo",
            KUBE_PUBLIC,
            [_read_configmap_rule("cluster-info")],
        ),
        _role_binding(
            "kubeadm:bootstrap-signer-clusterinfo",
            KUBE_PUBLIC,
            "kubeadm:bootstrap-signer-clusterinfo",
            [_subject("User", "system:anonymous")],
        ),
        _configmap(
            "kubeadm-config",
            KUBE_SYSTEM,
            {"ClusterConfiguration": cluster_configuration(intent, inputs)},
            "bootstrap",
        ),
        _role(
            "kubeadm:nodes-kubeadm-config", KUBE_SYSTEM, [_read_configmap_rule("kubeadm-config")]
        ),
        _role_binding(
            "kubeadm:nodes-kubeadm-config",
            KUBE_SYSTEM,
            "kubeadm:nodes-kubeadm-config",
            nodes_and_bootstrappers,
        ),
        _configmap(
            "kubelet-config",
            KUBE_SYSTEM,
            {"kubelet": kubelet_configuration(intent)},
            "bootstrap",
        ),
        _role("kubeadm:kubelet-config", KUBE_SYSTEM, [_read_configmap_rule("kubelet-config")]),
        _role_binding(
            "kubeadm:kubelet-config",
            KUBE_SYSTEM,
            "kubeadm:kubelet-config",
            nodes_and_bootstrappers,
        ),
    ]


# CoreDNS


def dns_service_ip(intent: ReconcileCluster) -> str:
    """kubeadm's choice: the tenth address of the Service range."""
    network = ipaddress.ip_network(intent.spec.network.service_cidr)
    return str(network.network_address + 10)


def corefile(dns_domain: str) -> str:
    return (
        ".:53 {\n"
        "    errors\n"
        "    health {\n        lameduck 5s\n    }\n"
        "    ready\n"
        f"    kubernetes {dns_domain} in-addr.arpa ip6.arpa {{\n"
        "        pods insecure\n        fallthrough in-addr.arpa ip6.arpa\n        ttl 30\n    }\n"
        "    prometheus :9153\n"
        "    forward . /etc/resolv.conf {\n        max_concurrent 1000\n    }\n"
        "    cache 30\n    loop\n    reload\n    loadbalance\n"
        "}\n"
    )


def coredns(intent: ReconcileCluster, inputs: AddonInputs) -> list[Manifest]:
    tag = release(intent.spec.kubernetes_version).coredns
    labels = {"k8s-app": "kube-dns"}
    addon = "coredns"
    return [
        _cluster_role(
            "system:coredns",
            [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
            addon,
        ),
        _cluster_binding(
            "system:coredns",
            "system:coredns",
            [_subject("ServiceAccount", "coredns", KUBE_SYSTEM)],
            addon,
        ),
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta("coredns", KUBE_SYSTEM, addon),
        },
        _configmap(
            "coredns", KUBE_SYSTEM, {"Corefile": corefile(intent.spec.network.dns_domain)}, addon
        ),
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta("coredns", KUBE_SYSTEM, addon),
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "priorityClassName": "system-cluster-critical",
                        "tolerations": [
                            {"key": "CriticalAddonsOnly", "operator": "Exists"},
                            {
                                "key": "node-role.kubernetes.io/control-plane",
                                "effect": "NoSchedule",
                            },
                        ],
                        "nodeSelector": {"kubernetes.io/os": "linux"},
                        "containers": [
                            {
                                "name": "coredns",
                                "image": manifests.image(
                                    manifests.RenderSettings(image_registry=inputs.image_registry),
                                    "coredns/coredns",
                                    tag,
                                ),
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                    {"name": "metrics", "containerPort": 9153, "protocol": "TCP"},
                                ],
                                "resources": {
                                    "requests": {"cpu": "100m", "memory": "70Mi"},
                                    "limits": {"memory": "170Mi"},
                                },
                                "livenessProbe": {
                                    "httpGet": {"path": "/health", "port": 8080},
                                    "initialDelaySeconds": 60,
                                },
                                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}},
                                "securityContext": {
                                    "allowPrivilegeEscalation": False,
                                    "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]},
                                    "readOnlyRootFilesystem": True,
                                },
                                "volumeMounts": [
                                    {
                                        "name": "config-volume",
                                        "mountPath": "/etc/coredns",
                                        "readOnly": True,
                                    }
                                ],
                            }
                        ],
                        "volumes": [
                            {
                                "name": "config-volume",
                                "configMap": {
                                    "name": "coredns",
                                    "items": [{"key": "Corefile", "path": "Corefile"}],
                                },
                            }
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                **_meta("kube-dns", KUBE_SYSTEM, addon),
                "labels": {ADDON_LABEL: addon, **labels},
            },
            "spec": {
                "selector": labels,
                "clusterIP": dns_service_ip(intent),
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                    {"name": "metrics", "port": 9153, "protocol": "TCP", "targetPort": 9153},
                ],
            },
        },
    ]


# kube-proxy


def kube_proxy_configuration(intent: ReconcileCluster) -> str:
    return _yaml(
        {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": "/var/lib/kube-proxy/kubeconfig.conf"},
            "clusterCIDR": intent.spec.network.pod_cidr,
            "mode": "iptables",
        }
    )


def kube_proxy_kubeconfig(inputs: AddonInputs) -> str:
    return _yaml(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "default",
                    "cluster": {
                        "server": inputs.server,
                        "certificate-authority": f"{SERVICE_ACCOUNT_DIR}/ca.crt",
                    },
                }
            ],
            "contexts": [
                {
                    "name": "default",
                    "context": {"cluster": "default", "namespace": "default", "user": "default"},
                }
            ],
            "current-context": "default",
            "users": [
                {
                    "name": "default",
                    "user": {"tokenFile": f"{SERVICE_ACCOUNT_DIR}/token"},
                }
            ],
        }
    )


def kube_proxy(intent: ReconcileCluster, inputs: AddonInputs) -> list[Manifest]:
    addon = "kube-proxy"
    labels = {"k8s-app": "kube-proxy"}
    image = manifests.image(
        manifests.RenderSettings(image_registry=inputs.image_registry),
        KUBE_PROXY_IMAGE,
        f"v{intent.spec.kubernetes_version}",
    )
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta("kube-proxy", KUBE_SYSTEM, addon),
        },
        _cluster_binding(
            "kubeadm:node-proxier",
            "system:node-proxier",
            [_subject("ServiceAccount", "kube-proxy", KUBE_SYSTEM)],
            addon,
        ),
        _configmap(
            "kube-proxy",
            KUBE_SYSTEM,
            {
                "config.conf": kube_proxy_configuration(intent),
                "kubeconfig.conf": kube_proxy_kubeconfig(inputs),
            },
            addon,
        ),
        _role("kube-proxy", KUBE_SYSTEM, [_read_configmap_rule("kube-proxy")], addon),
        _role_binding(
            "kube-proxy", KUBE_SYSTEM, "kube-proxy", [_subject("Group", BOOTSTRAPPERS)], addon
        ),
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": _meta("kube-proxy", KUBE_SYSTEM, addon),
            "spec": {
                "selector": {"matchLabels": labels},
                "updateStrategy": {"type": "RollingUpdate"},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "kube-proxy",
                        "hostNetwork": True,
                        "priorityClassName": "system-node-critical",
                        "tolerations": [{"operator": "Exists"}],
                        "nodeSelector": {"kubernetes.io/os": "linux"},
                        "containers": [
                            {
                                "name": "kube-proxy",
                                "image": image,
                                "command": [
                                    "/usr/local/bin/kube-proxy",
                                    "--config=/var/lib/kube-proxy/config.conf",
                                    "--hostname-override=$(NODE_NAME)",
                                ],
                                "env": [
                                    {
                                        "name": "NODE_NAME",
                                        "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
                                    }
                                ],
                                "securityContext": {"privileged": True},
                                "volumeMounts": [
                                    {"name": "kube-proxy", "mountPath": "/var/lib/kube-proxy"},
                                    {"name": "xtables-lock", "mountPath": "/run/xtables.lock"},
                                    {
                                        "name": "lib-modules",
                                        "mountPath": "/lib/modules",
                                        "readOnly": True,
                                    },
                                ],
                            }
                        ],
                        "volumes": [
                            {"name": "kube-proxy", "configMap": {"name": "kube-proxy"}},
                            {
                                "name": "xtables-lock",
                                "hostPath": {"path": "/run/xtables.lock", "type": "FileOrCreate"},
                            },
                            {"name": "lib-modules", "hostPath": {"path": "/lib/modules"}},
                        ],
                    },
                },
            },
        },
    ]


# konnectivity


def konnectivity_rbac() -> list[Manifest]:
    """The server checks agents' tokens (TokenReview), and the agents need their account."""
    addon = "konnectivity"
    return [
        _cluster_binding(
            "system:konnectivity-server",
            "system:auth-delegator",
            [_subject("User", pki.KONNECTIVITY_SERVER_USER)],
            addon,
        ),
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(
                manifests.KONNECTIVITY_AGENT_SERVICE_ACCOUNT,
                manifests.KONNECTIVITY_AGENT_NAMESPACE,
                addon,
            ),
        },
    ]


def konnectivity_agent(intent: ReconcileCluster, inputs: AddonInputs) -> Manifest:
    """The agent on every worker: dials the server at the public endpoint and proxies the API
    server's traffic to nodes, pods and Services over that tunnel."""
    labels = {"k8s-app": "konnectivity-agent"}
    tag = release(intent.spec.kubernetes_version).konnectivity
    token_dir = "/var/run/secrets/tokens"
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta("konnectivity-agent", KUBE_SYSTEM, "konnectivity"),
        "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": manifests.KONNECTIVITY_AGENT_SERVICE_ACCOUNT,
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{"operator": "Exists"}],
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "containers": [
                        {
                            "name": "konnectivity-agent",
                            "image": manifests.image(
                                manifests.RenderSettings(image_registry=inputs.image_registry),
                                "kas-network-proxy/proxy-agent",
                                tag,
                            ),
                            "command": ["/proxy-agent"],
                            "args": [
                                "--logtostderr=true",
                                f"--ca-cert={SERVICE_ACCOUNT_DIR}/ca.crt",
                                f"--proxy-server-host={inputs.endpoint_host}",
                                f"--proxy-server-port={inputs.konnectivity_port}",
                                f"--admin-server-port={manifests.KONNECTIVITY_ADMIN_PORT}",
                                f"--health-server-port={manifests.KONNECTIVITY_HEALTH_PORT}",
                                f"--service-account-token-path={token_dir}/token",
                            ],
                            "livenessProbe": {
                                "httpGet": {
                                    "path": "/healthz",
                                    "port": manifests.KONNECTIVITY_HEALTH_PORT,
                                },
                                "initialDelaySeconds": 15,
                                "timeoutSeconds": 15,
                            },
                            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [
                                {"name": "token", "mountPath": token_dir, "readOnly": True}
                            ],
                        }
                    ],
                    "volumes": [
                        {
                            "name": "token",
                            "projected": {
                                "sources": [
                                    {
                                        "serviceAccountToken": {
                                            "path": "token",
                                            "audience": manifests.KONNECTIVITY_AUDIENCE,
                                            "expirationSeconds": 3600,
                                        }
                                    }
                                ]
                            },
                        }
                    ],
                },
            },
        },
    }
