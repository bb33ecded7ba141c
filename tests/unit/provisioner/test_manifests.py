"""Manifest rendering: every object is valid Kubernetes, and says what a cluster relies on.

Schemas: the real Kubernetes OpenAPI schemas shipped by `kubernetes-validate`, in strict mode
(unknown fields are errors, as the API server's strict field validation makes them), for
every management-cluster version Nest supports.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
from collections.abc import Iterator
from functools import cache
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_validate.utils import all_versions

from libs.common.contract.cluster import ClusterSpec, ReconcileCluster
from libs.common.contract.versions import SUPPORTED_VERSIONS, release
from services.provisioner import names
from services.provisioner.manifests import (
    CHECKSUM_ANNOTATION,
    GENERATION_ANNOTATION,
    NODE_PORT_MAX,
    NODE_PORT_MIN,
    RenderSettings,
    api_version_kind_name,
    apiserver_port,
    collection_path,
    control_plane_deployment,
    etcd_statefulset,
    konnectivity_port,
    mounted_secrets,
    node_ports,
    object_ref,
    render_cluster,
    resource_path,
    secret,
    stable_node_port,
)

MANAGEMENT_VERSIONS = ("1.35", "1.36", "1.37")
"""Kubernetes versions of the management cluster Nest supports: the newest three minors that
kubernetes-validate ships schemas for."""

CLUSTER_ID = "0b5c1f9e-6a1d-4d53-9a57-2f0d6c8e4a11"
REGISTRY = "mirror.example.com:5000/k8s"


def intent(spec: dict[str, Any] | None = None, **fields: Any) -> ReconcileCluster:
    """A reconcile intent as the API would send it: wire (camelCase) spec, defaults filled."""
    return ReconcileCluster(
        cluster_id=fields.pop("cluster_id", CLUSTER_ID),
        name=fields.pop("name", "demo"),
        generation=fields.pop("generation", 3),
        labels=fields.pop("labels", {"team": "platform"}),
        spec=ClusterSpec.model_validate(spec or {}),
    )


VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    **{f"k8s-{version}": {"kubernetesVersion": version} for version in SUPPORTED_VERSIONS},
    "etcd-1": {"datastore": {"replicas": 1}},
    "etcd-3-storage-class": {"datastore": {"replicas": 3, "storageClassName": "fast-ssd"}},
    "nodeport": {"network": {"serviceType": "NodePort"}},
    "nodeport-no-konnectivity": {
        "network": {"serviceType": "NodePort"},
        "addons": {"konnectivity": {"enabled": False}},
    },
    "loadbalancer-no-konnectivity": {"addons": {"konnectivity": {"enabled": False}}},
    "no-coredns-no-kube-proxy": {
        "addons": {"coreDNS": {"enabled": False}, "kubeProxy": {"enabled": False}}
    },
    **{f"cp-{n}": {"controlPlane": {"replicas": n}} for n in range(1, 6)},
    "ipv6": {
        "network": {
            "podCidr": "fd00:10:244::/56",
            "serviceCidr": "fd00:10:96::/112",
            "dnsDomain": "tenant.example",
        }
    },
    "ipv6-small-nodeport": {
        "datastore": {"replicas": 1, "storageSize": "512Mi"},
        "network": {
            "serviceType": "NodePort",
            "podCidr": "fd00:10:244::/120",
            "serviceCidr": "fd00:10:96::/120",
        },
    },
}

SETTINGS = RenderSettings(
    image_registry=REGISTRY,
    endpoint_host="192.0.2.10",
    secret_hashes={"apiserver": "aa", "etcd-server": "bb"},
    service_annotations={"metallb.universe.tf/address-pool": "control-planes"},
    priority_class_name="nest-control-plane",
)


@cache
def rendered(variant: str) -> tuple[str, ...]:
    """The variant's objects as JSON text: cached, and safe from mutation between tests."""
    return tuple(json.dumps(obj) for obj in render_cluster(intent(VARIANTS[variant]), SETTINGS))


def objects(variant: str) -> list[dict[str, Any]]:
    return [json.loads(text) for text in rendered(variant)]


@cache
def validate(text: str, version: str) -> None:
    """Strictly validate one object; identical objects across variants are checked once."""
    kubernetes_validate.validate(json.loads(text), version, strict=True)


def by_kind(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {len(matches)}"
    return matches[0]


def container(pod_owner: dict[str, Any], name: str) -> dict[str, Any]:
    containers = pod_owner["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def flags(c: dict[str, Any]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for arg in c["args"]:
        key, _, value = arg.removeprefix("--").partition("=")
        assert key not in parsed, f"flag --{key} given twice to {c['name']}"
        parsed[key] = value
    return parsed


def pod_templates(objs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for obj in objs:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            yield obj["spec"]["template"]


# Schemas


def test_management_versions_have_their_own_schemas() -> None:
    # kubernetes-validate silently falls back to an older schema; make sure it need not.
    shipped = {".".join(v.split(".")[:2]) for v in all_versions()}
    assert set(MANAGEMENT_VERSIONS) <= shipped


@pytest.mark.parametrize("management_version", MANAGEMENT_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_is_valid_kubernetes(variant: str, management_version: str) -> None:
    for text in rendered(variant):
        try:
            validate(text, management_version)
        except kubernetes_validate.ValidationError as error:
            obj = json.loads(text)
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {error.message}")


@pytest.mark.parametrize("management_version", MANAGEMENT_VERSIONS)
@pytest.mark.parametrize("tls", [True, False])
def test_secret_is_valid_kubernetes(management_version: str, tls: bool) -> None:
    obj = secret("nest-demo", "apiserver", {"tls.crt": b"c", "tls.key": b"k"}, tls, {"a": "b"})
    kubernetes_validate.validate(obj, management_version, strict=True)


# What every object carries


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_is_labelled_and_in_the_cluster_namespace(variant: str) -> None:
    objs = objects(variant)
    namespace = names.namespace_for("demo")
    templates = [*pod_templates(objs)]
    claims = [t for o in objs for t in o.get("spec", {}).get("volumeClaimTemplates", [])]
    for obj in [*objs, *templates, *claims]:
        labels = obj["metadata"]["labels"]
        assert labels[names.CLUSTER_ID_LABEL] == CLUSTER_ID
        assert labels[names.CLUSTER_NAME_LABEL] == "demo"
        assert labels[names.MANAGED_BY_LABEL] == "nest"
        assert labels[names.COMPONENT_LABEL]
    for obj in objs:
        assert obj["metadata"]["annotations"][GENERATION_ANNOTATION] == "3"
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace
    ns = by_kind(objs, "Namespace")
    assert ns["metadata"]["name"] == namespace
    assert ns["metadata"]["labels"]["team"] == "platform"


def test_user_labels_cannot_override_nest_labels() -> None:
    objs = render_cluster(intent(labels={names.CLUSTER_ID_LABEL: "forged"}), SETTINGS)
    assert by_kind(objs, "Namespace")["metadata"]["labels"][names.CLUSTER_ID_LABEL] == CLUSTER_ID


def test_objects_come_in_apply_order() -> None:
    kinds = [o["kind"] for o in objects("defaults")]
    assert kinds == [
        "Namespace",
        "ConfigMap",
        "Service",
        "Service",
        "StatefulSet",
        "Deployment",
        "PodDisruptionBudget",
        "PodDisruptionBudget",
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_reference_only_what_exists(variant: str) -> None:
    """A dangling volume, port or Secret name leaves pods pending; the schema cannot see it."""
    objs = objects(variant)
    known_secrets = {v for k, v in vars(names).items() if k.startswith("SECRET_")}
    config_maps = {o["metadata"]["name"] for o in objs if o["kind"] == "ConfigMap"}
    statefulset = by_kind(objs, "StatefulSet")
    claim_names = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
    for template in pod_templates(objs):
        spec = template["spec"]
        volumes = {v["name"] for v in spec["volumes"]} | claim_names
        assert set(mounted_secrets(spec)) <= known_secrets
        for v in spec["volumes"]:
            if "configMap" in v:
                assert v["configMap"]["name"] in config_maps
        for c in spec["containers"]:
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe in c:
                    assert c[probe]["httpGet"]["port"] in ports
            flags(c)  # no flag twice
    container_ports = {
        p["name"]
        for t in pod_templates(objs)
        if t["metadata"]["labels"][names.COMPONENT_LABEL] == "control-plane"
        for c in t["spec"]["containers"]
        for p in c.get("ports", [])
    }
    endpoint = by_kind(objs, "Service", names.API_SERVICE)
    assert {p["targetPort"] for p in endpoint["spec"]["ports"]} <= container_ports


@pytest.mark.parametrize("variant", VARIANTS)
def test_selectors_match_their_pods(variant: str) -> None:
    objs = objects(variant)
    pods = {
        o["metadata"]["labels"][names.COMPONENT_LABEL]: o["spec"]["template"]["metadata"]["labels"]
        for o in objs
        if o["kind"] in ("Deployment", "StatefulSet")
    }

    def selects(selector: dict[str, str]) -> list[str]:
        return [c for c, labels in pods.items() if selector.items() <= labels.items()]

    for obj in objs:
        spec = obj.get("spec", {})
        if obj["kind"] == "Service":
            selector = spec["selector"]
        elif "selector" in spec:
            selector = spec["selector"]["matchLabels"]
        else:
            continue
        assert len(selects(selector)) == 1, obj["metadata"]["name"]


# etcd


@pytest.mark.parametrize("replicas", [1, 3])
def test_etcd_members_find_each_other_and_the_api_server_finds_them(replicas: int) -> None:
    objs = render_cluster(intent({"datastore": {"replicas": replicas}}), SETTINGS)
    ns = names.namespace_for("demo")
    statefulset = by_kind(objs, "StatefulSet")
    etcd = flags(container(statefulset, "etcd"))
    members = dict(m.split("=", 1) for m in etcd["initial-cluster"].split(","))
    assert members == {
        f"etcd-{n}": f"https://etcd-{n}.etcd.{ns}.svc:{names.ETCD_PEER_PORT}"
        for n in range(replicas)
    }
    assert statefulset["spec"]["replicas"] == replicas
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    apiserver = flags(container(by_kind(objs, "Deployment"), "kube-apiserver"))
    assert apiserver["etcd-servers"].split(",") == [
        f"https://etcd-{n}.etcd.{ns}.svc:2379" for n in range(replicas)
    ]
    # Every name etcd is dialled at is in its certificates (names.etcd_member_hosts).
    hosts = set(names.etcd_member_hosts(ns, replicas))
    for url in apiserver["etcd-servers"].split(","):
        assert url.removeprefix("https://").rsplit(":", 1)[0] in hosts
    headless = by_kind(objs, "Service", names.ETCD_HEADLESS_SERVICE)["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["publishNotReadyAddresses"] is True
    assert {p["port"] for p in headless["ports"]} == {2379, 2380}


def test_etcd_is_mutually_authenticated_tls() -> None:
    etcd = flags(container(by_kind(objects("defaults"), "StatefulSet"), "etcd"))
    assert etcd["client-cert-auth"] == "true"
    assert etcd["peer-client-cert-auth"] == "true"
    assert etcd["listen-client-urls"].startswith("https://")
    assert etcd["listen-peer-urls"].startswith("https://")
    assert etcd["advertise-client-urls"].startswith("https://")
    assert etcd["listen-metrics-urls"] == "http://0.0.0.0:2381"


@pytest.mark.parametrize(
    ("datastore", "storage_class"),
    [({"storageClassName": "fast-ssd", "storageSize": "20Gi"}, "fast-ssd"), ({}, None)],
)
def test_etcd_volumes(datastore: dict[str, Any], storage_class: str | None) -> None:
    statefulset = by_kind(render_cluster(intent({"datastore": datastore}), SETTINGS), "StatefulSet")
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == datastore.get("storageSize", "10Gi")
    assert claim["spec"].get("storageClassName") == storage_class


def test_etcd_ca_private_key_never_reaches_etcd_or_the_api_server() -> None:
    objs = objects("defaults")
    for template in pod_templates(objs):
        for volume in template["spec"]["volumes"]:
            for source in volume.get("projected", {}).get("sources", []):
                ref = source["secret"]
                if ref["name"] in (names.SECRET_ETCD_CA, names.SECRET_FRONT_PROXY_CA):
                    assert [i["key"] for i in ref["items"]] == ["tls.crt"]


# Control plane


@pytest.mark.parametrize("replicas", range(1, 6))
def test_control_plane_replicas_and_rollout(replicas: int) -> None:
    objs = render_cluster(intent({"controlPlane": {"replicas": replicas}}), SETTINGS)
    deployment = by_kind(objs, "Deployment")
    assert deployment["spec"]["replicas"] == replicas
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    konnectivity = flags(container(deployment, "konnectivity-server"))
    assert konnectivity["server-count"] == str(replicas)
    budget = by_kind(objs, "PodDisruptionBudget", names.CONTROL_PLANE_DEPLOYMENT)["spec"]
    # Drains may always proceed: at least one pod may go, whatever the replica count.
    assert budget["maxUnavailable"] == 1
    assert "minAvailable" not in budget
    etcd_budget = by_kind(objs, "PodDisruptionBudget", names.ETCD_STATEFULSET)["spec"]
    assert etcd_budget["maxUnavailable"] == 1


@pytest.mark.parametrize(
    ("network", "issuer"),
    [
        ({}, "https://kubernetes.default.svc.cluster.local"),
        (
            {"podCidr": "fd00:10:244::/56", "serviceCidr": "fd00:10:96::/112", "dnsDomain": "t.io"},
            "https://kubernetes.default.svc.t.io",
        ),
    ],
)
def test_network_flags(network: dict[str, str], issuer: str) -> None:
    spec = intent({"network": network}).spec
    deployment = control_plane_deployment(intent({"network": network}), SETTINGS)
    apiserver = flags(container(deployment, "kube-apiserver"))
    controller_manager = flags(container(deployment, "kube-controller-manager"))
    assert apiserver["service-cluster-ip-range"] == spec.network.service_cidr
    assert controller_manager["service-cluster-ip-range"] == spec.network.service_cidr
    assert controller_manager["cluster-cidr"] == spec.network.pod_cidr
    assert controller_manager["allocate-node-cidrs"] == "true"
    assert apiserver["service-account-issuer"] == issuer
    mask = int(controller_manager["node-cidr-mask-size"])
    prefix = ipaddress.ip_network(spec.network.pod_cidr).prefixlen
    assert prefix <= mask <= prefix + 16


@pytest.mark.parametrize(
    ("pod_cidr", "mask"),
    [
        ("10.244.0.0/16", 24),
        ("172.16.0.0/12", 24),
        ("64.0.0.0/7", 23),
        ("fd00::/56", 64),
        ("fd00::/32", 48),
        ("fd00::/120", 120),
    ],
)
def test_node_cidr_mask_stays_inside_controller_manager_limits(pod_cidr: str, mask: int) -> None:
    deployment = control_plane_deployment(intent({"network": {"podCidr": pod_cidr}}), SETTINGS)
    assert flags(container(deployment, "kube-controller-manager"))["node-cidr-mask-size"] == str(
        mask
    )


PKI_FILE_FLAGS = (
    "client-ca-file",
    "tls-cert-file",
    "tls-private-key-file",
    "proxy-client-cert-file",
    "proxy-client-key-file",
    "requestheader-client-ca-file",
    "kubelet-client-certificate",
    "kubelet-client-key",
    "etcd-cafile",
    "etcd-certfile",
    "etcd-keyfile",
    "service-account-key-file",
    "service-account-signing-key-file",
)


def test_control_plane_flags_as_kubeadm_sets_them() -> None:
    deployment = by_kind(objects("defaults"), "Deployment")
    apiserver = flags(container(deployment, "kube-apiserver"))
    assert apiserver["authorization-mode"] == "Node,RBAC"
    assert apiserver["enable-bootstrap-token-auth"] == "true"
    assert apiserver["allow-privileged"] == "true"
    assert apiserver["secure-port"] == "6443"
    assert apiserver["advertise-address"] == "192.0.2.10"
    assert apiserver["requestheader-allowed-names"] == "front-proxy-client"
    for flag in PKI_FILE_FLAGS:
        assert apiserver[flag].startswith("/etc/kubernetes/pki/")
    controller_manager = flags(container(deployment, "kube-controller-manager"))
    assert controller_manager["controllers"] == "*,bootstrapsigner,tokencleaner"
    assert controller_manager["use-service-account-credentials"] == "true"
    assert controller_manager["leader-elect"] == "true"
    assert controller_manager["cluster-signing-key-file"] == "/etc/kubernetes/pki/ca.key"
    kubeconfig = controller_manager["kubeconfig"]
    assert controller_manager["authentication-kubeconfig"] == kubeconfig
    assert controller_manager["authorization-kubeconfig"] == kubeconfig
    scheduler = flags(container(deployment, "kube-scheduler"))
    assert scheduler["leader-elect"] == "true"
    # Pod readiness is the API server's alone: it is what the endpoint Service routes to.
    containers = deployment["spec"]["template"]["spec"]["containers"]
    ready = [c["name"] for c in containers if "readinessProbe" in c]
    assert ready == ["kube-apiserver"]


@pytest.mark.parametrize("host", [None, "api.example.com"])
def test_advertise_address_falls_back_to_the_pod_ip(host: str | None) -> None:
    settings = RenderSettings(endpoint_host=host)
    apiserver = container(control_plane_deployment(intent(), settings), "kube-apiserver")
    assert flags(apiserver)["advertise-address"] == "$(POD_IP)"
    assert {
        "name": "POD_IP",
        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
    } in apiserver["env"]


@pytest.mark.parametrize("enabled", [True, False])
def test_konnectivity_on_and_off(enabled: bool) -> None:
    objs = render_cluster(intent({"addons": {"konnectivity": {"enabled": enabled}}}), SETTINGS)
    deployment = by_kind(objs, "Deployment")
    containers = [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    apiserver = flags(container(deployment, "kube-apiserver"))
    endpoint_ports = {
        p["port"] for p in by_kind(objs, "Service", names.API_SERVICE)["spec"]["ports"]
    }
    config_maps = [o for o in objs if o["kind"] == "ConfigMap"]
    assert ("konnectivity-server" in containers) is enabled
    assert ("egress-selector-config-file" in apiserver) is enabled
    assert (names.KONNECTIVITY_PORT in endpoint_ports) is enabled
    assert bool(config_maps) is enabled
    if enabled:
        config = json.loads(config_maps[0]["data"]["egress-selector-configuration.yaml"])
        uds = config["egressSelections"][0]["connection"]["transport"]["uds"]["udsName"]
        konnectivity = flags(container(deployment, "konnectivity-server"))
        assert konnectivity["uds-name"] == uds
        assert apiserver["egress-selector-config-file"].endswith(
            "/egress-selector-configuration.yaml"
        )
        assert names.SECRET_KONNECTIVITY_KUBECONFIG in mounted_secrets(
            deployment["spec"]["template"]["spec"]
        )


# Images


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_images_come_from_the_configured_registry_and_release_table(version: str) -> None:
    objs = render_cluster(intent({"kubernetesVersion": version}), SETTINGS)
    entry = release(version)
    images = {c["name"]: c["image"] for t in pod_templates(objs) for c in t["spec"]["containers"]}
    assert images == {
        "etcd": f"{REGISTRY}/etcd:{entry.etcd}",
        "kube-apiserver": f"{REGISTRY}/kube-apiserver:v{version}",
        "kube-controller-manager": f"{REGISTRY}/kube-controller-manager:v{version}",
        "kube-scheduler": f"{REGISTRY}/kube-scheduler:v{version}",
        "konnectivity-server": f"{REGISTRY}/kas-network-proxy/proxy-server:{entry.konnectivity}",
    }


def test_default_registry_is_upstream() -> None:
    deployment = control_plane_deployment(intent(), RenderSettings())
    assert container(deployment, "kube-apiserver")["image"].startswith("registry.k8s.io/")


# Endpoint


def test_loadbalancer_endpoint() -> None:
    service = by_kind(objects("defaults"), "Service", names.API_SERVICE)
    assert service["spec"]["type"] == "LoadBalancer"
    assert [(p["port"], p.get("nodePort")) for p in service["spec"]["ports"]] == [
        (6443, None),
        (8132, None),
    ]
    assert service["metadata"]["annotations"]["metallb.universe.tf/address-pool"] == (
        "control-planes"
    )


def test_nodeport_is_stable_in_range_and_what_the_api_server_listens_on() -> None:
    cluster = intent({"network": {"serviceType": "NodePort"}})
    objs = render_cluster(cluster, RenderSettings())
    service = by_kind(objs, "Service", names.API_SERVICE)
    api, konn = (p["nodePort"] for p in service["spec"]["ports"])
    assert (api, konn) == tuple(node_ports(cluster, RenderSettings()))
    assert NODE_PORT_MIN <= api <= NODE_PORT_MAX
    assert NODE_PORT_MIN <= konn <= NODE_PORT_MAX
    assert api != konn
    # Same cluster id, same ports, whatever else changes.
    again = intent({"network": {"serviceType": "NodePort"}}, name="other", generation=9)
    assert tuple(node_ports(again, SETTINGS)) == (api, konn)
    # The API server listens on the NodePort, so the advertised endpoint is reachable.
    apiserver = container(by_kind(objs, "Deployment"), "kube-apiserver")
    assert flags(apiserver)["secure-port"] == str(api)
    assert apiserver["ports"][0]["containerPort"] == api
    assert apiserver_port(cluster, RenderSettings()) == api
    assert konnectivity_port(cluster, RenderSettings()) == konn


def test_explicit_nodeports_win() -> None:
    cluster = intent({"network": {"serviceType": "NodePort"}})
    settings = RenderSettings(node_port=30001, konnectivity_node_port=30002)
    service = by_kind(render_cluster(cluster, settings), "Service", names.API_SERVICE)
    assert [p["nodePort"] for p in service["spec"]["ports"]] == [30001, 30002]


def test_nodeports_spread_and_probe_sequence_moves() -> None:
    ports = {stable_node_port(f"cluster-{n}") for n in range(500)}
    assert all(NODE_PORT_MIN <= p <= NODE_PORT_MAX for p in ports)
    assert len(ports) > 400  # 500 ids into 2768 ports: few collisions
    assert stable_node_port("a", attempt=1) != stable_node_port("a", attempt=0)


@pytest.mark.parametrize("port", [29999, 32768, 80])
def test_nodeport_outside_the_range_is_refused(port: int) -> None:
    with pytest.raises(ValueError, match="NodePort range"):
        RenderSettings(node_port=port)


def test_one_nodeport_for_two_services_is_refused() -> None:
    with pytest.raises(ValueError, match="both 30001"):
        RenderSettings(node_port=30001, konnectivity_node_port=30001)


# Certificate rotation and determinism


def checksum(obj: dict[str, Any]) -> str:
    annotation: str = obj["spec"]["template"]["metadata"]["annotations"][CHECKSUM_ANNOTATION]
    return annotation


@pytest.mark.parametrize(
    ("rotated", "rolls_control_plane", "rolls_etcd"),
    [
        (names.SECRET_APISERVER, True, False),
        (names.SECRET_SCHEDULER_KUBECONFIG, True, False),
        (names.SECRET_ETCD_CA, True, True),
        (names.SECRET_ETCD_PEER, False, True),
    ],
)
def test_rotating_a_secret_rolls_exactly_the_pods_that_mount_it(
    rotated: str, rolls_control_plane: bool, rolls_etcd: bool
) -> None:
    cluster = intent()
    before = RenderSettings(secret_hashes={rotated: "old", "other": "x"})
    after = RenderSettings(secret_hashes={rotated: "new", "other": "x"})
    for render, rolls in (
        (control_plane_deployment, rolls_control_plane),
        (etcd_statefulset, rolls_etcd),
    ):
        assert (checksum(render(cluster, before)) != checksum(render(cluster, after))) is rolls


def test_rendering_is_deterministic() -> None:
    hashes = {"apiserver": "aa", "ca": "bb", "etcd-server": "cc"}
    first = render_cluster(intent(), RenderSettings(secret_hashes=hashes))
    reordered = dict(reversed(list(hashes.items())))
    second = render_cluster(intent(), RenderSettings(secret_hashes=reordered))
    assert json.dumps(first) == json.dumps(second)
    assert json.dumps(first) == json.dumps(copy.deepcopy(first))


# Secrets and addressing


def test_secret_wraps_data_base64() -> None:
    obj = secret("nest-demo", "sa", {"sa.pub": b"pub", "sa.key": b"\x00key"}, False, {"x": "y"})
    assert obj["type"] == "Opaque"
    assert obj["metadata"] == {"name": "sa", "namespace": "nest-demo", "labels": {"x": "y"}}
    assert {k: base64.b64decode(v) for k, v in obj["data"].items()} == {
        "sa.pub": b"pub",
        "sa.key": b"\x00key",
    }
    tls = secret("nest-demo", "apiserver", {"tls.crt": b"c", "tls.key": b"k"}, True, {})
    assert tls["type"] == "kubernetes.io/tls"


def test_tls_secret_without_its_key_is_refused() -> None:
    with pytest.raises(ValueError, match=r"tls\.key"):
        secret("nest-demo", "apiserver", {"tls.crt": b"c"}, True, {})


def test_object_addressing() -> None:
    objs = objects("defaults")
    ns = names.namespace_for("demo")
    namespace, *_ = objs
    statefulset = by_kind(objs, "StatefulSet")
    budget = by_kind(objs, "PodDisruptionBudget", "etcd")
    assert object_ref(namespace) == ("v1", "Namespace", None, ns)
    assert api_version_kind_name(statefulset) == ("apps/v1", "StatefulSet", "etcd")
    assert resource_path(namespace) == f"/api/v1/namespaces/{ns}"
    assert resource_path(statefulset) == f"/apis/apps/v1/namespaces/{ns}/statefulsets/etcd"
    assert collection_path(budget) == f"/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets"
    ingress = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "x"}}
    with pytest.raises(ValueError, match="Ingress"):
        resource_path(ingress)
