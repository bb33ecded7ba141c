"""A cluster restore end to end, every service real on one NATS, on the real management
cluster: the API takes the requests; the backup service backs up the cluster's own etcd (which
runs for real in the management cluster) and later verifies and stages that backup at its own
signed URL on a harness node's address; the provisioner scales the cluster down, the real Job
controller runs the restore Job's pod (restore_member downloading from the backup service,
etcdutl 3.7); the cluster comes back Ready and its hosted API serves what it held when it was
backed up.

The backup service runs as its own process (`nest run backup`) seeing the management cluster's
DNS, as it would inside that cluster: the etcd URL the provisioner hands out is a Service name
of the management cluster."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats.js.errors
import pytest

from libs.common.bus import Bus
from services.provisioner import manifests, names
from services.provisioner.service import ProvisionerService
from tests.support.kube.harness import with_cluster_dns
from tests.support.kube_harness import REAL, SMALL, Management, phase, unique, wait_cluster
from tests.support.parts import free_port
from tests.support.processes import kill_group, wait_http
from tests.support.restoring import NamespaceWatch, delete_cluster, pod_log, restore_objects

KEPT = "/api/v1/namespaces/default/configmaps/kept"


@dataclass
class BackupProcess:
    process: subprocess.Popen[bytes]
    data_dir: Path
    log: Path

    def output(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-60:])


@pytest.fixture
async def backup_service(
    nats_url: str, tmp_path: Path, management: Management
) -> AsyncIterator[BackupProcess]:
    """`nest run backup` on the test's NATS, resolving names through the management cluster's
    DNS, staging restore snapshots on the first harness node's address (where the restore
    Job's pod reaches it)."""
    bus = Bus([nats_url], name="test-backup-reset")
    await bus.connect()
    js = bus.nc.jetstream()
    for info in await js.streams_info():
        if info.config.name and info.config.name.startswith("KV_nest_backup"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(info.config.name)
    await bus.close()

    data_dir = tmp_path / "backup-data"
    health = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NEST_")},
        "NEST_NATS_URL": nats_url,
        "NEST_DATA_DIR": str(data_dir),
        "NEST_BACKUP_DIR": str(tmp_path / "backups"),
        "NEST_BACKUP_SERVE_HOST": management.node_address,
        "NEST_BACKUP_SERVE_PORT": "0",
        "NEST_HEALTH_PORT": str(health),
        "NEST_INSTANCE": "backup-test",
    }
    log = tmp_path / "backup.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            with_cluster_dns(
                management.cluster.hosts, [sys.executable, "-m", "cli.main", "run", "backup"]
            ),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[3],
        )
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{health}/readyz", 60, process)
        yield BackupProcess(process, data_dir, log)
    finally:
        kill_group(process, 15)
        kill_group(process)


async def until(
    api: httpx.AsyncClient, path: str, check: Any, timeout: float = 120.0
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


async def restore(
    api: httpx.AsyncClient, cluster_id: str, backup_id: str, **extra: Any
) -> dict[str, Any]:
    response = await api.post(
        f"/api/v1/clusters/{cluster_id}/restores", json={"backupId": backup_id, **extra}
    )
    assert response.status_code == 202, response.text
    return await until(
        api,
        response.headers["location"],
        lambda body: body["phase"] in ("Succeeded", "Failed"),
        timeout=240.0,
    )


async def test_backup_then_restore_through_every_service(
    api: httpx.AsyncClient,
    provisioner: ProvisionerService,
    backup_service: BackupProcess,
    management: Management,
) -> None:
    name = unique("flow")
    namespace = names.namespace_for(name)
    created = await api.post("/api/v1/clusters", json={"name": name, "labels": REAL, "spec": SMALL})
    assert created.status_code == 201, created.text
    cluster_id = created.json()["id"]
    try:
        await wait_cluster(api, cluster_id, phase("Ready"), timeout=180.0)
        async with await management.tenant(name) as tenant:
            kept = await tenant.create(
                "/api/v1/namespaces/default/configmaps",
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "kept"},
                    "data": {"state": "before"},
                },
            )

        requested = await api.post(
            "/api/v1/backups", json={"target": "cluster", "clusterId": cluster_id}
        )
        assert requested.status_code == 202, requested.text
        listing = await until(
            api,
            f"/api/v1/backups?clusterId={cluster_id}",
            lambda body: [b["state"] for b in body["items"]] in (["Completed"], ["Failed"]),
        )
        backup = listing["items"][0]
        assert backup["state"] == "Completed", (backup, backup_service.output())
        # The snapshot holds the ConfigMap: it was taken at a later etcd revision.
        assert backup["etcdRevision"] >= int(kept["metadata"]["resourceVersion"])

        async with await management.tenant(name) as tenant:
            assert await tenant.delete(KEPT)

        # The hosted API server kept writing to etcd (leases, the deletion): the snapshot is
        # older than the cluster now, and rolling it back needs `force`.
        refused = await restore(api, cluster_id, backup["id"])
        assert refused["phase"] == "Failed", refused
        assert refused["reason"] == "SnapshotOlder", refused

        job_pods: dict[str, list[int | None]] = {}
        async with NamespaceWatch(management, namespace).running() as watch:
            restored = await restore(api, cluster_id, backup["id"], force=True)
            assert restored["phase"] == "Succeeded", (restored, backup_service.output())
            job = manifests.restore_job_name(restored["id"], 0)
            await watch.until(lambda: watch.exit_codes(job) == [0], "the Job's pod exited 0")
            for found in watch.jobs:
                job_pods[found] = watch.exit_codes(found)
            logs = [
                pod_log(management, namespace, pod["metadata"]["name"], "restore")
                for job in watch.jobs
                for pod in watch.job_pods(job)
            ]
        assert restored["etcdRevision"] >= backup["etcdRevision"]
        seen = [step["phase"] for step in restored["history"]]
        order = ["Pending", "Verifying", "Staged", "ScalingDown", "Restoring", "ScalingUp"]
        assert seen[0] == "Pending" and seen[-1] == "Succeeded"
        assert seen[:-1] == [p for p in order if p in seen[:-1]], seen  # forward only
        assert job_pods == {job: [0]}, logs
        assert "etcd-0: restored from snapshot" in logs[0], logs

        await wait_cluster(api, cluster_id, phase("Ready"), timeout=120.0)
        assert await restore_objects(management, namespace) == []
        # The hosted API serves the ConfigMap again, as it was: same object, same revision.
        async with await management.tenant(name) as tenant:
            back = await tenant.get(KEPT)
        assert back is not None
        assert back["data"] == {"state": "before"}
        assert back["metadata"]["uid"] == kept["metadata"]["uid"]
        assert back["metadata"]["resourceVersion"] == kept["metadata"]["resourceVersion"]

        # The staged snapshot stays with the backup service until its URL expires; the refused
        # restore's was removed at once.
        staged = backup_service.data_dir / "restores"
        assert [p.name for p in staged.iterdir()] == [restored["id"]]
    finally:
        await delete_cluster(api, management, cluster_id, namespace)
