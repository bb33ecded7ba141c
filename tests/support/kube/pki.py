"""The management cluster's own certificates and kubeconfigs, written once into its directory.

Deliberately independent of Nest's `services.provisioner.pki`: the harness must not agree with
Nest because it shares Nest's code. One CA signs the API server's serving certificate and every
client (the admin, the controller-manager, the scheduler, the node agents); the
controller-manager signs CSRs with the same CA, as kubeadm sets it up. Keys are ECDSA P-256
(fast to generate; Kubernetes takes them everywhere, service-account tokens included).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ClusterPki:
    """Paths of everything the control-plane processes and clients need."""

    directory: Path
    ca: Pair
    apiserver: Pair
    service_account_key: Path
    service_account_pub: Path
    admin: Pair

    def client(self, name: str) -> Pair:
        return Pair(self.directory / f"{name}.crt", self.directory / f"{name}.key")


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        parts.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(parts)


class _Ca:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @classmethod
    def create(cls, common_name: str) -> _Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        name = _name(common_name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + _VALIDITY * 10)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(
        self,
        common_name: str,
        organization: str | None = None,
        *,
        server: bool = False,
        client: bool = False,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
    ) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organization))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if dns or ips:
            names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
            names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


CLIENTS: dict[str, tuple[str, str | None]] = {
    "admin": ("kubernetes-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
    "harness": ("harness:node-agents", "system:masters"),
}
"""Client certificates: file stem -> (CN, O). The node agents act for many Nodes (and for the
volume provisioner and load balancer), so they get an administrator's group."""


def create(directory: Path, *, service_ip: str, extra_ips: tuple[str, ...] = ()) -> ClusterPki:
    """Generate the whole PKI into `directory` (created 0700); existing files are replaced."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = _Ca.create("nest-harness-ca")
    _write(directory / "ca.crt", ca.cert.public_bytes(serialization.Encoding.PEM), False)
    _write(directory / "ca.key", _key_pem(ca.key), True)
    cert, key = ca.issue(
        "kube-apiserver",
        server=True,
        dns=(
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ),
        ips=("127.0.0.1", service_ip, *extra_ips),
    )
    _write(directory / "apiserver.crt", cert, False)
    _write(directory / "apiserver.key", key, True)
    for stem, (common_name, organization) in CLIENTS.items():
        cert, key = ca.issue(common_name, organization, client=True)
        _write(directory / f"{stem}.crt", cert, False)
        _write(directory / f"{stem}.key", key, True)
    sa = ec.generate_private_key(ec.SECP256R1())
    _write(directory / "sa.key", _key_pem(sa), True)
    pub = sa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write(directory / "sa.pub", pub, False)
    return load(directory)


def load(directory: Path) -> ClusterPki:
    return ClusterPki(
        directory=directory,
        ca=Pair(directory / "ca.crt", directory / "ca.key"),
        apiserver=Pair(directory / "apiserver.crt", directory / "apiserver.key"),
        service_account_key=directory / "sa.key",
        service_account_pub=directory / "sa.pub",
        admin=Pair(directory / "admin.crt", directory / "admin.key"),
    )


def issue_serving(pki: ClusterPki, common_name: str, ips: tuple[str, ...]) -> tuple[bytes, bytes]:
    """A serving certificate from the cluster CA (e.g. for a fault proxy in front of the API)."""
    key = serialization.load_pem_private_key(pki.ca.key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    ca = _Ca(key, x509.load_pem_x509_certificate(pki.ca.cert.read_bytes()))
    return ca.issue(common_name, server=True, dns=("localhost",), ips=ips)


def kubeconfig(
    path: Path,
    server: str,
    ca: Path,
    *,
    user: str,
    client: Pair | None = None,
    token: str | None = None,
) -> Path:
    """A kubeconfig file (0600) for `server`, authenticating with `client` or `token`."""
    credentials: dict[str, str] = {}
    if client is not None:
        credentials = {
            "client-certificate-data": _b64(client.cert.read_bytes()),
            "client-key-data": _b64(client.key.read_bytes()),
        }
    if token is not None:
        credentials["token"] = token
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "nest-harness",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca.read_bytes())},
            }
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": {"cluster": "nest-harness", "user": user}}],
        "current-context": user,
    }
    _write(path, yaml.safe_dump(document, sort_keys=False).encode(), True)
    return path


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
