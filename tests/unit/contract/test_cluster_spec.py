"""The cluster spec rules, as pure validation (no API, no broker)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from libs.common.contract import BY_TYPE, MESSAGES, Envelope, envelope_for, parse_payload
from libs.common.contract.cluster import (
    ClusterSpec,
    ReconcileCluster,
    validate_labels,
    validate_name,
)
from libs.common.contract.versions import (
    NEWEST_VERSION,
    SUPPORTED_VERSIONS,
    UpgradeRefused,
    Version,
    check_upgrade,
    release,
)


def test_defaults_describe_a_complete_cluster() -> None:
    spec = ClusterSpec()
    assert spec.kubernetes_version == NEWEST_VERSION
    assert spec.control_plane.replicas == 2
    assert spec.datastore.replicas == 3
    assert spec.network.pod_cidr == "10.244.0.0/16"
    assert spec.addons.core_dns.enabled


def test_wire_names_are_camel_case_and_round_trip() -> None:
    wire = ClusterSpec().wire()
    assert set(wire) == {"kubernetesVersion", "controlPlane", "datastore", "network", "addons"}
    assert set(wire["addons"]) == {"coreDNS", "kubeProxy", "konnectivity"}
    assert ClusterSpec.model_validate(wire) == ClusterSpec()


@pytest.mark.parametrize("name", ["a", "demo", "prod-eu-1", "a" * 63, "0abc"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "-a", "a-", "a_b", "a.b", "a" * 64])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ValueError):
        validate_name(name)


@pytest.mark.parametrize(
    "labels",
    [{"team": "a"}, {"nest.io/tier": "gold"}, {"k": ""}, {"a.b-c_d": "x.y-z_1"}],
)
def test_valid_labels(labels: dict[str, str]) -> None:
    assert validate_labels(labels) == labels


@pytest.mark.parametrize(
    "labels", [{"": "x"}, {"bad key": "x"}, {"k": "-x"}, {"Bad_Prefix/k": "v"}, {"k": "v" * 64}]
)
def test_invalid_labels(labels: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        validate_labels(labels)


@pytest.mark.parametrize(
    ("network", "fragment"),
    [
        ({"podCidr": "10.96.0.0/16"}, "overlap"),
        ({"podCidr": "10.0.0.1/16"}, "valid CIDR"),
        ({"serviceCidr": "10.0.0.0/25"}, "too small"),
        ({"dnsDomain": "Cluster_Local"}, "DNS subdomain"),
    ],
)
def test_network_rules(network: dict[str, str], fragment: str) -> None:
    with pytest.raises(ValidationError) as err:
        ClusterSpec.model_validate({"network": network})
    assert fragment in str(err.value)


def test_ipv6_and_mixed_families_are_allowed() -> None:
    spec = ClusterSpec.model_validate(
        {"network": {"podCidr": "fd00:10::/56", "serviceCidr": "fd00:20::/112"}}
    )
    assert spec.network.service_cidr == "fd00:20::/112"
    ClusterSpec.model_validate({"network": {"podCidr": "fd00:10::/56"}})


def test_version_prefix_v_is_normalised() -> None:
    assert (
        ClusterSpec.model_validate({"kubernetesVersion": f"v{NEWEST_VERSION}"}).kubernetes_version
        == NEWEST_VERSION
    )


@pytest.mark.parametrize(
    ("current", "target", "ok"),
    [
        ("1.34.1", "1.34.2", True),
        ("1.34.2", "1.34.1", False),
        ("1.34.1", "1.35.0", True),
        ("1.33.5", "1.35.0", False),
        ("1.35.0", "1.35.0", True),
        ("1.35.0", "2.0.0", False),
        ("1.35.0", "1.35.4", True),
        ("1.35.4", "1.36.3", True),
        ("1.36.3", "1.37.2", True),
        ("1.35.4", "1.37.2", False),
    ],
)
def test_upgrade_rules(current: str, target: str, ok: bool) -> None:
    if ok:
        check_upgrade(current, target)
    else:
        with pytest.raises(UpgradeRefused):
            check_upgrade(current, target)


def test_the_newest_release_is_the_default_and_older_ones_stay() -> None:
    assert NEWEST_VERSION == "1.37.2"
    assert {"1.33.5", "1.34.1", "1.34.2", "1.35.0"} <= set(SUPPORTED_VERSIONS)


@pytest.mark.parametrize(
    ("version", "etcd", "coredns", "konnectivity"),
    [
        # kubeadm's DefaultEtcdVersion and CoreDNSVersion of each version
        ("1.35.4", "3.6.6-0", "v1.13.1", "v0.34.0"),
        ("1.36.3", "3.6.8-0", "v1.14.2", "v0.34.0"),
        ("1.37.2", "3.7.0-0", "v1.14.6", "v0.36.0"),
    ],
)
def test_release_images_are_kubeadms(
    version: str, etcd: str, coredns: str, konnectivity: str
) -> None:
    entry = release(version)
    assert (entry.etcd, entry.coredns, entry.konnectivity) == (etcd, coredns, konnectivity)


def test_version_parse_refuses_garbage() -> None:
    with pytest.raises(ValueError):
        Version.parse("1.34")
    assert Version.parse("v1.34.1") < Version.parse("1.35.0")


def test_every_message_type_is_unique_and_versioned() -> None:
    assert len(BY_TYPE) == len(MESSAGES)
    for entry in MESSAGES:
        assert entry.type.startswith("io.nest.") and entry.type.endswith(".v1")
        kind = "intent" if entry.subject.startswith("nest.intent.") else "event"
        assert kind == entry.kind


def test_envelope_round_trip_is_cloudevents_structured_json() -> None:
    payload = ReconcileCluster(cluster_id="c", name="c", generation=3, spec=ClusterSpec())
    subject, envelope = envelope_for(payload, source="api", subject="c", correlation_id="req-1")
    assert subject == "nest.intent.provisioner.reconcile"
    raw = envelope.to_bytes()
    again = Envelope.from_bytes(raw)
    assert again.specversion == "1.0" and again.correlationid == "req-1"
    assert again.datacontenttype == "application/json"
    assert parse_payload(again) == payload
