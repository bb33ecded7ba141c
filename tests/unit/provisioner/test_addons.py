"""Tenant objects: valid Kubernetes for every tenant version, and what `kubeadm join` needs."""

from __future__ import annotations

import base64
import json
from typing import Any

import kubernetes_validate
import pytest
import yaml

from libs.common.contract.cluster import ClusterSpec, ReconcileCluster
from libs.common.contract.versions import SUPPORTED_VERSIONS
from services.provisioner import manifests
from services.provisioner.addons import AddonInputs, dns_service_ip, render_addons

CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
INPUTS = AddonInputs(endpoint_host="192.0.2.10", endpoint_port=6443, ca_pem=CA)


def intent(**spec: Any) -> ReconcileCluster:
    return ReconcileCluster(
        cluster_id="c-1", name="demo", generation=1, spec=ClusterSpec.model_validate(spec)
    )


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)}"
    return matches[0]


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_every_tenant_object_is_valid_kubernetes(version: str) -> None:
    minor = ".".join(version.split(".")[:2])
    for obj in render_addons(intent(kubernetesVersion=version), INPUTS):
        try:
            kubernetes_validate.validate(obj, minor, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {error.message}")


def test_every_object_has_a_rest_path() -> None:
    for obj in render_addons(intent(), INPUTS):
        assert manifests.resource_path(obj).endswith(f"/{obj['metadata']['name']}")


def test_cluster_info_carries_the_endpoint_and_ca() -> None:
    objs = render_addons(intent(), INPUTS)
    info = find(objs, "ConfigMap", "cluster-info")
    assert info["metadata"]["namespace"] == "kube-public"
    kubeconfig = yaml.safe_load(info["data"]["kubeconfig"])
    cluster = kubeconfig["clusters"][0]["cluster"]
    assert cluster["server"] == "https://192.0.2.10:6443"
    assert base64.b64decode(cluster["certificate-authority-data"]) == CA
    reader = find(objs, "RoleBinding", "kubeadm:bootstrap-signer-clusterinfo")
    assert reader["subjects"] == [
        {"kind": "User", "name": "system:anonymous", "apiGroup": "rbac.authorization.k8s.io"}
    ]


def test_bootstrap_token_rbac_matches_kubeadm() -> None:
    objs = render_addons(intent(), INPUTS)
    expected = {
        "kubeadm:get-nodes": (
            "kubeadm:get-nodes",
            "system:bootstrappers:kubeadm:default-node-token",
        ),
        "kubeadm:kubelet-bootstrap": (
            "system:node-bootstrapper",
            "system:bootstrappers:kubeadm:default-node-token",
        ),
        "kubeadm:node-autoapprove-bootstrap": (
            "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
            "system:bootstrappers:kubeadm:default-node-token",
        ),
        "kubeadm:node-autoapprove-certificate-rotation": (
            "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient",
            "system:nodes",
        ),
    }
    for name, (role, group) in expected.items():
        binding = find(objs, "ClusterRoleBinding", name)
        assert binding["roleRef"]["name"] == role
        assert binding["subjects"][0] == {
            "kind": "Group",
            "name": group,
            "apiGroup": "rbac.authorization.k8s.io",
        }


def test_kubeadm_and_kubelet_config_for_joining_workers() -> None:
    objs = render_addons(intent(network={"dnsDomain": "tenant.example"}), INPUTS)
    kubeadm = yaml.safe_load(
        find(objs, "ConfigMap", "kubeadm-config")["data"]["ClusterConfiguration"]
    )
    assert kubeadm["kind"] == "ClusterConfiguration"
    assert kubeadm["controlPlaneEndpoint"] == "192.0.2.10:6443"
    assert kubeadm["networking"]["dnsDomain"] == "tenant.example"
    kubelet = yaml.safe_load(find(objs, "ConfigMap", "kubelet-config")["data"]["kubelet"])
    assert kubelet["clusterDNS"] == ["10.96.0.10"]
    assert kubelet["clusterDomain"] == "tenant.example"
    for name in ("kubeadm:nodes-kubeadm-config", "kubeadm:kubelet-config"):
        groups = {s["name"] for s in find(objs, "RoleBinding", name)["subjects"]}
        assert groups == {"system:nodes", "system:bootstrappers:kubeadm:default-node-token"}


def test_coredns_sits_at_the_tenth_service_address() -> None:
    objs = render_addons(
        intent(network={"serviceCidr": "fd00:10:96::/112", "podCidr": "fd00:1::/56"}), INPUTS
    )
    assert find(objs, "Service", "kube-dns")["spec"]["clusterIP"] == "fd00:10:96::a"
    assert dns_service_ip(intent()) == "10.96.0.10"


def test_optional_addons_follow_the_spec() -> None:
    bare = render_addons(
        intent(
            addons={
                "coreDNS": {"enabled": False},
                "kubeProxy": {"enabled": False},
                "konnectivity": {"enabled": False},
            }
        ),
        INPUTS,
    )
    kinds = {(o["kind"], o["metadata"]["name"]) for o in bare}
    assert ("Deployment", "coredns") not in kinds
    assert ("DaemonSet", "kube-proxy") not in kinds
    assert ("ClusterRoleBinding", "system:konnectivity-server") not in kinds
    assert ("DaemonSet", "konnectivity-agent") not in kinds
    assert ("ConfigMap", "cluster-info") in kinds


def test_konnectivity_server_may_review_tokens() -> None:
    objs = render_addons(intent(), INPUTS)
    binding = find(objs, "ClusterRoleBinding", "system:konnectivity-server")
    assert binding["roleRef"]["name"] == "system:auth-delegator"
    assert binding["subjects"][0]["name"] == "system:konnectivity-server"
    account = find(objs, "ServiceAccount", "konnectivity-agent")
    assert account["metadata"]["namespace"] == "kube-system"
    agent = find(objs, "DaemonSet", "konnectivity-agent")
    spec = agent["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "konnectivity-agent"
    args = spec["containers"][0]["args"]
    assert "--proxy-server-host=192.0.2.10" in args
    assert "--proxy-server-port=8132" in args
    token = spec["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "system:konnectivity-server"


def test_kube_proxy_dials_the_public_endpoint() -> None:
    objs = render_addons(intent(), AddonInputs("2001:db8::1", 31000, CA))
    config = yaml.safe_load(find(objs, "ConfigMap", "kube-proxy")["data"]["kubeconfig.conf"])
    assert config["clusters"][0]["cluster"]["server"] == "https://[2001:db8::1]:31000"
    json.dumps(objs)  # JSON-ready
