"""The backup service: its transport. Message handlers, request/reply and the scheduler loop;
the work is in the sub-packages, each named after one job:

- `snapshots/`: taking a backup (etcd snapshots, Foundry DB dumps, one run: `runs.run_backup`);
- `stores/`: where backups are kept and in which format (local and S3 stores, the artifact
  layout, manifest and encryption, the API's backup locations);
- `schedules/`: when backups and drills run (policies, schedule and RPO records, the tick);
- `restores/`: bringing a backup back (a cluster's etcd, staged for the provisioner; the
  Foundry DB, for `nest restore foundry`);
- `drills/`: proving the newest backup of a target restores.

Handlers, each registered by message type with its declared ack outcome (`handlers.Router`):

- Intents arrive on one durable consumer (`backup`). A `RunBackup` publishes `BackupStarted`,
  then `BackupCompleted` or `BackupFailed`. A backup-domain failure (bucket missing, snapshot
  corrupt, ...) is reported and acked: the next scheduled run is the retry, and an operator
  sees the reason at once. Anything unexpected is reported and re-raised: retried with
  backoff, then dead-lettered (`NACK_ON_ERROR`). The same consumer takes the API's backup
  locations and policies into the catalog (`catalog.py`) and `PrepareRestore` intents.
- A second durable consumer (`backup-clusters`, on NEST_EVENTS) follows `ClusterDeclared` /
  `ClusterDeleted` into the catalog and ignores every other cluster event.
- `nest.rpc.backup.probe_location` answers the API's live check of a location.

The scheduler loop runs on the one replica holding the `scheduler` lease
(`schedules.scheduler`: schedules per policy and target, catch-up runs, drills, RPO checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from libs.common.bus import Bus, Consumer, ConsumerSpec, RpcError
from libs.common.clock import Clock, utcnow
from libs.common.contract import EVENTS_STREAM, INTENTS_STREAM
from libs.common.contract.backup import DrillFailed, DrillPassed, RunBackup
from libs.common.contract.backup_location import (
    PROBE_LOCATION_RPC,
    LocationProbed,
    ProbeErrorKind,
    ProbeLocationRequest,
)
from libs.common.contract.backup_policy import (
    ApplyBackupLocation,
    ApplyBackupPolicy,
    DeleteBackupLocation,
    DeleteBackupPolicy,
)
from libs.common.contract.cluster import ClusterDeclared, ClusterDeleted
from libs.common.contract.restore import PrepareRestore
from libs.common.handlers import AckPolicy, Router, Unknown
from libs.common.kv import Leases, leases_bucket, open_leases, run_while_held
from libs.common.runner import instance_name
from libs.common.secrets import sealer_from_settings
from libs.common.settings import Settings
from libs.common.tasks import TaskSet
from services.backup import config, errors
from services.backup.catalog import Catalog, CatalogMessage
from services.backup.drills.newest import drill_newest
from services.backup.restores.cluster import RestorePreparer
from services.backup.restores.staging import StagedSnapshots, staged_from_settings
from services.backup.schedules.records import ScheduleRecord, Schedules
from services.backup.schedules.rpo import RpoBook
from services.backup.schedules.scheduler import Scheduler
from services.backup.snapshots import reports
from services.backup.snapshots.access import rpc_etcd_access
from services.backup.snapshots.resolve import ResolvedRun, resolve_run
from services.backup.snapshots.runs import BackupContext, EtcdAccess, RunRequest, run_backup
from services.backup.stores.layout import BackupRef, new_ref
from services.backup.stores.locations import LocationStores, store_for
from services.backup.stores.objects import ObjectStore
from services.backup.stores.probe import probe

log = logging.getLogger(__name__)

SOURCE = "backup"
DURABLE = "backup"
CLUSTERS_DURABLE = "backup-clusters"
SCHEDULER_LEASE = "scheduler"
LEASES_BUCKET = leases_bucket(SOURCE)
FOUNDRY_TARGET = "foundry"


def context_from_settings(settings: Settings, etcd_access: EtcdAccess | None) -> BackupContext:
    return BackupContext(
        store=config.store_from_settings(settings),
        keyring=config.keyring_from_settings(settings),
        retention=config.retention_from_settings(settings),
        grace=config.incomplete_grace(settings),
        verify=settings.backup_verify_upload,
        database_url=settings.resolved_database_url,
        scratch_dir=settings.data_dir,
        pg_bin_dir=settings.backup_pg_bin_dir,
        etcd_access=etcd_access,
    )


PROBE_ERROR_KINDS: dict[type[errors.BackupError], ProbeErrorKind] = {
    errors.BucketNotFound: "bucket-not-found",
    errors.CredentialsRejected: "credentials-rejected",
    errors.AccessDenied: "access-denied",
    errors.EndpointUnreachable: "endpoint-unreachable",
    errors.EndpointUntrusted: "endpoint-untrusted",
    errors.EndpointForbidden: "endpoint-forbidden",
}


async def probe_location(request: ProbeLocationRequest) -> LocationProbed:
    """Answer `nest.rpc.backup.probe_location`: write, read back and delete a probe object."""
    try:
        store = store_for(request.spec, probing=True)
    except ValidationError as exc:
        # Never echo the input: it holds the secret access key.
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_input=False)
        )
        raise RpcError("invalid", problems) from None
    try:
        await probe(store)
    except errors.BackupError as exc:
        kind = next((k for t, k in PROBE_ERROR_KINDS.items() if isinstance(exc, t)), "store-error")
        raise RpcError(kind, str(exc)) from None
    except OSError as exc:
        raise RpcError("store-error", f"{store.description}: {exc}") from None
    finally:
        await store.close()
    log.info("backup location probed", extra={"location": store.description})
    return LocationProbed(description=store.description)


async def serve_probe_location(bus: Bus) -> Any:
    """Answer location probes (any replica may answer one)."""
    return await bus.answer(PROBE_LOCATION_RPC, probe_location, queue=SOURCE)


class BackupService:
    """Backups of the Foundry DB and of clusters' etcd, on schedule and on request."""

    name = "backup"

    def __init__(
        self,
        settings: Settings,
        *,
        context: BackupContext | None = None,
        etcd_access: EtcdAccess | None = None,
        clock: Clock = utcnow,
        tick_seconds: float = 15.0,
    ) -> None:
        self.settings = settings
        self.context = context or context_from_settings(settings, etcd_access)
        self.foundry_schedule = config.foundry_schedule(settings)
        self.clock = clock
        self.tick_seconds = tick_seconds
        self.instance = instance_name(settings)
        self._tasks = TaskSet()
        self._bus: Bus | None = None
        self._consumer: Consumer | None = None
        self._schedules: Schedules | None = None
        self._leases: Leases | None = None
        self._run_lock = asyncio.Lock()
        self._probe_subscription: Any = None
        self.restores: RestorePreparer | None = None
        self.staged: StagedSnapshots | None = None
        self._catalog: Catalog | None = None
        self._stores: LocationStores | None = None
        self._rpo: RpoBook | None = None
        self._scheduler: Scheduler | None = None
        self._clusters_consumer: Consumer | None = None

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError("the backup service is not started")
        return self._bus

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            raise RuntimeError("the backup service is not started")
        return self._catalog

    def intents(self) -> Router:
        """The intent handlers. Each failure they let through is unexpected (a backup-domain
        failure is reported by the handler and acked): retried with backoff, then
        dead-lettered."""
        router = Router(SOURCE)
        router.register(RunBackup, self.on_run, ack=AckPolicy.NACK_ON_ERROR)
        router.register(PrepareRestore, self.on_prepare_restore, ack=AckPolicy.NACK_ON_ERROR)
        for catalog_type in (
            ApplyBackupPolicy,
            DeleteBackupPolicy,
            ApplyBackupLocation,
            DeleteBackupLocation,
        ):
            router.register(catalog_type, self.on_catalog, ack=AckPolicy.NACK_ON_ERROR)
        return router

    def cluster_events(self) -> Router:
        """The cluster events the catalog follows; every other cluster event is not ours."""
        router = Router(f"{SOURCE}-clusters", unknown=Unknown.IGNORE)
        router.register(ClusterDeclared, self.on_catalog, ack=AckPolicy.NACK_ON_ERROR)
        router.register(ClusterDeleted, self.on_catalog, ack=AckPolicy.NACK_ON_ERROR)
        return router

    async def start(self, bus: Bus) -> None:
        self._bus = bus
        if self.context.etcd_access is None:
            self.context.etcd_access = rpc_etcd_access(bus, f"backup-{self.instance}")
        self._schedules = await Schedules.open(bus)
        self._leases = await open_leases(bus, SOURCE, ttl_seconds=max(4 * self.tick_seconds, 5.0))
        self._catalog = await Catalog.open(bus)
        self._stores = LocationStores(self._catalog, sealer_from_settings(self.settings))
        self._rpo = await RpoBook.open(bus)
        self._scheduler = Scheduler(
            bus=bus,
            source=SOURCE,
            catalog=self._catalog,
            schedules=self._schedules,
            rpo=self._rpo,
            foundry_cron=self.foundry_schedule.expression,
            clock=self.clock,
            start_drill=self.start_drill,
        )
        self.staged = staged_from_settings(self.settings)
        self.restores = RestorePreparer(
            staged=self.staged,
            store_for=self.store_of_location,
            keyring=lambda: self.context.keyring,
            etcd_access=lambda: self.context.etcd_access,
            bus=lambda: self.bus,
            etcd_bin_dir=self.settings.backup_etcd_bin_dir,
            clock=self.clock,
        )
        await self.staged.start()
        spec = ConsumerSpec(
            stream=INTENTS_STREAM,
            durable=DURABLE,
            filter_subject="nest.intent.backup.>",
            service=SOURCE,
            max_deliver=self.settings.max_deliver,
            # A large snapshot takes a while; the consumer keeps the message alive meanwhile.
            ack_wait_seconds=120.0,
        )
        self._consumer = bus.consumer(spec, self.intents())
        self._tasks.spawn("intents", self._consumer.run())
        clusters = ConsumerSpec(
            stream=EVENTS_STREAM,
            durable=CLUSTERS_DURABLE,
            filter_subject="nest.event.cluster.>",
            service=SOURCE,
            max_deliver=self.settings.max_deliver,
        )
        self._clusters_consumer = bus.consumer(clusters, self.cluster_events())
        self._tasks.spawn("clusters", self._clusters_consumer.run())
        self._tasks.spawn(
            "scheduler",
            run_while_held(
                self._leases, SCHEDULER_LEASE, self.instance, self.tick, interval=self.tick_seconds
            ),
        )
        self._probe_subscription = await serve_probe_location(bus)

    async def stop(self, timeout: float) -> None:
        if self._probe_subscription is not None:
            with contextlib.suppress(Exception):
                await self._probe_subscription.unsubscribe()
        if self._consumer is not None:
            await self._consumer.drain(timeout)
        if self._clusters_consumer is not None:
            await self._clusters_consumer.drain(timeout)
        if self.staged is not None:
            await self.staged.stop()
        try:
            # Cancelling the scheduler loop gives its lease up, for another replica to take.
            await self._tasks.stop(2.0)
        finally:
            if self._stores is not None:
                await self._stores.close()
            await self.context.store.close()

    async def ready(self) -> dict[str, bool]:
        return {"intents": self._tasks.alive("intents"), "clusters": self._tasks.alive("clusters")}

    @contextlib.asynccontextmanager
    async def store_of_location(self, location_id: str | None) -> AsyncIterator[ObjectStore]:
        """The store of a backup location (None: the store of this service's settings), held
        for the time of one download."""
        if location_id is None:
            yield self.context.store
            return
        if self._stores is None:
            raise errors.RestoreRefused(
                "LocationNotFound", f"backup location {location_id!r} is not known here"
            )
        async with self._stores.use(location_id) as (_, store):
            yield store

    # Intents and events

    async def on_catalog(self, message: CatalogMessage) -> None:
        """A backup location, policy or cluster changed: into the catalog."""
        await self.catalog.apply(message)

    async def on_prepare_restore(self, intent: PrepareRestore) -> None:
        """Fetch, verify and stage a backup for a cluster restore (`restores.cluster`)."""
        if self.restores is None:
            raise RuntimeError("the backup service is not started")
        await self.restores.prepare(intent)

    async def on_run(self, intent: RunBackup) -> None:
        """Take one backup and report it. One run at a time per replica (bounded memory/IO)."""
        assert self._catalog is not None
        assert self._stores is not None
        async with self._run_lock:
            now = self.clock()
            ref = new_ref(intent.target, now)
            try:
                async with resolve_run(intent, self.context, self._catalog, self._stores) as run:
                    await self._run(intent, ref, now, run)
            except errors.BackupError as exc:
                # The run could not even start (unknown policy or location, no key, ...).
                log.warning("backup refused", extra={"reason": exc.reason, "error": str(exc)})
                await self.bus.publish(
                    reports.failed(
                        intent,
                        None,
                        self.clock(),
                        exc.reason,
                        str(exc),
                        intent.policy_id,
                        intent.location_id,
                    ),
                    source=SOURCE,
                    subject=intent.target,
                )

    async def _run(
        self, intent: RunBackup, ref: BackupRef, now: datetime, run: ResolvedRun
    ) -> None:
        await self.bus.publish(
            reports.started(intent, ref, now, run.policy_id, run.location_id),
            source=SOURCE,
            subject=intent.target,
        )
        request = RunRequest(
            target=intent.target,
            kind=intent.kind,
            cluster_id=intent.cluster_id,
            kubernetes_version=intent.kubernetes_version,
            labels={"trigger": intent.trigger},
        )
        try:
            result = await run_backup(request, ref, run.context, now)
        except Exception as exc:
            reason = exc.reason if isinstance(exc, errors.BackupError) else "InternalError"
            log.warning(
                "backup failed", extra={"backup": str(ref), "reason": reason, "error": str(exc)}
            )
            await self.bus.publish(
                reports.failed(
                    intent, ref, self.clock(), reason, str(exc), run.policy_id, run.location_id
                ),
                source=SOURCE,
                subject=intent.target,
            )
            if isinstance(exc, errors.BackupError):
                return
            raise
        await self.bus.publish(
            reports.completed(intent, ref, result, now, run.policy_id, run.location_id),
            source=SOURCE,
            subject=intent.target,
        )
        if run.policy_id is not None and self._rpo is not None:
            await self._rpo.record_success(
                run.policy_id, intent.target, result.manifest.completed_at
            )

    # Schedules and drills

    async def tick(self) -> list[str]:
        """Emit every due run and drill once, check RPOs (the lease is the caller's); returns
        the schedule keys emitted (`scheduler.Scheduler.tick`)."""
        assert self._scheduler is not None
        return await self._scheduler.tick()

    async def start_drill(self, record: ScheduleRecord) -> None:
        """Run the drill of a drill schedule record in the background on this replica."""
        self._tasks.spawn(
            f"drill-{record.record_key}-{self.clock():%Y%m%dT%H%M%S}", self.drill(record)
        )

    async def drill(self, record: ScheduleRecord) -> None:
        """Drill the newest backup of the record's target in its policy's location; publish the
        result (one drill or run at a time per replica)."""
        assert self._catalog is not None
        assert self._stores is not None
        policy = await self._catalog.policy(record.policy_id or "")
        if policy is None or policy.spec is None:
            return
        location_id = policy.spec.location_id
        async with self._run_lock:
            now = self.clock()
            try:
                async with self._stores.use(location_id) as (_, store):
                    result: DrillPassed | DrillFailed = await drill_newest(
                        store,
                        record.target,
                        record.kind,
                        self.context.keyring,
                        scratch_dir=self.settings.data_dir / "drills",
                        etcd_bin_dir=self.settings.backup_etcd_bin_dir,
                        database_url=self.settings.resolved_database_url,
                        pg_bin_dir=self.settings.backup_pg_bin_dir,
                        location_id=location_id,
                        policy_id=policy.policy_id,
                        now=now,
                    )
            except Exception as exc:
                reason = exc.reason if isinstance(exc, errors.BackupError) else "InternalError"
                log.exception("restore drill could not run", extra={"target": record.target})
                result = DrillFailed(
                    target=record.target,
                    kind=record.kind,
                    location_id=location_id,
                    policy_id=policy.policy_id,
                    drilled_at=now,
                    reason=reason,
                    message=str(exc),
                )
        await self.bus.publish(result, source=SOURCE, subject=record.target)
