"""The PKI of one hosted control plane: kubeadm's certificates, keys and kubeconfigs, as data.

Pure functions: they take the secrets that exist now, the cluster's inputs and the current time,
and return the secrets that should exist. Nothing here reads a clock, a file or the network;
the only side effects are drawing randomness for new keys and serial numbers, and a bounded
in-process memo of certificates already proven to chain (see `_proven`), which changes speed,
never results.

Interface for the reconciler and the manifests module:

- `reconcile_pki(existing, inputs, now=...)` takes `existing`, a mapping of secret name (the
  `SECRET_*` names in `services.provisioner.names`) to that Secret's *decoded* data
  (`{"tls.crt": b"...", ...}`), and returns a `PKIResult`:
  - `secrets`: secret name -> key -> bytes, the full desired set (every name in `PKI_SECRETS`).
    A secret that needed nothing is returned byte-for-byte as it came in.
  - `report.changes`: which secrets were created, renewed or updated and why; `report.changed`
    is the set of names whose data differs from `existing`, i.e. what to write and which pods
    to roll. `report.expiring_cas` lists CAs close to expiry (never renewed automatically);
    `report.replaced_cas` lists CAs that existed but were unusable and had to be regenerated.
    `report.next_renewal_at` is when the next leaf falls under the renewal threshold, so the
    caller can schedule a resync.
- `SECRET_TYPES[name]` is the Secret `type`: `kubernetes.io/tls` for every CA and leaf
  certificate (keys `tls.crt`, `tls.key`, `ca.crt` = the issuing CA), `Opaque` for the
  service-account key pair (`sa.key`, `sa.pub`) and the kubeconfigs (`kubeconfig`).
- `issue_admin_kubeconfig(...)` signs a short-lived `system:masters` client certificate from the
  cluster CA and wraps it in a kubeconfig (the API's kubeconfig endpoint).
- `issue_etcd_client(...)` signs a short-lived client certificate from the etcd CA (backups).

Layout and lifetimes follow kubeadm (CAs 10 years, everything else 1 year). Every key Nest
generates is ECDSA P-256 rather than kubeadm's default RSA 2048: generating one takes ~15 µs
instead of ~50 ms, which is what lets a resync of a thousand clusters stay cheap, and every
consumer here (kube-apiserver, kubelet, etcd, client-go, service-account token signing as
ES256) accepts it. Existing RSA material (e.g. a CA imported from kubeadm) is kept and used.

Rules: a CA that is present and usable is never regenerated, because worker nodes trust it;
a leaf is re-issued when it is missing, unreadable, under the renewal threshold, not signed by
the current CA, or no longer matches what it should say (subject, usages, SANs, server URL).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from libs.common.contract.cluster import ClusterSpec
from services.provisioner import names

CA_LIFETIME = timedelta(days=3650)
"""kubeadm's CA lifetime (10 years)."""
LEAF_LIFETIME = timedelta(days=365)
"""kubeadm's lifetime for every certificate a CA signs (1 year)."""
RENEW_BEFORE = timedelta(days=30)
"""Default renewal threshold: a leaf with less than this left is re-issued."""
ADMIN_LIFETIME = timedelta(hours=8)
"""Default lifetime of an admin kubeconfig handed out by the API."""
ADMIN_MAX_LIFETIME = timedelta(hours=24)
"""Longest admin kubeconfig Nest signs; a leaked system:masters credential cannot be revoked."""
ETCD_CLIENT_LIFETIME = timedelta(hours=1)
"""Default lifetime of an etcd client certificate for a one-off job such as a snapshot."""
BACKDATE = timedelta(minutes=5)
"""Certificates start this long before `now`, so a peer whose clock lags accepts them."""

TLS_CRT = "tls.crt"
TLS_KEY = "tls.key"
CA_CRT = "ca.crt"
SA_KEY = "sa.key"
SA_PUB = "sa.pub"
KUBECONFIG = "kubeconfig"

SECRET_TYPE_TLS = "kubernetes.io/tls"
SECRET_TYPE_OPAQUE = "Opaque"

CLUSTER_CA_NAME = "kubernetes"
FRONT_PROXY_CA_NAME = "front-proxy-ca"
ETCD_CA_NAME = "etcd-ca"
SYSTEM_MASTERS = "system:masters"
CLUSTER_ADMINS = "kubeadm:cluster-admins"
ADMIN_CN_PREFIX = "nest:admin:"
INTERNAL_SERVER_URL = f"https://localhost:{names.API_PORT}"
"""The internal server URL for the default port (LoadBalancer mode); see `internal_server_url`."""
KONNECTIVITY_SERVER_USER = "system:konnectivity-server"
"""The konnectivity server's user in the tenant; the add-ons bind it to system:auth-delegator."""


def internal_server_url(apiserver_port: int) -> str:
    """controller-manager, scheduler and konnectivity share the API server's pod, so they dial
    it on loopback, at the port it listens on (the NodePort number in NodePort mode)."""
    return f"https://localhost:{apiserver_port}"


_CAS: tuple[tuple[str, str], ...] = (
    (names.SECRET_CA, CLUSTER_CA_NAME),
    (names.SECRET_FRONT_PROXY_CA, FRONT_PROXY_CA_NAME),
    (names.SECRET_ETCD_CA, ETCD_CA_NAME),
)

_CA_SECRETS = frozenset(secret for secret, _ in _CAS)

PKI_SECRETS: tuple[str, ...] = (
    names.SECRET_CA,
    names.SECRET_FRONT_PROXY_CA,
    names.SECRET_ETCD_CA,
    names.SECRET_SERVICE_ACCOUNT,
    names.SECRET_APISERVER,
    names.SECRET_APISERVER_KUBELET_CLIENT,
    names.SECRET_APISERVER_ETCD_CLIENT,
    names.SECRET_FRONT_PROXY_CLIENT,
    names.SECRET_ETCD_SERVER,
    names.SECRET_ETCD_PEER,
    names.SECRET_CONTROLLER_MANAGER_KUBECONFIG,
    names.SECRET_SCHEDULER_KUBECONFIG,
)
"""Every secret `reconcile_pki` returns, CAs first (plus `KONNECTIVITY_SECRETS` when on)."""

KONNECTIVITY_SECRETS: tuple[str, ...] = (names.SECRET_KONNECTIVITY_KUBECONFIG,)
"""Secrets `reconcile_pki` adds when `PKIInputs.konnectivity` is set."""

SECRET_TYPES: Mapping[str, str] = MappingProxyType(
    {
        name: (
            SECRET_TYPE_OPAQUE
            if name
            in (
                names.SECRET_SERVICE_ACCOUNT,
                names.SECRET_CONTROLLER_MANAGER_KUBECONFIG,
                names.SECRET_SCHEDULER_KUBECONFIG,
                names.SECRET_KONNECTIVITY_KUBECONFIG,
            )
            else SECRET_TYPE_TLS
        )
        for name in (*PKI_SECRETS, *KONNECTIVITY_SECRETS)
    }
)
"""Secret name -> the Kubernetes Secret `type` to create it with."""

_HOSTNAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_MAX_CN = 64  # RFC 5280 ub-common-name

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_T = TypeVar("_T")
_ISSUER_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)
_UNREADABLE = (KeyError, IndexError, AttributeError, ValueError, TypeError, UnsupportedAlgorithm)
ChangeAction = Literal["created", "renewed", "updated"]


class PKIError(Exception):
    """Base class of every PKI failure."""


class InvalidPKIInputError(PKIError, ValueError):
    """An input cannot produce a valid certificate (bad CIDR, host, name, time or lifetime)."""


class LifetimeTooLongError(PKIError):
    """A requested certificate lifetime exceeds what Nest signs for that kind of credential."""


class CAUnavailableError(PKIError):
    """The CA needed to sign is missing, unreadable or expired; reconcile the cluster first."""


@dataclass(frozen=True, slots=True)
class PKIInputs:
    """Everything about a cluster that its certificates depend on."""

    cluster_name: str
    """The cluster's name; names the cluster in the kubeconfigs."""
    namespace: str
    """The cluster's namespace in the management cluster (`names.namespace_for`)."""
    service_cidr: str = "10.96.0.0/12"
    """The tenant's Service range; its first address is the `kubernetes` Service's IP."""
    dns_domain: str = "cluster.local"
    """The tenant cluster's DNS domain (`kubernetes.default.svc.<dns_domain>`)."""
    etcd_replicas: int = 3
    """etcd members; each one's DNS names go into the etcd certificates."""
    endpoint_hosts: tuple[str, ...] = ()
    """Addresses (IP or DNS name) clients reach the API at; empty while still unknown."""
    service_ips: tuple[str, ...] = ()
    """Cluster IPs of the endpoint Service in the management cluster (its `spec.clusterIPs`),
    which clients inside the management cluster dial; empty while it has none."""
    management_dns_domain: str = "cluster.local"
    """DNS domain of the management cluster, where the etcd and API Services live."""
    apiserver_port: int = names.API_PORT
    """Port the API server listens on in its pod (`manifests.apiserver_port`); the internal
    kubeconfigs dial `https://localhost:<this>`."""
    konnectivity: bool = False
    """Whether the konnectivity add-on is on: it needs its own kubeconfig secret."""

    def __post_init__(self) -> None:
        if not self.cluster_name:
            raise InvalidPKIInputError("cluster_name must not be empty")
        if not self.namespace:
            raise InvalidPKIInputError("namespace must not be empty")
        try:
            ipaddress.ip_network(self.service_cidr, strict=False)
        except ValueError:
            raise InvalidPKIInputError(
                f"service_cidr {self.service_cidr!r} is not a CIDR network"
            ) from None
        for field_name in ("dns_domain", "management_dns_domain"):
            value = getattr(self, field_name)
            if len(value) > 253 or not _HOSTNAME.match(value):
                raise InvalidPKIInputError(f"{field_name} {value!r} is not a DNS domain")
        if self.etcd_replicas < 1:
            raise InvalidPKIInputError(
                f"etcd_replicas must be at least 1, not {self.etcd_replicas}"
            )
        if not 1 <= self.apiserver_port <= 65535:
            raise InvalidPKIInputError(f"apiserver_port {self.apiserver_port} is not a TCP port")
        # A list passed by the caller would make the dataclass unhashable and mutable.
        hosts = tuple(_endpoint_host(host) for host in self.endpoint_hosts)
        object.__setattr__(self, "endpoint_hosts", hosts)
        object.__setattr__(self, "service_ips", tuple(_service_ip(ip) for ip in self.service_ips))

    @classmethod
    def for_cluster(
        cls,
        name: str,
        spec: ClusterSpec,
        endpoint_hosts: Iterable[str] = (),
        management_dns_domain: str = "cluster.local",
        apiserver_port: int = names.API_PORT,
        service_ips: Iterable[str] = (),
    ) -> PKIInputs:
        """The inputs of cluster `name` with `spec`, reached at `endpoint_hosts` once known
        and at `service_ips` inside the management cluster."""
        return cls(
            cluster_name=name,
            namespace=names.namespace_for(name),
            service_cidr=spec.network.service_cidr,
            dns_domain=spec.network.dns_domain,
            etcd_replicas=spec.datastore.replicas,
            endpoint_hosts=tuple(endpoint_hosts),
            service_ips=tuple(service_ips),
            management_dns_domain=management_dns_domain,
            apiserver_port=apiserver_port,
            konnectivity=spec.addons.konnectivity.enabled,
        )


@dataclass(frozen=True, slots=True)
class SecretChange:
    """One secret whose data `reconcile_pki` changed, and why (fit for a condition message)."""

    name: str
    action: ChangeAction
    """created: did not exist; renewed: new key and certificate; updated: same key and
    certificate, other data corrected (e.g. a stale ca.crt)."""
    reason: str


@dataclass(frozen=True, slots=True)
class PKIReport:
    """What `reconcile_pki` did, for events, conditions and pod rollouts."""

    changes: tuple[SecretChange, ...] = ()
    expiring_cas: tuple[str, ...] = ()
    """CA secrets with less than the renewal threshold left; needs an operator's CA rotation."""
    next_renewal_at: datetime | None = None
    """When the earliest leaf falls under the renewal threshold."""

    @property
    def changed(self) -> frozenset[str]:
        return frozenset(change.name for change in self.changes)

    @property
    def created(self) -> tuple[str, ...]:
        return tuple(change.name for change in self.changes if change.action == "created")

    @property
    def renewed(self) -> tuple[str, ...]:
        return tuple(change.name for change in self.changes if change.action == "renewed")

    @property
    def replaced_cas(self) -> tuple[str, ...]:
        """CAs that existed but were unusable and got regenerated: every node trusting the old
        one must be given the new one, so this deserves a warning condition."""
        return tuple(
            change.name
            for change in self.changes
            if change.action == "renewed" and change.name in _CA_SECRETS
        )


@dataclass(frozen=True, slots=True)
class PKIResult:
    """The desired PKI secrets of a cluster and what changed to get there."""

    secrets: dict[str, dict[str, bytes]]
    report: PKIReport = field(default_factory=PKIReport)


@dataclass(frozen=True, slots=True)
class IssuedKubeconfig:
    """A kubeconfig with an embedded client certificate, and when that certificate expires."""

    kubeconfig: bytes
    user: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A client certificate, its key and the CA that verifies the server, all PEM."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class _Authority:
    secret: str
    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    cert_pem: bytes


@dataclass(frozen=True, slots=True)
class _Leaf:
    """What one leaf certificate must say."""

    secret: str
    issuer: str
    common_name: str
    usages: tuple[x509.ObjectIdentifier, ...]
    organizations: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    ips: tuple[IPAddress, ...] = ()
    kubeconfig_server: str | None = None
    """Set for a kubeconfig secret: the server URL it points at."""


@dataclass(frozen=True, slots=True)
class _Facts:
    """What a proven leaf certificate says, i.e. everything `_leaf_drift` compares."""

    not_before: datetime
    not_after: datetime
    common_names: tuple[str, ...]
    organizations: tuple[str, ...]
    usages: frozenset[x509.ObjectIdentifier]
    dns_names: frozenset[str]
    ips: frozenset[IPAddress | ipaddress.IPv4Network | ipaddress.IPv6Network]


@dataclass(frozen=True, slots=True)
class _Material:
    cert_pem: bytes
    key_pem: bytes
    facts: _Facts


_SERVER_AND_CLIENT = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
_CLIENT = (ExtendedKeyUsageOID.CLIENT_AUTH,)
_SERVER = (ExtendedKeyUsageOID.SERVER_AUTH,)


def reconcile_pki(
    existing: Mapping[str, Mapping[str, bytes]],
    inputs: PKIInputs,
    *,
    now: datetime,
    renew_before: timedelta = RENEW_BEFORE,
) -> PKIResult:
    """The full desired set of PKI secrets for `inputs`, reusing everything still good.

    `existing` maps secret names to their decoded data; names not in `PKI_SECRETS` are
    ignored. `now` must be timezone-aware. A leaf with less than `renew_before` left is
    re-issued, unless it already ends with its CA (re-issuing could not extend it).
    """
    _require_aware(now)
    if not timedelta(0) <= renew_before < LEAF_LIFETIME:
        # A threshold at or beyond the leaf lifetime would re-issue every leaf on every pass.
        raise InvalidPKIInputError(f"renew_before must be between 0 and {LEAF_LIFETIME.days} days")

    secrets: dict[str, dict[str, bytes]] = {}
    changes: list[SecretChange] = []
    expiring: list[str] = []
    authorities: dict[str, _Authority] = {}

    for secret, common_name in _CAS:
        current = existing.get(secret)
        authority, problem = _read_authority(secret, current, now)
        if authority is None:
            authority = _new_authority(secret, common_name, now)
            changes.append(_change(secret, current, problem))
        elif authority.cert.not_valid_after_utc - now < renew_before:
            expiring.append(secret)
        authorities[secret] = authority
        if current is not None and authority.cert_pem == current.get(TLS_CRT):
            # Keep the stored key bytes: re-encoding could differ from how they were written.
            data = {
                TLS_CRT: authority.cert_pem,
                TLS_KEY: current[TLS_KEY],
                CA_CRT: authority.cert_pem,
            }
            if dict(current) != data:
                changes.append(SecretChange(secret, "updated", "secret data corrected"))
        else:
            data = {
                TLS_CRT: authority.cert_pem,
                TLS_KEY: _key_pem(authority.key),
                CA_CRT: authority.cert_pem,
            }
        secrets[secret] = data

    secrets[names.SECRET_SERVICE_ACCOUNT] = _service_account(
        existing.get(names.SECRET_SERVICE_ACCOUNT), changes
    )

    renewals: list[datetime] = []
    for leaf in _leaves(inputs):
        authority = authorities[leaf.issuer]
        current = existing.get(leaf.secret)
        material, defect = _read_leaf(leaf, current, authority)
        if material is not None and defect is None:
            defect = _leaf_drift(leaf, material.facts, authority, now, renew_before)
        if material is None or defect is not None or current is None:
            material = _issue(leaf, authority, now, LEAF_LIFETIME)
            _remember(_digest(material.cert_pem, material.key_pem, authority.cert_pem), material)
            changes.append(_change(leaf.secret, current, defect))
            data = _leaf_data(leaf, material, authority, inputs.cluster_name)
        else:
            # _read_leaf checked server and CA, so a valid kubeconfig is kept as written.
            data = (
                {KUBECONFIG: current[KUBECONFIG]}
                if leaf.kubeconfig_server is not None
                else _leaf_data(leaf, material, authority, inputs.cluster_name)
            )
            if dict(current) != data:
                changes.append(SecretChange(leaf.secret, "updated", "secret data corrected"))
        if material.facts.not_after < authority.cert.not_valid_after_utc:
            renewals.append(material.facts.not_after - renew_before)
        secrets[leaf.secret] = data

    report = PKIReport(
        changes=tuple(changes),
        expiring_cas=tuple(expiring),
        next_renewal_at=min(renewals, default=None),
    )
    return PKIResult(secrets=secrets, report=report)


def issue_admin_kubeconfig(
    ca_secret: Mapping[str, bytes],
    *,
    cluster_name: str,
    server_url: str,
    requester: str,
    now: datetime,
    lifetime: timedelta = ADMIN_LIFETIME,
) -> IssuedKubeconfig:
    """A kubeconfig for `server_url` as `nest:admin:<requester>` in `system:masters`.

    `ca_secret` is the data of the cluster CA secret (`names.SECRET_CA`). The certificate lives
    `lifetime` (default 8 hours, at most 24) but never beyond the CA.
    """
    _require_aware(now)
    _check_lifetime(lifetime, ADMIN_MAX_LIFETIME, "admin kubeconfig")
    if not requester or any(not char.isprintable() for char in requester):
        raise InvalidPKIInputError("requester must be a non-empty printable string")
    user = f"{ADMIN_CN_PREFIX}{requester}"
    if len(user) > _MAX_CN:
        raise InvalidPKIInputError(
            f"requester must be at most {_MAX_CN - len(ADMIN_CN_PREFIX)} characters"
        )
    parts = urlsplit(server_url)
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidPKIInputError(f"server_url {server_url!r} must be an https:// URL with a host")
    authority = _usable_authority(names.SECRET_CA, ca_secret, now)
    leaf = _Leaf(
        secret="admin",
        issuer=names.SECRET_CA,
        common_name=user,
        organizations=(SYSTEM_MASTERS,),
        usages=_CLIENT,
        kubeconfig_server=server_url,
    )
    material = _issue(leaf, authority, now, lifetime)
    return IssuedKubeconfig(
        kubeconfig=_kubeconfig(cluster_name, server_url, authority.cert_pem, user, material),
        user=user,
        expires_at=material.facts.not_after,
    )


def issue_etcd_client(
    etcd_ca_secret: Mapping[str, bytes],
    *,
    common_name: str,
    now: datetime,
    lifetime: timedelta = ETCD_CLIENT_LIFETIME,
) -> IssuedCertificate:
    """A client certificate for the cluster's etcd, signed by its etcd CA.

    `etcd_ca_secret` is the data of `names.SECRET_ETCD_CA`. The lifetime defaults to an hour,
    enough for a snapshot, and may not exceed `LEAF_LIFETIME`.
    """
    _require_aware(now)
    _check_lifetime(lifetime, LEAF_LIFETIME, "etcd client certificate")
    if not common_name or len(common_name) > _MAX_CN:
        raise InvalidPKIInputError(f"common_name must be 1-{_MAX_CN} characters")
    authority = _usable_authority(names.SECRET_ETCD_CA, etcd_ca_secret, now)
    leaf = _Leaf(
        secret="etcd-client",
        issuer=names.SECRET_ETCD_CA,
        common_name=common_name,
        usages=_CLIENT,
    )
    material = _issue(leaf, authority, now, lifetime)
    return IssuedCertificate(
        cert_pem=material.cert_pem,
        key_pem=material.key_pem,
        ca_pem=authority.cert_pem,
        expires_at=material.facts.not_after,
    )


# What the cluster needs


def _leaves(inputs: PKIInputs) -> tuple[_Leaf, ...]:
    """kubeadm's leaf certificates and kubeconfigs, adapted to pods behind Services."""
    service_network = ipaddress.ip_network(inputs.service_cidr, strict=False)
    endpoint_dns, endpoint_ips = _split_hosts(inputs.endpoint_hosts)
    apiserver_dns = _unique(
        [
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            f"kubernetes.default.svc.{inputs.dns_domain}",
            *names.api_service_hosts(inputs.namespace, inputs.management_dns_domain),
            *endpoint_dns,
            "localhost",
        ]
    )
    apiserver_ips = _unique(
        [
            service_network.network_address + 1,
            *endpoint_ips,
            *(ipaddress.ip_address(ip) for ip in inputs.service_ips),
            ipaddress.ip_address("127.0.0.1"),
        ]
    )
    etcd_dns = _unique(
        [
            *names.etcd_member_hosts(
                inputs.namespace, inputs.etcd_replicas, inputs.management_dns_domain
            ),
            *_etcd_service_hosts(inputs.namespace, inputs.management_dns_domain),
            "localhost",
        ]
    )
    # kubeadm puts ::1 into the etcd certificates too, so a member answers on either loopback.
    etcd_ips = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
    internal_url = internal_server_url(inputs.apiserver_port)
    konnectivity = (
        (
            _Leaf(
                secret=names.SECRET_KONNECTIVITY_KUBECONFIG,
                issuer=names.SECRET_CA,
                common_name=KONNECTIVITY_SERVER_USER,
                usages=_CLIENT,
                kubeconfig_server=internal_url,
            ),
        )
        if inputs.konnectivity
        else ()
    )
    return (
        _Leaf(
            secret=names.SECRET_APISERVER,
            issuer=names.SECRET_CA,
            common_name="kube-apiserver",
            usages=_SERVER,
            dns_names=apiserver_dns,
            ips=apiserver_ips,
        ),
        _Leaf(
            secret=names.SECRET_APISERVER_KUBELET_CLIENT,
            issuer=names.SECRET_CA,
            common_name="kube-apiserver-kubelet-client",
            # kubeadm >= 1.29 uses a bindable group, so this credential is not system:masters.
            organizations=(CLUSTER_ADMINS,),
            usages=_CLIENT,
        ),
        _Leaf(
            secret=names.SECRET_APISERVER_ETCD_CLIENT,
            issuer=names.SECRET_ETCD_CA,
            common_name="kube-apiserver-etcd-client",
            usages=_CLIENT,
        ),
        _Leaf(
            secret=names.SECRET_FRONT_PROXY_CLIENT,
            issuer=names.SECRET_FRONT_PROXY_CA,
            common_name="front-proxy-client",
            usages=_CLIENT,
        ),
        _Leaf(
            secret=names.SECRET_ETCD_SERVER,
            issuer=names.SECRET_ETCD_CA,
            common_name="kube-etcd",
            usages=_SERVER_AND_CLIENT,
            dns_names=etcd_dns,
            ips=etcd_ips,
        ),
        _Leaf(
            secret=names.SECRET_ETCD_PEER,
            issuer=names.SECRET_ETCD_CA,
            common_name="kube-etcd-peer",
            # A member dials its peers with this certificate and serves them with it.
            usages=_SERVER_AND_CLIENT,
            dns_names=etcd_dns,
            ips=etcd_ips,
        ),
        _Leaf(
            secret=names.SECRET_CONTROLLER_MANAGER_KUBECONFIG,
            issuer=names.SECRET_CA,
            common_name="system:kube-controller-manager",
            usages=_CLIENT,
            kubeconfig_server=internal_url,
        ),
        _Leaf(
            secret=names.SECRET_SCHEDULER_KUBECONFIG,
            issuer=names.SECRET_CA,
            common_name="system:kube-scheduler",
            usages=_CLIENT,
            kubeconfig_server=internal_url,
        ),
        *konnectivity,
    )


def _etcd_service_hosts(namespace: str, dns_domain: str) -> list[str]:
    """The headless Service's own names, for clients that dial the Service, not a member."""
    base = f"{names.ETCD_HEADLESS_SERVICE}.{namespace}"
    return [names.ETCD_HEADLESS_SERVICE, base, f"{base}.svc", f"{base}.svc.{dns_domain}"]


# Reading what exists


def _read_authority(
    secret: str, data: Mapping[str, bytes] | None, now: datetime
) -> tuple[_Authority | None, str]:
    """The CA in `data` if it can still sign, else None and why not."""
    if data is None:
        return None, "missing"
    try:
        cert = x509.load_pem_x509_certificate(data[TLS_CRT])
        key = _load_key(data[TLS_KEY])
    except _UNREADABLE as exc:
        return None, f"unreadable: {_describe(exc)}"
    if not isinstance(key, _ISSUER_KEYS):
        return None, "unreadable: the key cannot sign certificates"
    if cert.public_key() != key.public_key():
        return None, "the key does not belong to the certificate"
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None, "not a CA certificate"
    if not constraints.ca:
        return None, "not a CA certificate"
    if cert.not_valid_after_utc <= now:
        return None, "expired"
    return _Authority(secret=secret, cert=cert, key=key, cert_pem=data[TLS_CRT]), ""


def _usable_authority(secret: str, data: Mapping[str, bytes], now: datetime) -> _Authority:
    authority, problem = _read_authority(secret, data, now)
    if authority is None:
        raise CAUnavailableError(f"the {secret} CA cannot sign: {problem}")
    return authority


def _read_leaf(
    leaf: _Leaf, data: Mapping[str, bytes] | None, authority: _Authority
) -> tuple[_Material | None, str | None]:
    """The certificate and key stored for `leaf`, or None and why they cannot be used.

    Also proves the pair belongs together and was signed by the current CA.
    """
    if data is None:
        return None, "missing"
    try:
        if leaf.kubeconfig_server is None:
            cert_pem, key_pem = data[TLS_CRT], data[TLS_KEY]
        else:
            cert_pem, key_pem, problem = _read_kubeconfig(
                data[KUBECONFIG], leaf.kubeconfig_server, authority.cert_pem
            )
            if problem:
                return None, problem
        digest = _digest(cert_pem, key_pem, authority.cert_pem)
        facts = _proven.get(digest)
        if facts is not None:
            return _Material(cert_pem=cert_pem, key_pem=key_pem, facts=facts), None
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = _load_key(key_pem)
        if cert.public_key() != key.public_key():
            return None, "the key does not belong to the certificate"
        try:
            cert.verify_directly_issued_by(authority.cert)
        except (ValueError, TypeError, InvalidSignature):
            return None, "not signed by the current CA"
        material = _Material(cert_pem=cert_pem, key_pem=key_pem, facts=_facts(cert))
    except _UNREADABLE as exc:
        return None, f"unreadable: {_describe(exc)}"
    _remember(digest, material)
    return material, None


def _read_kubeconfig(document: bytes, server: str, ca_pem: bytes) -> tuple[bytes, bytes, str]:
    """Client certificate and key of a kubeconfig written by `_kubeconfig`, or a problem."""
    config: Any = json.loads(document)
    cluster = config["clusters"][0]["cluster"]
    user = config["users"][0]["user"]
    cert_pem = base64.b64decode(user["client-certificate-data"], validate=True)
    key_pem = base64.b64decode(user["client-key-data"], validate=True)
    if cluster["server"] != server:
        return cert_pem, key_pem, "server URL changed"
    if base64.b64decode(cluster["certificate-authority-data"], validate=True) != ca_pem:
        return cert_pem, key_pem, "CA changed"
    return cert_pem, key_pem, ""


def _leaf_drift(
    leaf: _Leaf,
    facts: _Facts,
    authority: _Authority,
    now: datetime,
    renew_before: timedelta,
) -> str | None:
    """Why a certificate proven to come from `authority` no longer serves as `leaf`."""
    not_after = facts.not_after
    if not_after <= now:
        return "expired"
    if facts.not_before > now:
        return "not valid yet"
    if not_after - now < renew_before and not_after < authority.cert.not_valid_after_utc:
        return f"expires {not_after.isoformat()}, within the renewal threshold"
    if facts.common_names != (leaf.common_name,) or facts.organizations != tuple(
        sorted(leaf.organizations)
    ):
        return "subject changed"
    if facts.usages != frozenset(leaf.usages):
        return "extended key usages changed"
    if facts.dns_names != frozenset(leaf.dns_names) or facts.ips != frozenset(leaf.ips):
        return "subject alternative names changed"
    return None


def _facts(cert: x509.Certificate) -> _Facts:
    subject = cert.subject
    extensions = cert.extensions
    try:
        usages = frozenset(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = frozenset()
    try:
        alt_names = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = frozenset(name.lower() for name in alt_names.get_values_for_type(x509.DNSName))
        ips = frozenset(alt_names.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns_names, ips = frozenset(), frozenset()
    return _Facts(
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        common_names=tuple(
            str(attr.value) for attr in subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ),
        organizations=tuple(
            sorted(
                str(attr.value)
                for attr in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
            )
        ),
        usages=usages,
        dns_names=dns_names,
        ips=ips,
    )


def _service_account(
    data: Mapping[str, bytes] | None, changes: list[SecretChange]
) -> dict[str, bytes]:
    """The service-account key pair; like a CA it is kept while usable, since rotating it
    invalidates every service-account token the cluster has issued."""
    if data is not None:
        try:
            key = _load_key(data[SA_KEY])
        except _UNREADABLE as exc:
            problem = f"unreadable: {_describe(exc)}"
        else:
            result = {SA_KEY: data[SA_KEY], SA_PUB: _public_pem(key)}
            if dict(data) != result:
                changes.append(
                    SecretChange(names.SECRET_SERVICE_ACCOUNT, "updated", "public key corrected")
                )
                return result
            return dict(data)
    else:
        problem = "missing"
    key = ec.generate_private_key(ec.SECP256R1())
    changes.append(_change(names.SECRET_SERVICE_ACCOUNT, data, problem))
    return {SA_KEY: _key_pem(key), SA_PUB: _public_pem(key)}


# Issuing


def _new_authority(secret: str, common_name: str, now: datetime) -> _Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    identifier = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(key, ca=True), critical=True)
        .add_extension(identifier, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(identifier),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return _Authority(
        secret=secret, cert=cert, key=key, cert_pem=cert.public_bytes(serialization.Encoding.PEM)
    )


def _issue(leaf: _Leaf, authority: _Authority, now: datetime, lifetime: timedelta) -> _Material:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = authority.cert
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in leaf.organizations]
        + [x509.NameAttribute(NameOID.COMMON_NAME, leaf.common_name)]
    )
    try:
        issuer_identifier = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        authority_identifier = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            issuer_identifier.value
        )
    except x509.ExtensionNotFound:
        authority_identifier = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            authority.key.public_key()
        )
    # A certificate that outlives its CA would only fail later and more confusingly.
    not_after = min(now + lifetime, ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - BACKDATE, ca_cert.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key, ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(leaf.usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(authority_identifier, critical=False)
    )
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in leaf.dns_names]
    alt_names += [x509.IPAddress(ip) for ip in leaf.ips]
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(authority.key, _signature_hash(authority.key))
    return _Material(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=_key_pem(key),
        facts=_facts(cert),
    )


def _key_usage(key: CertificateIssuerPrivateKeyTypes, *, ca: bool) -> x509.KeyUsage:
    # Key encipherment only means something for RSA key transport; kubeadm sets it for RSA only.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(key, rsa.RSAPrivateKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # EdDSA hashes internally and refuses an explicit algorithm.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _leaf_data(
    leaf: _Leaf, material: _Material, authority: _Authority, cluster_name: str
) -> dict[str, bytes]:
    if leaf.kubeconfig_server is None:
        return {TLS_CRT: material.cert_pem, TLS_KEY: material.key_pem, CA_CRT: authority.cert_pem}
    return {
        KUBECONFIG: _kubeconfig(
            cluster_name, leaf.kubeconfig_server, authority.cert_pem, leaf.common_name, material
        )
    }


def _kubeconfig(
    cluster_name: str, server: str, ca_pem: bytes, user: str, material: _Material
) -> bytes:
    """A kubeconfig as JSON, which is valid YAML and what client-go parses it as anyway."""
    context = f"{user}@{cluster_name}"
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster_name,
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(material.cert_pem),
                    "client-key-data": _b64(material.key_pem),
                },
            }
        ],
        "contexts": [{"name": context, "context": {"cluster": cluster_name, "user": user}}],
        "current-context": context,
        "preferences": {},
    }
    return (json.dumps(document, indent=2) + "\n").encode()


# Small pieces

# (certificate, key, CA) triples already proven to match and chain, by digest, with what the
# certificate says. Proving and parsing are nearly all of a resync's cost (a signature check and
# a key parse per leaf), and the answer depends only on those bytes, so remembering it keeps the
# functions pure while a resync of a thousand unchanged clusters skips the cryptography. Holds
# no key material. Bounded: cleared when full.
_PROVEN_LIMIT = 32768
_proven: dict[bytes, _Facts] = {}


def _digest(*parts: bytes) -> bytes:
    digest = hashlib.blake2b(digest_size=32)
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


def _remember(digest: bytes, material: _Material) -> None:
    if len(_proven) >= _PROVEN_LIMIT:
        _proven.clear()
    _proven[digest] = material.facts


def _change(name: str, current: Mapping[str, bytes] | None, problem: str | None) -> SecretChange:
    if current is None:
        return SecretChange(name, "created", "missing")
    return SecretChange(name, "renewed", problem or "invalid")


def _load_key(pem: bytes) -> Any:
    # Nest wrote these keys itself; RSA's consistency check would cost ~40 ms per imported key.
    return serialization.load_pem_private_key(
        pem, password=None, unsafe_skip_rsa_key_validation=True
    )


def _key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_pem(key: Any) -> bytes:
    public: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _describe(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"no {exc.args[0]!r} key"
    return type(exc).__name__


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise InvalidPKIInputError("now must be a timezone-aware datetime")


def _check_lifetime(lifetime: timedelta, limit: timedelta, what: str) -> None:
    if lifetime <= timedelta(0):
        raise InvalidPKIInputError(f"the {what} lifetime must be positive")
    if lifetime > limit:
        raise LifetimeTooLongError(f"the {what} lifetime may be at most {limit}, not {lifetime}")


def _endpoint_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    normalized = host.lower().rstrip(".")
    if len(normalized) > 253 or not _HOSTNAME.match(normalized):
        raise InvalidPKIInputError(
            f"endpoint host {host!r} is neither an IP address nor a DNS name"
        )
    return normalized


def _service_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise InvalidPKIInputError(f"service IP {value!r} is not an IP address") from None


def _split_hosts(hosts: Iterable[str]) -> tuple[list[str], list[IPAddress]]:
    dns_names: list[str] = []
    ips: list[IPAddress] = []
    for host in hosts:
        try:
            ips.append(ipaddress.ip_address(host))
        except ValueError:
            dns_names.append(host)
    return dns_names, ips


def _unique(items: Iterable[_T]) -> tuple[_T, ...]:
    return tuple(dict.fromkeys(items))
