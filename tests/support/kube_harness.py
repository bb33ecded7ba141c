"""Test harness for the provisioner: the emulated management cluster, tenant APIs, and the
provisioner service itself on a real NATS, plus waits on what the API shows."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import kmock
import nats.js.errors

from libs.common.bus import Bus
from libs.common.settings import Settings
from services.provisioner import kube
from services.provisioner.reconciler import ProvisionerConfig
from services.provisioner.service import ProvisionerService, config_from_settings
from services.provisioner.store import CLUSTERS_BUCKET, LEASES_BUCKET
from tests.support.kube_emulator import (
    KubeEmulator,
    ReadinessController,
    TenantApis,
    write_kubeconfig,
)


@dataclass
class ManagementCluster:
    emulator: KubeEmulator
    controller: ReadinessController
    url: str
    kubeconfig: Path


@contextlib.asynccontextmanager
async def management_cluster(directory: Path) -> AsyncIterator[ManagementCluster]:
    """The emulated management cluster on a loopback port, with its readiness controller."""
    emulator = KubeEmulator()
    async with emulator, kmock.Server(emulator) as server:
        url = f"http://127.0.0.1:{server.port}"
        kubeconfig = write_kubeconfig(directory / "management.kubeconfig", url)
        yield ManagementCluster(emulator, ReadinessController(emulator), url, kubeconfig)


@contextlib.asynccontextmanager
async def tenant_apis(management: KubeEmulator, directory: Path) -> AsyncIterator[TenantApis]:
    directory.mkdir(parents=True, exist_ok=True)
    async with TenantApis(management, directory).serve() as tenants:
        yield tenants


@dataclass
class SilentEndpoint:
    """A loopback TCP server that accepts connections and never says a word (no TLS
    handshake, no HTTP), as a wedged API server or a black-holing proxy does."""

    port: int = 0
    connections: int = 0
    """Connections accepted so far."""


@contextlib.asynccontextmanager
async def silent_endpoint(hostname: str) -> AsyncIterator[SilentEndpoint]:
    """Serve `SilentEndpoint` on 127.0.0.1 and route `hostname` (any port) there in this
    process, ahead of `tenant_apis`'s routing."""
    endpoint = SilentEndpoint()
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        endpoint.connections += 1
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    endpoint.port = server.sockets[0].getsockname()[1]
    try:
        pattern = re.compile(re.escape(hostname))
        async with server, kmock.AiohttpInterceptor("127.0.0.1", endpoint.port, pattern):
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
    timeout: float = 15.0,
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
