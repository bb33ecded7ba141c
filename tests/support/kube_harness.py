"""Test harness for the provisioner: the real management cluster of the session (see
`tests.support.kube`), a fault-injecting proxy in front of it per test, the chart's provisioner
ServiceAccount, hosted clusters' APIs, and the provisioner service itself on a real NATS, plus
waits on what the API shows."""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import dataclasses
import datetime
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats.js.errors
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from libs.common.bus import Bus
from libs.common.settings import Settings
from services.provisioner import kube, names
from services.provisioner.reconciler import ProvisionerConfig
from services.provisioner.service import ProvisionerService, config_from_settings
from services.provisioner.store import CLUSTERS_BUCKET, LEASES_BUCKET
from tests.support.kube import identities
from tests.support.kube.agent import HOLD_ANNOTATION, MODE_LABEL
from tests.support.kube.api import Api, Credentials
from tests.support.kube.proxy import KubeProxy
from tests.support.kube.session import ManagementCluster

REAL = {MODE_LABEL: "real"}
"""Cluster labels (copied onto its namespace) that make the harness run its pods for real."""
SMALL = {"controlPlane": {"replicas": 1}, "datastore": {"replicas": 1}}
"""A spec that runs one pod of each kind: what a test needs unless it tests scale."""


def unique(name: str) -> str:
    """A cluster name no other test of the session uses (their namespaces share one cluster)."""
    return f"{name}-{uuid.uuid4().hex[:6]}"


@dataclass
class Management:
    """The session's management cluster as one test sees it."""

    cluster: ManagementCluster
    api: Api
    """An administrator's client, straight to the API server (for the test's own checks)."""
    proxy: KubeProxy
    """In front of the API server: counts requests, injects faults."""
    kubeconfig: Path
    """The provisioner's: the chart's ServiceAccount token, through `proxy`."""

    @property
    def node_address(self) -> str:
        return self.cluster.node_ips[0]

    async def get(self, path: str) -> dict[str, Any] | None:
        return await self.api.get(path)

    async def list(self, path: str, **params: Any) -> list[dict[str, Any]]:
        return await self.api.list(path, **params)

    async def objects(self, namespace: str) -> dict[str, str]:
        """`<plural>/<name>` -> uid of what the provisioner makes in `namespace`, and
        `namespaces` -> the namespace's uid."""
        found: dict[str, str] = {}
        for collection in (
            "/api/v1/namespaces/{ns}/secrets",
            "/api/v1/namespaces/{ns}/configmaps",
            "/api/v1/namespaces/{ns}/services",
            "/apis/apps/v1/namespaces/{ns}/statefulsets",
            "/apis/apps/v1/namespaces/{ns}/deployments",
            "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
        ):
            plural = collection.rsplit("/", 1)[1]
            for obj in await self.api.list(collection.format(ns=namespace)):
                if obj["metadata"]["name"] == "kube-root-ca.crt":
                    continue  # every namespace gets it from the controller-manager
                found[f"{plural}/{obj['metadata']['name']}"] = obj["metadata"]["uid"]
        ns = await self.api.get(f"/api/v1/namespaces/{namespace}")
        if ns is not None:
            found["namespaces"] = ns["metadata"]["uid"]
        return found

    async def hold(self, namespace: str, held: bool = True) -> None:
        """Hold the namespace's new pods Pending (and report its fake pods not ready), as a
        node that cannot start them would; `held=False` releases them."""
        await self.api.merge_patch(
            f"/api/v1/namespaces/{namespace}",
            {"metadata": {"annotations": {HOLD_ANNOTATION: "true" if held else None}}},
        )

    async def tenant(self, cluster_name: str) -> Api:
        """An administrator's client of the hosted cluster's API at its endpoint, with a
        certificate signed here from the cluster CA the provisioner stored (not through Nest)."""
        namespace = names.namespace_for(cluster_name)
        secret = await self.api.get(f"/api/v1/namespaces/{namespace}/secrets/{names.SECRET_CA}")
        assert secret is not None, f"no CA Secret in {namespace}"
        ca_pem = base64.b64decode(secret["data"]["tls.crt"])
        ca_key = serialization.load_pem_private_key(
            base64.b64decode(secret["data"]["tls.key"]), None
        )
        service = await self.api.get(f"/api/v1/namespaces/{namespace}/services/{names.API_SERVICE}")
        assert service is not None
        if service["spec"]["type"] == "LoadBalancer":
            host = service["status"]["loadBalancer"]["ingress"][0]["ip"]
            port = names.API_PORT
        else:
            host = self.node_address
            port = next(p["nodePort"] for p in service["spec"]["ports"] if p["name"] == "https")
        cert, key = _client_certificate(ca_pem, ca_key)
        return Api(Credentials(f"https://{host}:{port}", ca_pem, cert, key), timeout=10)

    async def pod_processes(self, namespace: str, selector: str) -> builtins.list[int]:
        """Process ids of the containers of the pods matching `selector`, which run for real."""
        pids: builtins.list[int] = []
        for pod in await self.api.list(
            f"/api/v1/namespaces/{namespace}/pods", labelSelector=selector
        ):
            short = pod["metadata"]["uid"].replace("-", "")[:10]
            out = subprocess.run(
                ["ip", "netns", "pids", f"{self.cluster.bridge}-{short}"],
                capture_output=True,
                text=True,
            ).stdout
            pids += [int(p) for p in out.split()]
        return pids

    async def freeze(self, namespace: str, selector: str) -> builtins.list[int]:
        """SIGSTOP every container process of the matching pods (a wedged server: the kernel
        still accepts connections, nothing answers); returns the pids for `thaw`."""
        pids = await self.pod_processes(namespace, selector)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        return pids

    @staticmethod
    def thaw(pids: builtins.list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _client_certificate(ca_pem: bytes, ca_key: Any) -> tuple[bytes, bytes]:
    ca = x509.load_pem_x509_certificate(ca_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "nest-test-admin"),
                ]
            )
        )
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@contextlib.asynccontextmanager
async def management_cluster(
    cluster: ManagementCluster, directory: Path
) -> AsyncIterator[Management]:
    """The session's cluster for one test: an admin client, a fresh proxy, the provisioner's
    kubeconfig (the chart's ServiceAccount token through the proxy)."""
    async with cluster.api() as api, KubeProxy(cluster, directory / "proxy") as proxy:
        kubeconfig = await identities.provisioner_kubeconfig(
            cluster, directory / "provisioner.kubeconfig", server=proxy.url
        )
        yield Management(cluster, api, proxy, kubeconfig)


@dataclass
class SilentEndpoint:
    """A TCP server on a harness node address that accepts connections and never says a word
    (no TLS handshake, no HTTP), as a wedged API server or a black-holing proxy does."""

    host: str = ""
    port: int = 0
    connections: int = 0
    """Connections accepted so far."""


@contextlib.asynccontextmanager
async def silent_endpoint(host: str, port: int = 0) -> AsyncIterator[SilentEndpoint]:
    """Serve a `SilentEndpoint` on `host` (a harness node address) and `port` (e.g. a cluster's
    NodePort, taken before the harness forwards it; 0: any)."""
    endpoint = SilentEndpoint(host=host)
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        endpoint.connections += 1
        held.append(writer)

    server = await asyncio.start_server(accept, host, port)
    endpoint.port = server.sockets[0].getsockname()[1]
    try:
        async with server:
            yield endpoint
    finally:
        for writer in held:
            writer.close()


async def reset_buckets(bus: Bus) -> None:
    js = bus.nc.jetstream()
    for bucket in (CLUSTERS_BUCKET, LEASES_BUCKET):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_key_value(bucket)


def provisioner_settings(settings: Settings, kubeconfig: Path | None, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "kubeconfig": kubeconfig,
        "poll_interval_seconds": 0.05,
        "resync_interval_seconds": 3600.0,
        "kube_retry_attempts": 3,
        "kube_timeout_seconds": 2.0,
        **extra,
    }
    return settings.model_copy(update=values)


def fast_config(settings: Settings) -> ProvisionerConfig:
    """The configuration `settings` give, with short pauses between management retries and a
    shorter delete timeout. Tenant timeouts stay as configured: they are what is tested."""
    return dataclasses.replace(
        config_from_settings(settings),
        retry=kube.Retry(
            attempts=settings.kube_retry_attempts,
            base_delay=0.05,
            max_delay=0.2,
            timeout=settings.kube_timeout_seconds,
        ),
        delete_timeout_seconds=10.0,
    )


@contextlib.asynccontextmanager
async def running_provisioner(
    settings: Settings, nats_url: str, *, reset: bool = True, **config: Any
) -> AsyncIterator[ProvisionerService]:
    """A provisioner service on its own bus connection (fresh bookkeeping unless `reset`);
    `config` overrides fields of its `ProvisionerConfig` (e.g. `delete_timeout_seconds`)."""
    bus = Bus([nats_url], name="test-provisioner")
    await bus.connect()
    await bus.ensure_streams()
    if reset:
        await reset_buckets(bus)
    service = ProvisionerService(
        settings, config=dataclasses.replace(fast_config(settings), **config)
    )
    await service.start(bus)
    try:
        yield service
    finally:
        await service.stop(3.0)
        await bus.close()


async def wait_cluster(
    api: httpx.AsyncClient,
    cluster_id: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = 90.0,
) -> dict[str, Any]:
    """Poll the API until the cluster satisfies `predicate`; fail with the last state."""
    deadline = asyncio.get_running_loop().time() + timeout
    cluster: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        response = await api.get(f"/api/v1/clusters/{cluster_id}")
        cluster = (
            response.json() if response.status_code == 200 else {"status": response.status_code}
        )
        if predicate(cluster):
            return cluster
        await asyncio.sleep(0.05)
    raise AssertionError(f"cluster {cluster_id} never got there; last seen: {cluster}")


def phase(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda cluster: cluster.get("status", {}).get("phase") == name


def condition(cluster: dict[str, Any], type_: str) -> dict[str, Any]:
    for found in cluster["status"]["conditions"]:
        if found["type"] == type_:
            return dict(found)
    raise AssertionError(f"no condition {type_} in {cluster['status']}")


def provisioner_process(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The provisioner as its own process (`python -m cli.main run provisioner`), in its own
    process group, output to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cli.main", "run", "provisioner"],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],
        )
