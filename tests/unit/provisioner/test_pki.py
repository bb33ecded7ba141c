"""The per-cluster PKI: what each certificate says, how they chain, and when they are re-issued."""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from libs.common.contract.cluster import ClusterSpec
from services.provisioner import names, pki

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NAMESPACE = "nest-demo"
SERVER = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH

Secrets = dict[str, dict[str, bytes]]
ExtensionT = TypeVar("ExtensionT", bound=x509.ExtensionType)

CAS = (names.SECRET_CA, names.SECRET_FRONT_PROXY_CA, names.SECRET_ETCD_CA)
KUBECONFIGS = (names.SECRET_CONTROLLER_MANAGER_KUBECONFIG, names.SECRET_SCHEDULER_KUBECONFIG)
LEAVES = (
    names.SECRET_APISERVER,
    names.SECRET_APISERVER_KUBELET_CLIENT,
    names.SECRET_APISERVER_ETCD_CLIENT,
    names.SECRET_FRONT_PROXY_CLIENT,
    names.SECRET_ETCD_SERVER,
    names.SECRET_ETCD_PEER,
)
# secret -> (issuing CA secret, CN, O, EKUs)
PROFILES: dict[str, tuple[str, str, list[str], set[x509.ObjectIdentifier]]] = {
    names.SECRET_APISERVER: (names.SECRET_CA, "kube-apiserver", [], {SERVER}),
    names.SECRET_APISERVER_KUBELET_CLIENT: (
        names.SECRET_CA,
        "kube-apiserver-kubelet-client",
        ["kubeadm:cluster-admins"],
        {CLIENT},
    ),
    names.SECRET_APISERVER_ETCD_CLIENT: (
        names.SECRET_ETCD_CA,
        "kube-apiserver-etcd-client",
        [],
        {CLIENT},
    ),
    names.SECRET_FRONT_PROXY_CLIENT: (
        names.SECRET_FRONT_PROXY_CA,
        "front-proxy-client",
        [],
        {CLIENT},
    ),
    names.SECRET_ETCD_SERVER: (names.SECRET_ETCD_CA, "kube-etcd", [], {SERVER, CLIENT}),
    names.SECRET_ETCD_PEER: (names.SECRET_ETCD_CA, "kube-etcd-peer", [], {SERVER, CLIENT}),
    names.SECRET_CONTROLLER_MANAGER_KUBECONFIG: (
        names.SECRET_CA,
        "system:kube-controller-manager",
        [],
        {CLIENT},
    ),
    names.SECRET_SCHEDULER_KUBECONFIG: (names.SECRET_CA, "system:kube-scheduler", [], {CLIENT}),
}


def make_inputs(**overrides: object) -> pki.PKIInputs:
    values: dict[str, object] = {
        "cluster_name": "demo",
        "namespace": NAMESPACE,
        "service_cidr": "10.96.0.0/12",
        "dns_domain": "tenant.example",
        "etcd_replicas": 3,
        "endpoint_hosts": ("192.0.2.10", "Demo.Example.COM"),
        "service_ips": ("10.112.4.17",),
    }
    values.update(overrides)
    return pki.PKIInputs(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fresh() -> pki.PKIResult:
    return pki.reconcile_pki({}, make_inputs(), now=NOW)


def copy(secrets: Mapping[str, Mapping[str, bytes]]) -> Secrets:
    return {name: dict(data) for name, data in secrets.items()}


def cert_of(secrets: Mapping[str, Mapping[str, bytes]], name: str) -> x509.Certificate:
    if name in KUBECONFIGS:
        return x509.load_pem_x509_certificate(kubeconfig_parts(secrets[name][pki.KUBECONFIG])[2])
    return x509.load_pem_x509_certificate(secrets[name][pki.TLS_CRT])


def kubeconfig_parts(document: bytes) -> tuple[str, bytes, bytes, bytes]:
    """server, CA PEM, client certificate PEM, client key PEM."""
    config = json.loads(document)
    cluster = config["clusters"][0]["cluster"]
    user = config["users"][0]["user"]
    return (
        cluster["server"],
        base64.b64decode(cluster["certificate-authority-data"]),
        base64.b64decode(user["client-certificate-data"]),
        base64.b64decode(user["client-key-data"]),
    )


def extension(cert: x509.Certificate, kind: type[ExtensionT]) -> x509.Extension[ExtensionT]:
    return cert.extensions.get_extension_for_class(kind)


def verify_server(ca: x509.Certificate, leaf: x509.Certificate, host: str) -> None:
    subject: verification.Subject
    try:
        subject = verification.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = verification.DNSName(host)
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([ca]))
        .time(NOW + timedelta(minutes=1))
        .build_server_verifier(subject)
    )
    chain = verifier.verify(leaf, [])
    assert chain[-1] == ca


def verify_client(ca: x509.Certificate, leaf: x509.Certificate) -> None:
    # Client certificates carry no SANs (as kubeadm's), which the WebPKI defaults require.
    leaf_policy = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
    )
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([ca]))
        .time(NOW + timedelta(minutes=1))
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf_policy
        )
        .build_client_verifier()
    )
    verified = verifier.verify(leaf, [])
    assert verified.chain[-1] == ca


def renewed(result: pki.PKIResult) -> dict[str, str]:
    return {c.name: c.reason for c in result.report.changes if c.action == "renewed"}


class TestFreshCluster:
    def test_creates_every_secret_with_its_type(self, fresh: pki.PKIResult) -> None:
        assert tuple(fresh.secrets) == pki.PKI_SECRETS
        assert fresh.report.created == pki.PKI_SECRETS
        assert fresh.report.renewed == ()
        assert fresh.report.replaced_cas == ()
        for name in (*CAS, *LEAVES):
            assert pki.SECRET_TYPES[name] == "kubernetes.io/tls"
            assert set(fresh.secrets[name]) == {"tls.crt", "tls.key", "ca.crt"}
        for name in (names.SECRET_SERVICE_ACCOUNT, *KUBECONFIGS):
            assert pki.SECRET_TYPES[name] == "Opaque"
        assert set(fresh.secrets[names.SECRET_SERVICE_ACCOUNT]) == {"sa.key", "sa.pub"}
        for name in KUBECONFIGS:
            assert set(fresh.secrets[name]) == {"kubeconfig"}

    @pytest.mark.parametrize(
        ("secret", "common_name"),
        [
            (names.SECRET_CA, "kubernetes"),
            (names.SECRET_FRONT_PROXY_CA, "front-proxy-ca"),
            (names.SECRET_ETCD_CA, "etcd-ca"),
        ],
    )
    def test_ca_is_a_ten_year_self_signed_ca(
        self, fresh: pki.PKIResult, secret: str, common_name: str
    ) -> None:
        data = fresh.secrets[secret]
        ca = x509.load_pem_x509_certificate(data["tls.crt"])
        assert data["ca.crt"] == data["tls.crt"]
        assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == common_name
        assert ca.issuer == ca.subject
        ca.verify_directly_issued_by(ca)
        constraints = extension(ca, x509.BasicConstraints)
        assert constraints.critical
        assert constraints.value.ca
        usage = extension(ca, x509.KeyUsage)
        assert usage.critical
        assert usage.value.key_cert_sign
        assert usage.value.digital_signature
        ski = extension(ca, x509.SubjectKeyIdentifier).value
        assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.public_key())
        assert ca.not_valid_after_utc == NOW + timedelta(days=3650)
        assert ca.not_valid_before_utc <= NOW
        key = serialization.load_pem_private_key(data["tls.key"], None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert key.public_key() == ca.public_key()

    @pytest.mark.parametrize("secret", [*LEAVES, *KUBECONFIGS])
    def test_leaf_says_what_kubeadm_says(self, fresh: pki.PKIResult, secret: str) -> None:
        issuer_secret, common_name, organizations, usages = PROFILES[secret]
        ca = cert_of(fresh.secrets, issuer_secret)
        leaf = cert_of(fresh.secrets, secret)
        subject = leaf.subject
        assert [a.value for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [
            common_name
        ]
        assert [
            a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        ] == organizations
        assert set(extension(leaf, x509.ExtendedKeyUsage).value) == usages
        constraints = extension(leaf, x509.BasicConstraints)
        assert constraints.critical
        assert not constraints.value.ca
        usage = extension(leaf, x509.KeyUsage)
        assert usage.critical
        assert usage.value.digital_signature
        assert not usage.value.key_cert_sign
        assert not usage.value.key_encipherment  # ECDSA keys do no key transport
        aki = extension(leaf, x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == extension(ca, x509.SubjectKeyIdentifier).value.digest
        assert leaf.issuer == ca.subject
        leaf.verify_directly_issued_by(ca)
        assert leaf.not_valid_after_utc == NOW + timedelta(days=365)
        assert leaf.not_valid_before_utc <= NOW
        if secret not in KUBECONFIGS:
            assert fresh.secrets[secret]["ca.crt"] == fresh.secrets[issuer_secret]["tls.crt"]
            key = serialization.load_pem_private_key(fresh.secrets[secret]["tls.key"], None)
            assert key.public_key() == leaf.public_key()

    @pytest.mark.parametrize(
        "host",
        [
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.tenant.example",
            "10.96.0.1",
            "192.0.2.10",
            "demo.example.com",
            "localhost",
            "127.0.0.1",
            "kube-apiserver.nest-demo.svc",
            "kube-apiserver.nest-demo.svc.cluster.local",
            "10.112.4.17",  # the endpoint Service's cluster IP in the management cluster
        ],
    )
    def test_apiserver_chain_verifies_for(self, fresh: pki.PKIResult, host: str) -> None:
        verify_server(
            cert_of(fresh.secrets, names.SECRET_CA),
            cert_of(fresh.secrets, names.SECRET_APISERVER),
            host,
        )

    def test_apiserver_sans_are_exactly_kubeadms_plus_the_services(
        self, fresh: pki.PKIResult
    ) -> None:
        sans = extension(
            cert_of(fresh.secrets, names.SECRET_APISERVER), x509.SubjectAlternativeName
        )
        assert set(sans.value.get_values_for_type(x509.DNSName)) == {
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.tenant.example",
            "demo.example.com",
            "localhost",
            *names.api_service_hosts(NAMESPACE),
        }
        assert set(sans.value.get_values_for_type(x509.IPAddress)) == {
            ipaddress.ip_address("10.96.0.1"),
            ipaddress.ip_address("192.0.2.10"),
            ipaddress.ip_address("10.112.4.17"),
            ipaddress.ip_address("127.0.0.1"),
        }

    @pytest.mark.parametrize("secret", [names.SECRET_ETCD_SERVER, names.SECRET_ETCD_PEER])
    def test_etcd_certificates_name_every_member(self, fresh: pki.PKIResult, secret: str) -> None:
        ca = cert_of(fresh.secrets, names.SECRET_ETCD_CA)
        leaf = cert_of(fresh.secrets, secret)
        sans = extension(leaf, x509.SubjectAlternativeName).value
        dns_names = set(sans.get_values_for_type(x509.DNSName))
        assert set(names.etcd_member_hosts(NAMESPACE, 3)) <= dns_names
        assert "localhost" in dns_names
        assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
        for host in ("etcd-2.etcd.nest-demo.svc.cluster.local", "etcd-0", "127.0.0.1", "etcd"):
            verify_server(ca, leaf, host)
        verify_client(ca, leaf)

    @pytest.mark.parametrize(
        "secret",
        [
            names.SECRET_APISERVER_KUBELET_CLIENT,
            names.SECRET_APISERVER_ETCD_CLIENT,
            names.SECRET_FRONT_PROXY_CLIENT,
            *KUBECONFIGS,
        ],
    )
    def test_client_chain_verifies(self, fresh: pki.PKIResult, secret: str) -> None:
        verify_client(cert_of(fresh.secrets, PROFILES[secret][0]), cert_of(fresh.secrets, secret))

    def test_client_certificate_does_not_verify_against_another_ca(
        self, fresh: pki.PKIResult
    ) -> None:
        with pytest.raises(verification.VerificationError):
            verify_client(
                cert_of(fresh.secrets, names.SECRET_CA),
                cert_of(fresh.secrets, names.SECRET_APISERVER_ETCD_CLIENT),
            )

    @pytest.mark.parametrize("secret", KUBECONFIGS)
    def test_kubeconfig_points_at_the_local_api_server(
        self, fresh: pki.PKIResult, secret: str
    ) -> None:
        document = fresh.secrets[secret]["kubeconfig"]
        config = json.loads(document)
        assert config["kind"] == "Config"
        assert config["current-context"] == config["contexts"][0]["name"]
        server, ca_pem, cert_pem, key_pem = kubeconfig_parts(document)
        assert server == "https://localhost:6443"
        assert ca_pem == fresh.secrets[names.SECRET_CA]["tls.crt"]
        key = serialization.load_pem_private_key(key_pem, None)
        assert key.public_key() == x509.load_pem_x509_certificate(cert_pem).public_key()

    def test_service_account_key_pair(self, fresh: pki.PKIResult) -> None:
        data = fresh.secrets[names.SECRET_SERVICE_ACCOUNT]
        key = serialization.load_pem_private_key(data["sa.key"], None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert serialization.load_pem_public_key(data["sa.pub"]) == key.public_key()

    def test_next_renewal_is_thirty_days_before_leaves_expire(self, fresh: pki.PKIResult) -> None:
        assert fresh.report.next_renewal_at == NOW + timedelta(days=365 - 30)


class TestReuse:
    def test_nothing_changes_when_nothing_changed(self, fresh: pki.PKIResult) -> None:
        later = NOW + timedelta(days=200)
        again = pki.reconcile_pki(copy(fresh.secrets), make_inputs(), now=later)
        assert again.report.changes == ()
        assert again.report.changed == frozenset()
        assert again.secrets == fresh.secrets

    def test_nothing_changes_in_a_fresh_process(self, fresh: pki.PKIResult) -> None:
        pki._proven.clear()  # what a restarted provisioner starts with: nothing proven yet
        again = pki.reconcile_pki(copy(fresh.secrets), make_inputs(), now=NOW)
        assert again.report.changes == ()
        assert again.secrets == fresh.secrets

    def test_renews_leaves_under_the_threshold_and_keeps_the_cas(
        self, fresh: pki.PKIResult
    ) -> None:
        later = NOW + timedelta(days=365 - 29)
        result = pki.reconcile_pki(copy(fresh.secrets), make_inputs(), now=later)
        assert set(renewed(result)) == {*LEAVES, *KUBECONFIGS}
        assert all("renewal threshold" in reason for reason in renewed(result).values())
        for name in (*CAS, names.SECRET_SERVICE_ACCOUNT):
            assert result.secrets[name] == fresh.secrets[name]
        for name in (*LEAVES, *KUBECONFIGS):
            leaf = cert_of(result.secrets, name)
            assert leaf.not_valid_after_utc == later + timedelta(days=365)
            leaf.verify_directly_issued_by(cert_of(fresh.secrets, PROFILES[name][0]))
        # The new leaves are then left alone.
        settled = pki.reconcile_pki(result.secrets, make_inputs(), now=later)
        assert settled.report.changes == ()

    def test_threshold_is_a_parameter(self, fresh: pki.PKIResult) -> None:
        later = NOW + timedelta(days=300)
        kept = pki.reconcile_pki(copy(fresh.secrets), make_inputs(), now=later)
        assert kept.report.changes == ()
        result = pki.reconcile_pki(
            copy(fresh.secrets), make_inputs(), now=later, renew_before=timedelta(days=90)
        )
        assert set(renewed(result)) == {*LEAVES, *KUBECONFIGS}

    def test_ca_is_never_regenerated_even_close_to_expiry(self, fresh: pki.PKIResult) -> None:
        late = NOW + timedelta(days=3650 - 10)
        result = pki.reconcile_pki(copy(fresh.secrets), make_inputs(), now=late)
        for name in (*CAS, names.SECRET_SERVICE_ACCOUNT):
            assert result.secrets[name] == fresh.secrets[name]
        assert set(result.report.expiring_cas) == set(CAS)
        ca = cert_of(fresh.secrets, names.SECRET_CA)
        apiserver = cert_of(result.secrets, names.SECRET_APISERVER)
        assert apiserver.not_valid_after_utc == ca.not_valid_after_utc  # never outlives its CA
        # Re-issuing could not extend such a leaf, so it is not churned on every pass.
        again = pki.reconcile_pki(result.secrets, make_inputs(), now=late + timedelta(hours=1))
        assert again.report.changes == ()

    def test_missing_ca_is_created_and_its_leaves_reissued(self, fresh: pki.PKIResult) -> None:
        secrets = copy(fresh.secrets)
        del secrets[names.SECRET_CA]
        result = pki.reconcile_pki(secrets, make_inputs(), now=NOW + timedelta(days=1))
        assert result.report.created == (names.SECRET_CA,)
        signed_by_ca = {n for n, profile in PROFILES.items() if profile[0] == names.SECRET_CA}
        assert set(renewed(result)) == signed_by_ca
        new_ca = cert_of(result.secrets, names.SECRET_CA)
        assert new_ca != cert_of(fresh.secrets, names.SECRET_CA)
        for name in signed_by_ca:
            cert_of(result.secrets, name).verify_directly_issued_by(new_ca)
        for name in set(PROFILES) - signed_by_ca:
            assert result.secrets[name] == fresh.secrets[name]

    def test_endpoint_change_reissues_only_the_apiserver_certificate(
        self, fresh: pki.PKIResult
    ) -> None:
        inputs = make_inputs(endpoint_hosts=("198.51.100.7",))
        result = pki.reconcile_pki(copy(fresh.secrets), inputs, now=NOW)
        assert renewed(result) == {names.SECRET_APISERVER: "subject alternative names changed"}
        verify_server(
            cert_of(fresh.secrets, names.SECRET_CA),
            cert_of(result.secrets, names.SECRET_APISERVER),
            "198.51.100.7",
        )

    def test_a_new_service_cluster_ip_reissues_only_the_apiserver_certificate(
        self, fresh: pki.PKIResult
    ) -> None:
        # The endpoint Service was re-created (a new ClusterIP), and it is dual-stack now.
        moved = make_inputs(service_ips=("10.112.9.3", "fd00:10:112::9"))
        result = pki.reconcile_pki(copy(fresh.secrets), moved, now=NOW)
        assert renewed(result) == {names.SECRET_APISERVER: "subject alternative names changed"}
        ca = cert_of(fresh.secrets, names.SECRET_CA)
        for host in ("10.112.9.3", "fd00:10:112::9"):
            verify_server(ca, cert_of(result.secrets, names.SECRET_APISERVER), host)
        sans = extension(
            cert_of(result.secrets, names.SECRET_APISERVER), x509.SubjectAlternativeName
        )
        assert ipaddress.ip_address("10.112.4.17") not in sans.value.get_values_for_type(
            x509.IPAddress
        )
        assert pki.reconcile_pki(result.secrets, moved, now=NOW).report.changes == ()

    def test_endpoint_known_later_is_added(self) -> None:
        unknown = make_inputs(endpoint_hosts=())
        first = pki.reconcile_pki({}, unknown, now=NOW)
        assert pki.reconcile_pki(first.secrets, unknown, now=NOW).report.changes == ()
        known = make_inputs(endpoint_hosts=("api.demo.example",))
        result = pki.reconcile_pki(first.secrets, known, now=NOW)
        assert result.report.changed == {names.SECRET_APISERVER}

    def test_etcd_replica_change_reissues_the_etcd_certificates(self, fresh: pki.PKIResult) -> None:
        result = pki.reconcile_pki(copy(fresh.secrets), make_inputs(etcd_replicas=1), now=NOW)
        assert set(renewed(result)) == {names.SECRET_ETCD_SERVER, names.SECRET_ETCD_PEER}
        sans = extension(
            cert_of(result.secrets, names.SECRET_ETCD_SERVER), x509.SubjectAlternativeName
        )
        assert "etcd-2" not in sans.value.get_values_for_type(x509.DNSName)

    def test_leaf_from_another_clusters_ca_is_reissued(self, fresh: pki.PKIResult) -> None:
        other = pki.reconcile_pki({}, make_inputs(cluster_name="other"), now=NOW)
        secrets = copy(fresh.secrets)
        for name in (names.SECRET_APISERVER_ETCD_CLIENT, names.SECRET_SCHEDULER_KUBECONFIG):
            secrets[name] = dict(other.secrets[name])
        # Same subject, SANs and issuer name: only the signature tells them apart.
        secrets[names.SECRET_APISERVER_ETCD_CLIENT]["ca.crt"] = fresh.secrets[names.SECRET_ETCD_CA][
            "tls.crt"
        ]
        result = pki.reconcile_pki(secrets, make_inputs(), now=NOW)
        assert renewed(result) == {
            names.SECRET_APISERVER_ETCD_CLIENT: "not signed by the current CA",
            names.SECRET_SCHEDULER_KUBECONFIG: "CA changed",
        }
        cert_of(result.secrets, names.SECRET_APISERVER_ETCD_CLIENT).verify_directly_issued_by(
            cert_of(fresh.secrets, names.SECRET_ETCD_CA)
        )

    def test_unreadable_or_mismatched_leaf_is_reissued(self, fresh: pki.PKIResult) -> None:
        secrets = copy(fresh.secrets)
        secrets[names.SECRET_APISERVER]["tls.crt"] = b"not a certificate"
        secrets[names.SECRET_ETCD_PEER]["tls.key"] = fresh.secrets[names.SECRET_ETCD_SERVER][
            "tls.key"
        ]
        secrets[names.SECRET_SCHEDULER_KUBECONFIG]["kubeconfig"] = b"apiVersion: v1\n"
        del secrets[names.SECRET_FRONT_PROXY_CLIENT]["tls.key"]
        reasons = renewed(pki.reconcile_pki(secrets, make_inputs(), now=NOW))
        assert reasons[names.SECRET_APISERVER].startswith("unreadable")
        assert reasons[names.SECRET_ETCD_PEER] == "the key does not belong to the certificate"
        assert reasons[names.SECRET_SCHEDULER_KUBECONFIG].startswith("unreadable")
        assert reasons[names.SECRET_FRONT_PROXY_CLIENT] == "unreadable: no 'tls.key' key"

    def test_stale_bundle_is_corrected_without_reissuing(self, fresh: pki.PKIResult) -> None:
        secrets = copy(fresh.secrets)
        del secrets[names.SECRET_APISERVER]["ca.crt"]
        secrets[names.SECRET_SERVICE_ACCOUNT]["sa.pub"] = b""
        result = pki.reconcile_pki(secrets, make_inputs(), now=NOW)
        assert {(c.name, c.action) for c in result.report.changes} == {
            (names.SECRET_APISERVER, "updated"),
            (names.SECRET_SERVICE_ACCOUNT, "updated"),
        }
        assert result.secrets == fresh.secrets

    def test_unusable_ca_is_replaced(self, fresh: pki.PKIResult) -> None:
        secrets = copy(fresh.secrets)
        secrets[names.SECRET_ETCD_CA]["tls.key"] = fresh.secrets[names.SECRET_CA]["tls.key"]
        result = pki.reconcile_pki(secrets, make_inputs(), now=NOW)
        assert renewed(result)[names.SECRET_ETCD_CA] == "the key does not belong to the certificate"
        assert result.report.replaced_cas == (names.SECRET_ETCD_CA,)
        assert result.secrets[names.SECRET_CA] == fresh.secrets[names.SECRET_CA]


class TestAdminKubeconfig:
    def issue(self, fresh: pki.PKIResult, **overrides: object) -> pki.IssuedKubeconfig:
        arguments: dict[str, object] = {
            "cluster_name": "demo",
            "server_url": "https://192.0.2.10:6443",
            "requester": "alice@example.com",
            "now": NOW,
        }
        arguments.update(overrides)
        return pki.issue_admin_kubeconfig(fresh.secrets[names.SECRET_CA], **arguments)  # type: ignore[arg-type]

    def test_short_lived_system_masters_certificate(self, fresh: pki.PKIResult) -> None:
        issued = self.issue(fresh)
        server, ca_pem, cert_pem, key_pem = kubeconfig_parts(issued.kubeconfig)
        assert server == "https://192.0.2.10:6443"
        assert ca_pem == fresh.secrets[names.SECRET_CA]["tls.crt"]
        cert = x509.load_pem_x509_certificate(cert_pem)
        assert cert.subject.rfc4514_string() == "CN=nest:admin:alice@example.com,O=system:masters"
        assert issued.user == "nest:admin:alice@example.com"
        assert cert.not_valid_after_utc == NOW + timedelta(hours=8) == issued.expires_at
        assert set(extension(cert, x509.ExtendedKeyUsage).value) == {CLIENT}
        assert serialization.load_pem_private_key(key_pem, None).public_key() == cert.public_key()
        verify_client(cert_of(fresh.secrets, names.SECRET_CA), cert)

    def test_lifetime_up_to_a_day(self, fresh: pki.PKIResult) -> None:
        issued = self.issue(fresh, lifetime=timedelta(hours=24))
        assert issued.expires_at == NOW + timedelta(hours=24)
        with pytest.raises(pki.LifetimeTooLongError, match="at most 1 day"):
            self.issue(fresh, lifetime=timedelta(hours=24, seconds=1))
        with pytest.raises(pki.InvalidPKIInputError, match="positive"):
            self.issue(fresh, lifetime=timedelta(0))

    @pytest.mark.parametrize(
        ("overrides", "message"),
        [
            ({"server_url": "http://192.0.2.10:6443"}, "https"),
            ({"requester": ""}, "requester"),
            ({"requester": "x" * 60}, "at most 53"),
            ({"now": datetime(2026, 3, 1)}, "timezone"),
        ],
    )
    def test_bad_requests_are_refused(
        self, fresh: pki.PKIResult, overrides: dict[str, object], message: str
    ) -> None:
        with pytest.raises(pki.InvalidPKIInputError, match=message):
            self.issue(fresh, **overrides)

    def test_needs_a_usable_ca(self, fresh: pki.PKIResult) -> None:
        with pytest.raises(pki.CAUnavailableError, match=r"no 'tls\.key' key"):
            pki.issue_admin_kubeconfig(
                {"tls.crt": fresh.secrets[names.SECRET_CA]["tls.crt"]},
                cluster_name="demo",
                server_url="https://192.0.2.10:6443",
                requester="alice",
                now=NOW,
            )
        with pytest.raises(pki.CAUnavailableError, match="expired"):
            self.issue(fresh, now=NOW + timedelta(days=3651))


class TestEtcdClient:
    def test_signed_by_the_etcd_ca(self, fresh: pki.PKIResult) -> None:
        issued = pki.issue_etcd_client(
            fresh.secrets[names.SECRET_ETCD_CA], common_name="nest-backup", now=NOW
        )
        cert = x509.load_pem_x509_certificate(issued.cert_pem)
        assert issued.ca_pem == fresh.secrets[names.SECRET_ETCD_CA]["tls.crt"]
        assert cert.subject.rfc4514_string() == "CN=nest-backup"
        assert issued.expires_at == NOW + timedelta(hours=1)
        assert set(extension(cert, x509.ExtendedKeyUsage).value) == {CLIENT}
        verify_client(cert_of(fresh.secrets, names.SECRET_ETCD_CA), cert)

    def test_lifetime_is_bounded(self, fresh: pki.PKIResult) -> None:
        with pytest.raises(pki.LifetimeTooLongError):
            pki.issue_etcd_client(
                fresh.secrets[names.SECRET_ETCD_CA],
                common_name="nest-backup",
                now=NOW,
                lifetime=timedelta(days=366),
            )


class TestInputs:
    def test_from_a_cluster_spec(self) -> None:
        spec = ClusterSpec.model_validate(
            {"network": {"serviceCidr": "172.20.0.0/16"}, "datastore": {"replicas": 1}}
        )
        inputs = pki.PKIInputs.for_cluster(
            "demo", spec, endpoint_hosts=["192.0.2.1"], service_ips=["10.112.0.9"]
        )
        assert inputs.namespace == names.namespace_for("demo")
        assert inputs.etcd_replicas == 1
        assert inputs.endpoint_hosts == ("192.0.2.1",)
        assert inputs.service_ips == ("10.112.0.9",)
        result = pki.reconcile_pki({}, inputs, now=NOW)
        verify_server(
            cert_of(result.secrets, names.SECRET_CA),
            cert_of(result.secrets, names.SECRET_APISERVER),
            "172.20.0.1",
        )

    @pytest.mark.parametrize(
        ("overrides", "message"),
        [
            ({"service_cidr": "10.96.0.0/33"}, "service_cidr"),
            ({"endpoint_hosts": ("bad host",)}, "endpoint host"),
            ({"service_ips": ("None",)}, "service IP"),
            ({"etcd_replicas": 0}, "etcd_replicas"),
            ({"dns_domain": "Not_A_Domain"}, "dns_domain"),
            ({"namespace": ""}, "namespace"),
        ],
    )
    def test_bad_inputs_are_refused(self, overrides: dict[str, object], message: str) -> None:
        with pytest.raises(pki.InvalidPKIInputError, match=message):
            make_inputs(**overrides)

    def test_bad_threshold_and_time_are_refused(self) -> None:
        with pytest.raises(pki.InvalidPKIInputError, match="renew_before"):
            pki.reconcile_pki({}, make_inputs(), now=NOW, renew_before=timedelta(days=365))
        with pytest.raises(pki.InvalidPKIInputError, match="timezone"):
            pki.reconcile_pki({}, make_inputs(), now=datetime(2026, 3, 1))
