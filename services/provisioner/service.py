"""The provisioner service: intent consumer, status publisher, follow-up and resync loops, and
the kubeconfig request handler. Transport stays thin; the work is in `reconciler`.

- Intents (`nest.intent.provisioner.reconcile|delete`) arrive on one durable consumer. A
  reconcile intent is recorded (the last intent per cluster, in the `nest_provisioner_clusters`
  bucket), passed once, and acked; a cluster that is not Ready yet is then passed again by a
  follow-up task until it is. A delete intent is acked once the namespace is gone and
  `ClusterDeleted` was published, or, if the namespace is still terminating after the delete
  timeout, once a follow-up task took over waiting for it (never dead-lettered for that).
- A status event is published at every transition (phase, conditions, endpoint), never twice
  for the same state.
- The resync, run by the one replica that holds the `resync` lease, passes every known cluster
  again (recreating what was deleted behind Nest's back), finishes interrupted deletions,
  removes leftovers of clusters whose deletion is confirmed, and reports, without touching,
  namespaces labelled for clusters it has no record of.

Every intent type has its own handler (`handlers.Router`), each failing as declared: a
reconcile, delete or restore that fails is retried with backoff (the management cluster may be
down), and dead-lettered after `max_deliver` deliveries. Every loop (the intent consumer, the
resync, the watches, one follow-up per cluster not Ready yet) is a task of the service's
`TaskSet`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import defaultdict
from datetime import timedelta
from typing import Any

import yaml

from libs.common.bus import Bus, Consumer, ConsumerSpec, RpcError
from libs.common.clock import Clock, utcnow
from libs.common.contract import INTENTS_STREAM
from libs.common.contract.cluster import ClusterDeleted, DeleteCluster, ReconcileCluster
from libs.common.contract.etcd_access import ETCD_CLIENT_RPC, EtcdClientIssued, EtcdClientRequest
from libs.common.contract.kubeconfig import KUBECONFIG_RPC, KubeconfigIssued, KubeconfigRequest
from libs.common.contract.restore import RestoreEtcd
from libs.common.handlers import AckPolicy, Router
from libs.common.kv import Leases, open_leases, run_while_held
from libs.common.logging import correlation_id
from libs.common.runner import instance_name
from libs.common.settings import Settings
from libs.common.tasks import TaskSet
from services.provisioner import kube, pki, status
from services.provisioner.kube import KubeError, KubeNotConfigured
from services.provisioner.reconciler import ProvisionerConfig, Reconciler
from services.provisioner.restore import RestoreConfig, Restores, default_image
from services.provisioner.store import ClusterRecord, ClusterStore
from services.provisioner.watch import ClusterObjectsWatch, ObjectChange

log = logging.getLogger(__name__)

SOURCE = "provisioner"
DURABLE = "provisioner"
RESYNC_LEASE = "resync"


def config_from_settings(settings: Settings) -> ProvisionerConfig:
    retry = kube.Retry(attempts=settings.kube_retry_attempts, timeout=settings.kube_timeout_seconds)
    tenant_retry = kube.Retry(
        attempts=1, timeout=5.0, connect_timeout=settings.tenant_connect_timeout_seconds
    )
    return ProvisionerConfig(
        kubeconfig=settings.kubeconfig,
        image_registry=settings.image_registry,
        renew_before=timedelta(days=settings.pki_renew_before_days),
        management_dns_domain=settings.management_dns_domain,
        node_address=settings.node_address,
        retry=retry,
        tenant_retry=tenant_retry,
        concurrency=settings.reconcile_concurrency,
    )


class ProvisionerService:
    """Hosted control planes in the management cluster, driven by intents."""

    name = "provisioner"

    def __init__(
        self,
        settings: Settings,
        *,
        config: ProvisionerConfig | None = None,
        clock: Clock = utcnow,
        first_resync_after: float = 10.0,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.reconciler = Reconciler(config or config_from_settings(settings), clock)
        self.instance = instance_name(settings)
        self.poll_interval = settings.poll_interval_seconds
        self.resync_interval = settings.resync_interval_seconds
        self.first_resync_after = min(first_resync_after, self.resync_interval)
        """Soon after a start, so a restart picks up what a crashed process left half done."""
        self._tasks = TaskSet()
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._wakeups: dict[str, asyncio.Event] = {}
        """Per cluster followed: set by a watch event to pass it at once."""
        self.watch = ClusterObjectsWatch(self.reconciler.management.client, self.wake)
        self.watch_debounce = 0.05
        """After a watch event, wait this long for the rest of the burst before passing."""
        self._consumer: Consumer | None = None
        self._rpc: list[Any] = []
        self._bus: Bus | None = None
        self._store: ClusterStore | None = None
        self._leases: Leases | None = None
        self._stopping = False
        self.passes = 0
        self.restores = Restores(
            RestoreConfig(
                image=settings.image or default_image(settings.image_registry),
                poll_seconds=settings.poll_interval_seconds,
                wait_seconds=settings.restore_wait_seconds,
            ),
            store=lambda: self.store,
            bus=lambda: self.bus,
            locks=self._locks,
            client=self.reconciler.management.client,
            resume=self._after_restore,
            clock=clock,
        )

    # Lifecycle

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError("the provisioner is not started")
        return self._bus

    @property
    def store(self) -> ClusterStore:
        if self._store is None:
            raise RuntimeError("the provisioner is not started")
        return self._store

    def intents(self) -> Router:
        """The intent handlers: each failure is transient (the management cluster may be down
        or slow) and retried with backoff, then dead-lettered after `max_deliver`."""
        router = Router(SOURCE)
        router.register(ReconcileCluster, self.on_reconcile, ack=AckPolicy.NACK_ON_ERROR)
        router.register(DeleteCluster, self.on_delete, ack=AckPolicy.NACK_ON_ERROR)
        router.register(RestoreEtcd, self.restores.on_restore, ack=AckPolicy.NACK_ON_ERROR)
        return router

    async def start(self, bus: Bus) -> None:
        self._bus = bus
        self._store = await ClusterStore.open(bus)
        self._leases = await open_leases(
            bus, SOURCE, ttl_seconds=max(3 * self.resync_interval, 5.0)
        )
        spec = ConsumerSpec(
            stream=INTENTS_STREAM,
            durable=DURABLE,
            filter_subject="nest.intent.provisioner.>",
            service=SOURCE,
            max_deliver=self.settings.max_deliver,
            # A delete waits for the namespace to go, which may take a while.
            ack_wait_seconds=self.reconciler.config.delete_timeout_seconds + 30.0,
            concurrency=self.settings.reconcile_concurrency,
        )
        self._consumer = bus.consumer(spec, self.intents())
        self._tasks.spawn("intents", self._consumer.run())
        self._rpc = [
            await bus.answer(KUBECONFIG_RPC, self.kubeconfig, queue=DURABLE),
            await bus.answer(ETCD_CLIENT_RPC, self.etcd_client, queue=DURABLE),
        ]
        await bus.nc.flush()  # the subscription is live on the server before start() returns
        self._tasks.spawn(
            "resync",
            run_while_held(
                self._leases,
                RESYNC_LEASE,
                self.instance,
                self.resync,
                interval=self.resync_interval,
                first_after=self.first_resync_after,
            ),
        )
        await self.restores.resume_all()
        self._tasks.spawn("watch", self.watch.run())

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        if self._consumer is not None:
            await self._consumer.drain(timeout)
        for subscription in self._rpc:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        await self.restores.stop()
        try:
            await self._tasks.stop(2.0)
        finally:
            await self.reconciler.close()

    async def ready(self) -> dict[str, bool]:
        return {"intents": self._tasks.alive("intents")}

    # Intents

    async def on_reconcile(self, intent: ReconcileCluster) -> None:
        async with self._locks[intent.cluster_id]:
            record = await self.store.get(intent.cluster_id)
            if record is None:
                record = ClusterRecord(cluster_id=intent.cluster_id, name=intent.name)
            if record.delete_requested or record.deleted:
                log.info("ignoring reconcile of a deleted cluster", extra=_ids(intent))
                return
            if record.intent is not None and record.intent.generation > intent.generation:
                log.info("ignoring a stale reconcile intent", extra=_ids(intent))
                return
            record.intent = intent
            record.name = intent.name
            record.generation = intent.generation
            await self.store.put(record)
            done = await self._pass(record)
        if not done:
            self._follow(intent.cluster_id)

    async def on_delete(self, intent: DeleteCluster) -> None:
        async with self._locks[intent.cluster_id]:
            record = await self.store.get(intent.cluster_id)
            if record is None:
                record = ClusterRecord(cluster_id=intent.cluster_id, name=intent.name)
            if not record.delete_requested:
                record.delete_requested = True
                record.generation = max(record.generation, intent.generation)
                await self.store.put(record)
            gone = await self._finish_delete(record)
        await self._tasks.cancel(_follower(intent.cluster_id))
        if not gone:
            # The namespace is terminating and only needs time (pods stopping, a finalizer):
            # the intent is done, recorded as `delete_requested`; a follow-up reports the
            # cluster gone once the namespace is (the resync would too, after a restart).
            log.info(
                "cluster namespace still terminating; following its deletion",
                extra=_ids(intent),
            )
            self._follow(intent.cluster_id)

    async def _finish_delete(self, record: ClusterRecord, *, wait: float | None = None) -> bool:
        """Delete the cluster's objects (unless done) and wait up to `wait` seconds (default:
        the delete timeout) for them to go; once gone, record the tombstone and report it.

        False while the namespace is still terminating (its deletion is under way).
        """
        if not record.deleted:
            intent = DeleteCluster(
                cluster_id=record.cluster_id, name=record.name, generation=max(1, record.generation)
            )
            try:
                if not await self.reconciler.delete(intent, wait=wait):
                    return False
            except KubeNotConfigured:
                if record.applied:
                    raise
                # Nothing can have been created without a management cluster.
            record.deleted = True
            record.intent = None
            await self.store.put(record)
            log.info("cluster deleted", extra={"clusterId": record.cluster_id})
        await self.bus.publish(
            ClusterDeleted(cluster_id=record.cluster_id, observed_generation=record.generation),
            source=SOURCE,
            subject=record.cluster_id,
        )
        return True

    # Passes

    async def _pass(self, record: ClusterRecord, *, force: bool = False) -> bool:
        """Reconcile `record` once (the caller holds its lock); True when nothing is left."""
        assert record.intent is not None
        if record.restore is not None:
            # A restore owns the cluster's objects until it ends (restore.py); it passes the
            # cluster again then. Make sure it runs (after a crash the resync gets here).
            self.restores.ensure(record.cluster_id)
            return True
        before = record.model_dump_json()
        observation = await self.reconciler.reconcile(record.intent, record, force=force)
        self.passes += 1
        event = status.build_status(observation, record.conditions, self.clock())
        digest = hashlib.sha256(repr(status.fingerprint(event)).encode()).hexdigest()
        if event.phase == "Ready":
            record.was_ready = True
            record.ready_capacity = status.Capacity.of(record.intent.spec)
        if digest != record.reported:
            record.conditions = event.conditions
            record.reported = digest
            await self.bus.publish(
                event,
                source=SOURCE,
                subject=record.cluster_id,
                correlation=correlation_id.get(),
            )
            log.info(
                "cluster %s is %s",
                record.name,
                event.phase,
                extra={"clusterId": record.cluster_id, "reason": event.reason},
            )
        if record.model_dump_json() != before:
            await self.store.put(record)
        # Only a refused upgrade waits for a new spec; anything else may pass on its own.
        return event.phase == "Ready" or (
            event.phase == "Failed" and event.reason == "UpgradeRefused"
        )

    async def _deletion_done(self, record: ClusterRecord) -> bool:
        """One look at a deletion under way (the caller holds the cluster's lock)."""
        try:
            return await self._finish_delete(record, wait=0.0)
        except KubeError as exc:
            log.info(
                "deletion of cluster %s: the management cluster does not answer (%s)",
                record.name,
                exc,
                extra={"clusterId": record.cluster_id},
            )
            return False

    def wake(self, cluster_id: str, change: ObjectChange | None = None) -> None:
        """Something of the cluster changed in the management cluster (a watch event): pass it
        soon, whether it is being followed or was Ready; an object deleted or changed by
        someone else (`change`) is applied again in that pass."""
        if self._stopping:
            return
        if change is not None:
            self.reconciler.suspect(cluster_id, change.path, change.version)
        event = self._wakeups.get(cluster_id)
        if event is not None:
            event.set()
        elif not self._tasks.alive(_follower(cluster_id)):
            self._follow(cluster_id, immediate=True)

    async def _after_restore(self, cluster_id: str) -> None:
        """A restore ended: pass the cluster with forced writes, then follow it to Ready."""
        async with self._locks[cluster_id]:
            record = await self.store.get(cluster_id)
            if record is None or record.intent is None or record.delete_requested:
                return
            done = await self._pass(record, force=True)
        if not done:
            self._follow(cluster_id)

    def _follow(self, cluster_id: str, *, immediate: bool = False) -> None:
        if self._stopping or self._tasks.alive(_follower(cluster_id)):
            return
        event = self._wakeups.setdefault(cluster_id, asyncio.Event())
        if immediate:
            event.set()
        self._tasks.spawn(_follower(cluster_id), self._follow_up(cluster_id))

    async def _follow_up(self, cluster_id: str) -> None:
        """Pass a cluster again until it is Ready or Failed: at once when a watch event says
        something changed, else after growing pauses (the fallback when watches fail). For a
        cluster being deleted, look instead whether its namespace is gone yet."""
        delay = self.poll_interval
        longest = max(self.poll_interval, min(self.resync_interval, 30.0))
        woken = self._wakeups[cluster_id]
        try:
            while not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), delay)
                if woken.is_set():
                    await asyncio.sleep(self.watch_debounce)
                woken.clear()
                async with self._locks[cluster_id]:
                    record = await self.store.get(cluster_id)
                    if record is None or record.deleted:
                        return
                    if record.delete_requested:
                        done = await self._deletion_done(record)
                    elif record.intent is None:
                        return
                    else:
                        done = await self._pass(record)
                if woken.is_set():
                    continue  # woken during the pass, which may have read the state before
                if done:
                    return
                delay = min(delay * 1.5, longest)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("follow-up of cluster %s failed; the resync takes over", cluster_id)
        finally:
            if self._tasks.get(_follower(cluster_id)) is asyncio.current_task():
                self._wakeups.pop(cluster_id, None)

    # Resync

    async def resync(self) -> None:
        """Pass every known cluster again; heal drift, finish deletions, report orphans."""
        ids = await self.store.ids()
        results = await asyncio.gather(
            *(self._resync_one(cluster_id) for cluster_id in ids), return_exceptions=True
        )
        for cluster_id, result in zip(ids, results, strict=True):
            if isinstance(result, Exception):
                log.warning("resync of cluster %s failed: %s", cluster_id, result)
        try:
            labelled = await self.reconciler.labelled_namespaces()
        except KubeError as exc:
            log.warning("resync could not list namespaces: %s", exc)
            return
        known = set(ids)
        for namespace, cluster_id in labelled:
            if cluster_id not in known:
                log.warning(
                    "namespace %s is labelled for cluster %s, which the provisioner has no "
                    "record of; leaving it alone (no confirmed deletion)",
                    namespace,
                    cluster_id,
                )

    async def _resync_one(self, cluster_id: str) -> None:
        async with self._locks[cluster_id]:
            record = await self.store.get(cluster_id)
            if record is None:
                return
            if record.deleted:
                with contextlib.suppress(KubeNotConfigured):
                    if await self.reconciler.remove_leftovers(record):
                        log.warning(
                            "removed leftovers of deleted cluster %s",
                            record.name,
                            extra={"clusterId": cluster_id},
                        )
                return
            if record.delete_requested:
                done = await self._finish_delete(record, wait=0.0)
            elif record.intent is None:
                return
            else:
                done = await self._pass(record, force=True)
        if not done:
            self._follow(cluster_id)

    # Kubeconfigs

    async def kubeconfig(self, request: KubeconfigRequest) -> KubeconfigIssued:
        """`nest.rpc.provisioner.kubeconfig`: sign a short-lived admin kubeconfig."""
        record = await self.store.get(request.cluster_id)
        if (
            record is None
            or record.delete_requested
            or (request.name is not None and request.name != record.name)
        ):
            raise RpcError("not-found", f"no cluster {request.cluster_id}")
        try:
            issued = await self.reconciler.admin_kubeconfig(
                record, request.requester, timedelta(seconds=request.ttl_seconds)
            )
        except LookupError as exc:
            raise RpcError("not-found", str(exc)) from None
        except (pki.InvalidPKIInputError, pki.LifetimeTooLongError) as exc:
            raise RpcError("invalid", str(exc)) from None
        except (KubeError, pki.CAUnavailableError) as exc:
            raise RpcError("unavailable", str(exc)) from None
        document = yaml.safe_dump(yaml.safe_load(issued.kubeconfig), sort_keys=False)
        log.info(
            "admin kubeconfig issued",
            extra={"clusterId": record.cluster_id, "user": issued.user},
        )
        return KubeconfigIssued(kubeconfig=document, expires_at=issued.expires_at)

    async def etcd_client(self, request: EtcdClientRequest) -> EtcdClientIssued:
        """`nest.rpc.provisioner.etcd_client`: short-lived etcd client access (backups)."""
        record = await self.store.get(request.cluster_id)
        if record is None or record.delete_requested:
            raise RpcError("not-found", f"no cluster {request.cluster_id}")
        try:
            url, issued = await self.reconciler.etcd_client(
                record, request.requester, timedelta(seconds=request.ttl_seconds)
            )
        except LookupError as exc:
            raise RpcError("not-found", str(exc)) from None
        except (pki.InvalidPKIInputError, pki.LifetimeTooLongError) as exc:
            raise RpcError("invalid", str(exc)) from None
        except (KubeError, pki.CAUnavailableError) as exc:
            raise RpcError("unavailable", str(exc)) from None
        log.info(
            "etcd client certificate issued",
            extra={"clusterId": record.cluster_id, "requester": request.requester},
        )
        return EtcdClientIssued(
            url=url,
            ca_pem=issued.ca_pem.decode(),
            cert_pem=issued.cert_pem.decode(),
            key_pem=issued.key_pem.decode(),
            expires_at=issued.expires_at,
        )


def _follower(cluster_id: str) -> str:
    """The name of the task following `cluster_id` until it is Ready (or gone)."""
    return f"follow-{cluster_id}"


def _ids(intent: ReconcileCluster | DeleteCluster) -> dict[str, object]:
    return {"clusterId": intent.cluster_id, "generation": intent.generation}
