"""Restoring a cluster's etcd from a staged snapshot (`nest.intent.provisioner.restore`).

The backup service verified the snapshot and serves it at a short-lived URL; this module runs
the restore in the management cluster and reports each step as `RestoreProgressed`:

1. `ScalingDown`: the cluster's status goes to phase `Restoring` (reconcile passes of the
   cluster are paused while the restore is recorded); the control-plane Deployment, then the
   etcd StatefulSet, are scaled to zero, and the restore waits until no pod of either is left.
2. `Restoring`: a Secret holding the URL and one Job per member (`manifests.etcd_restore_job`,
   running `services.provisioner.restore_member` on the member's volume); every Job must
   succeed (`JobFailed` otherwise); then the Jobs and the Secret are deleted.
3. `ScalingUp`: etcd back to the spec's members, wait until they are ready; the control plane
   back, wait until it rolled out; `Succeeded`.

Whatever the outcome, the restore record is then cleared and a forced reconcile pass resumes
normal operation (which also scales back up after a failure: a member's data is only replaced
once its Job restored the snapshot completely, so a failed restore leaves the old data).

Crash safety: the restore is recorded (`ClusterRecord.restore`, with the step being carried
out) before anything is touched and after each step; a restarted provisioner resumes every
recorded restore at its step. Every step is idempotent: scaling to the same count, applying
the same Job, a restore Job whose member is already restored (its marker file) exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from libs.common.bus import Bus
from libs.common.clock import Clock
from libs.common.contract.cluster import ClusterStatusChanged, Condition
from libs.common.contract.restore import RestoreEtcd, RestoreProgressed
from libs.common.tasks import TaskSet
from services.provisioner import manifests, names
from services.provisioner.kube import KubeClient, KubeError, KubeNotConfigured, KubeRejected
from services.provisioner.reconciler import deployment_rolled_out, statefulset_ready
from services.provisioner.store import ActiveRestore, ClusterRecord, ClusterStore

log = logging.getLogger(__name__)

SOURCE = "provisioner"
RESTORING_CONDITION = "Restoring"
STEPS = ("ScalingDown", "Restoring", "ScalingUp")
FINISHED_KEPT = 16
"""Ids of finished restores remembered per cluster, so a redelivered intent is not rerun."""


class RestoreAborted(Exception):
    """The restore cannot go on; `reason` is machine-readable."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RestoreConfig:
    image: str
    """The Nest image the restore Jobs run (it ships etcdutl)."""
    poll_seconds: float = 2.0
    """How often a wait looks at the management cluster again."""
    wait_seconds: float = 900.0
    """How long one wait (pods gone, Jobs done, members ready) may take."""


class Restores:
    """Runs recorded restores, one task per cluster; the service routes intents here.

    `locks` are the service's per-cluster locks (every change of a `ClusterRecord` holds
    one); `client` connects to the management cluster; `resume` is called once a restore
    ended, with the cluster id, to pass the cluster again.
    """

    def __init__(
        self,
        config: RestoreConfig,
        *,
        store: Callable[[], ClusterStore],
        bus: Callable[[], Bus],
        locks: Any,
        client: Callable[[], Awaitable[KubeClient]],
        resume: Callable[[str], Awaitable[None]],
        clock: Clock,
    ) -> None:
        self.config = config
        self._store = store
        self._bus = bus
        self._locks = locks
        self._client = client
        self._resume = resume
        self.clock = clock
        self._tasks = TaskSet()
        self._stopping = False

    # Entry points

    async def on_restore(self, intent: RestoreEtcd) -> None:
        """Record the restore (once) and start it; the intent can be acked on return."""
        store = self._store()
        async with self._locks[intent.cluster_id]:
            record = await store.get(intent.cluster_id)
            if record is not None and intent.restore_id in record.finished_restores:
                log.info("ignoring a finished restore", extra={"restoreId": intent.restore_id})
                return
            refusal = _refusal(record, intent)
            if refusal is None and record is not None and record.restore is None:
                record.restore = ActiveRestore(intent=intent, started_at=self.clock().isoformat())
                await store.put(record)
        if refusal is not None:
            await self._progress(intent, "Failed", refusal[0], refusal[1])
            return
        self.ensure(intent.cluster_id)

    async def resume_all(self) -> None:
        """Start a task for every restore a previous process recorded and did not finish."""
        store = self._store()
        for cluster_id in await store.ids():
            record = await store.get(cluster_id)
            if record is not None and record.restore is not None:
                log.info("resuming an interrupted restore", extra={"clusterId": cluster_id})
                self.ensure(cluster_id)

    def ensure(self, cluster_id: str) -> None:
        """Run the cluster's recorded restore unless a task already does."""
        if self._stopping:
            return
        name = f"restore-{cluster_id}"
        if not self._tasks.alive(name):
            self._tasks.spawn(name, self._run(cluster_id))

    async def stop(self) -> None:
        self._stopping = True
        await self._tasks.stop(2.0)

    # The restore

    async def _run(self, cluster_id: str) -> None:
        record = await self._store().get(cluster_id)
        if record is None or record.restore is None:
            return
        active = record.restore
        intent = active.intent
        try:
            await self._carry_out(record, active)
        except asyncio.CancelledError:
            raise  # stopping: the record stays, the next start resumes
        except RestoreAborted as exc:
            log.warning(
                "restore failed",
                extra={"clusterId": cluster_id, "reason": exc.reason, "error": str(exc)},
            )
            await self._finish(intent, "Failed", exc.reason, str(exc))
        except KubeNotConfigured as exc:
            await self._finish(intent, "Failed", "ManagementClusterUnavailable", str(exc))
        except KubeRejected as exc:
            await self._finish(
                intent, "Failed", "Rejected", f"the management cluster refused: {exc}"
            )
        except KubeError as exc:
            # Transient (the management API is down): keep the record; the resync retries.
            log.warning(
                "restore interrupted; it resumes on the next resync",
                extra={"clusterId": cluster_id, "error": str(exc)},
            )
        except Exception as exc:
            log.exception("restore failed unexpectedly", extra={"clusterId": cluster_id})
            await self._finish(intent, "Failed", "InternalError", str(exc))

    async def _carry_out(self, record: ClusterRecord, active: ActiveRestore) -> None:
        intent = active.intent
        if record.intent is None:
            raise RestoreAborted("ClusterNotProvisioned", "the cluster was never provisioned")
        spec = record.intent
        client = await self._client()
        namespace = names.namespace_for(record.name)
        deployment = (
            f"/apis/apps/v1/namespaces/{namespace}/deployments/{names.CONTROL_PLANE_DEPLOYMENT}"
        )
        statefulset = f"/apis/apps/v1/namespaces/{namespace}/statefulsets/{names.ETCD_STATEFULSET}"
        members = spec.spec.datastore.replicas
        step = STEPS.index(active.step) if active.step in STEPS else 0

        if step <= 0:
            await self._status(record, "ScalingDown", f"restoring etcd from {intent.backup}")
            await self._progress(intent, "ScalingDown", message="scaling the control plane down")
            for path, component in (
                (deployment, manifests.COMPONENT_CONTROL_PLANE),
                (statefulset, manifests.COMPONENT_ETCD),
            ):
                await self._scale(client, path, 0)
                await self._wait(
                    partial(self._scaled_down, client, namespace, path, spec.cluster_id, component),
                    f"the pods of {path.rsplit('/', 1)[-1]} to stop",
                )
            await self._advance(record.cluster_id, "Restoring")

        if step <= 1:
            await self._status(record, "Restoring", f"restoring etcd from {intent.backup}")
            await self._progress(intent, "Restoring", message=f"restoring {members} member(s)")
            await self._run_jobs(client, spec, intent, members)
            await self._advance(record.cluster_id, "ScalingUp")

        await self._status(record, "ScalingUp", f"etcd restored from {intent.backup}")
        await self._progress(intent, "ScalingUp", message="scaling etcd and the control plane up")
        await self._scale(client, statefulset, members)
        await self._wait(
            partial(self._ready, client, statefulset, members, statefulset_ready),
            "the etcd members to be ready",
        )
        replicas = spec.spec.control_plane.replicas
        await self._scale(client, deployment, replicas)
        await self._wait(
            partial(self._ready, client, deployment, replicas, deployment_rolled_out),
            "the control plane to roll out",
        )
        await self._finish(intent, "Succeeded", message=f"etcd restored from {intent.backup}")

    async def _run_jobs(
        self, client: KubeClient, spec: Any, intent: RestoreEtcd, members: int
    ) -> None:
        secret = manifests.etcd_restore_secret(spec, intent.restore_id, intent.snapshot_url)
        jobs = [
            manifests.etcd_restore_job(
                spec,
                restore_id=intent.restore_id,
                ordinal=ordinal,
                image=self.config.image,
                snapshot_sha256=intent.snapshot_sha256,
            )
            for ordinal in range(members)
        ]
        await client.apply(manifests.resource_path(secret), secret)
        for job in jobs:
            await client.apply(manifests.resource_path(job), job)
        try:
            for job in jobs:
                name = job["metadata"]["name"]
                path = manifests.resource_path(job)
                await self._wait(partial(self._job_done, client, path), f"Job {name}")
        finally:
            # Not when cancelled (the process stops): a resumed restore finds its Jobs.
            if not _cancelling():
                for obj in (*jobs, secret):
                    await client.delete(manifests.resource_path(obj), propagation="Background")

    # Steps' parts

    async def _scale(self, client: KubeClient, path: str, replicas: int) -> None:
        try:
            await client.scale(path, replicas)
        except KubeRejected as exc:
            if exc.status == 404:
                raise RestoreAborted(
                    "ClusterNotProvisioned", f"{path} does not exist in the management cluster"
                ) from None
            raise

    async def _scaled_down(
        self, client: KubeClient, namespace: str, path: str, cluster_id: str, component: str
    ) -> bool:
        live = await client.get(path)
        if live is None:
            return True
        observed = live.get("status") or {}
        generation = live.get("metadata", {}).get("generation")
        if generation is not None and observed.get("observedGeneration", 0) < generation:
            return False
        if int(observed.get("replicas", 0)) > 0:
            return False
        pods = await client.list(
            f"/api/v1/namespaces/{namespace}/pods",
            labels={names.CLUSTER_ID_LABEL: cluster_id, names.COMPONENT_LABEL: component},
        )
        return not pods

    async def _ready(
        self,
        client: KubeClient,
        path: str,
        replicas: int,
        check: Callable[[Any, int], tuple[bool, str]],
    ) -> bool:
        live = await client.get(path)
        return live is not None and check(live, replicas)[0]

    async def _job_done(self, client: KubeClient, path: str) -> bool:
        job = await client.get(path)
        if job is None:
            raise RestoreAborted("JobFailed", f"restore Job {path} disappeared")
        observed = job.get("status") or {}
        for condition in observed.get("conditions") or []:
            if condition.get("status") != "True":
                continue
            if condition.get("type") == "Complete":
                return True
            if condition.get("type") == "Failed":
                raise RestoreAborted(
                    "JobFailed",
                    f"restore Job {path.rsplit('/', 1)[-1]} failed: "
                    f"{condition.get('reason', '')} {condition.get('message', '')}".strip(),
                )
        return int(observed.get("succeeded", 0)) > 0

    async def _wait(self, done: Callable[[], Awaitable[bool]], what: str) -> None:
        deadline = asyncio.get_running_loop().time() + self.config.wait_seconds
        while not await done():
            if asyncio.get_running_loop().time() > deadline:
                raise RestoreAborted(
                    "Timeout", f"gave up waiting for {what} after {self.config.wait_seconds:g}s"
                )
            await asyncio.sleep(self.config.poll_seconds)

    async def _advance(self, cluster_id: str, step: str) -> None:
        store = self._store()
        async with self._locks[cluster_id]:
            record = await store.get(cluster_id)
            if record is None or record.restore is None:
                raise RestoreAborted("Cancelled", "the restore record went away")
            record.restore.step = step
            await store.put(record)

    async def _finish(
        self, intent: RestoreEtcd, phase: str, reason: str = "", message: str = ""
    ) -> None:
        """Clear the record, report the outcome, and let reconciliation take over again."""
        store = self._store()
        async with self._locks[intent.cluster_id]:
            record = await store.get(intent.cluster_id)
            restore = record.restore if record is not None else None
            if record is not None and restore and restore.intent.restore_id == intent.restore_id:
                record.restore = None
                record.finished_restores = [
                    *record.finished_restores[-(FINISHED_KEPT - 1) :],
                    intent.restore_id,
                ]
                record.reported = ""  # the next pass reports the status afresh
                await store.put(record)
        await self._progress(intent, phase, reason, message)
        with contextlib.suppress(Exception):
            await self._resume(intent.cluster_id)

    # Reports

    async def _progress(
        self, intent: RestoreEtcd, phase: str, reason: str = "", message: str = ""
    ) -> None:
        await self._bus().publish(
            RestoreProgressed(
                restore_id=intent.restore_id,
                cluster_id=intent.cluster_id,
                backup=intent.backup,
                phase=phase,
                reason=reason,
                message=message,
                at=self.clock(),
                etcd_revision=intent.etcd_revision,
            ),
            source=SOURCE,
            subject=intent.restore_id,
        )

    async def _status(self, record: ClusterRecord, step: str, message: str) -> None:
        """The cluster's status during the restore: phase Restoring, its last conditions
        plus a `Restoring` condition naming the step."""
        now = self.clock()
        conditions = [c for c in record.conditions if c.type != RESTORING_CONDITION]
        conditions.append(
            Condition(
                type=RESTORING_CONDITION,
                status="True",
                reason=step,
                message=message,
                last_transition_time=now,
            )
        )
        await self._bus().publish(
            ClusterStatusChanged(
                cluster_id=record.cluster_id,
                observed_generation=record.generation,
                phase="Restoring",
                reason=step,
                message=message,
                conditions=conditions,
                endpoint=record.endpoint,
            ),
            source=SOURCE,
            subject=record.cluster_id,
        )


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _refusal(record: ClusterRecord | None, intent: RestoreEtcd) -> tuple[str, str] | None:
    """Why this restore cannot start (reason, message), or None."""
    if record is None or record.deleted or record.delete_requested:
        return "ClusterNotFound", f"the provisioner has no cluster {intent.cluster_id}"
    if record.intent is None:
        return "ClusterNotProvisioned", "the cluster was never provisioned"
    if record.restore is not None and record.restore.intent.restore_id != intent.restore_id:
        return (
            "RestoreInProgress",
            f"restore {record.restore.intent.restore_id} of this cluster is still under way",
        )
    return None


def default_image(registry: str) -> str:
    """The Nest image of this version under `registry` (`NEST_IMAGE` overrides it)."""
    try:
        version = importlib.metadata.version("nest")
    except importlib.metadata.PackageNotFoundError:
        version = "dev"
    return f"{registry.rstrip('/')}/nest/nest:{version}"
