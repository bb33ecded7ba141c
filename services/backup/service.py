"""The backup service: consumes `nest.intent.backup.run`, emits the scheduled runs, reports events.

Transport only; the work is in `runs.run_backup`.

- Intents arrive on one durable consumer (`backup`). Each run publishes `BackupStarted`, then
  `BackupCompleted` or `BackupFailed`. A backup-domain failure (bucket missing, snapshot corrupt,
  ...) is reported and acked: the next scheduled run is the retry, and an operator sees the
  reason at once. Anything unexpected is reported and re-raised, so the bus retries it and
  finally dead-letters it.
- The same consumer takes the API's backup locations and policies into the catalog
  (`catalog.py`); a second durable consumer (`backup-clusters`, on NEST_EVENTS) follows
  `ClusterDeclared`/`ClusterDeleted`. A run resolves its store, keys and retention from its
  policy or location (`resolve.py`, `locations.py`).
- The scheduler loop runs on the one replica holding the `scheduler` lease; `scheduler.py` does
  one tick: schedules per policy and target, catch-up runs, drills, RPO checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from libs.common.bus import Bus, Consumer, ConsumerSpec, Delivery, Reject, RpcError
from libs.common.contract import (
    EVENTS_STREAM,
    INTENTS_STREAM,
    Envelope,
    UnknownMessageType,
    parse_payload,
)
from libs.common.contract.backup import (
    DrillFailed,
    RunBackup,
)
from libs.common.contract.backup_location import (
    PROBE_LOCATION_RPC_SUBJECT,
    LocationProbed,
    ProbeErrorKind,
    ProbeLocationRequest,
)
from libs.common.contract.restore import PrepareRestore
from libs.common.kv import Leases
from libs.common.runner import instance_name
from libs.common.secrets import sealer_from_settings
from libs.common.settings import Settings
from libs.common.tasks import TaskSet
from services.backup import config, drills, errors, reports
from services.backup.access import rpc_etcd_access
from services.backup.catalog import CATALOG_TYPES, Catalog
from services.backup.layout import BackupRef, new_ref
from services.backup.locations import LocationStores
from services.backup.resolve import ResolvedRun, resolve_run
from services.backup.restores import RestorePreparer, preparer_for
from services.backup.runs import BackupContext, EtcdAccess, RunRequest, run_backup
from services.backup.scheduler import Scheduler
from services.backup.state import RpoBook, ScheduleRecord, Schedules, open_leases
from services.backup.store import probe

log = logging.getLogger(__name__)

SOURCE = "backup"
DURABLE = "backup"
CLUSTERS_DURABLE = "backup-clusters"
SCHEDULER_LEASE = "scheduler"
FOUNDRY_TARGET = "foundry"
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


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


async def probe_location(body: dict[str, Any]) -> dict[str, Any]:
    """Answer `nest.rpc.backup.probe_location`: write, read back and delete a probe object."""
    try:
        request = ProbeLocationRequest.model_validate(body)
        store = config.store_from_location(request.spec)
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
    return LocationProbed(description=store.description).wire()


async def serve_probe_location(bus: Bus) -> Any:
    """Answer location probes (any replica may answer one)."""
    return await bus.serve(PROBE_LOCATION_RPC_SUBJECT, probe_location, queue=SOURCE)


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

    async def start(self, bus: Bus) -> None:
        self._bus = bus
        if self.context.etcd_access is None:
            self.context.etcd_access = rpc_etcd_access(bus, f"backup-{self.instance}")
        self._schedules = await Schedules.open(bus)
        self._leases = await open_leases(bus, ttl_seconds=max(4 * self.tick_seconds, 5.0))
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
        self.restores = preparer_for(self)  # cluster restores (restores.py)
        await self.restores.staged.start()
        spec = ConsumerSpec(
            stream=INTENTS_STREAM,
            durable=DURABLE,
            filter_subject="nest.intent.backup.>",
            service=SOURCE,
            max_deliver=self.settings.max_deliver,
            # A large snapshot takes a while; the consumer keeps the message alive meanwhile.
            ack_wait_seconds=120.0,
        )
        self._consumer = bus.consumer(spec, self.handle)
        self._tasks.spawn("intents", self._consumer.run())
        clusters = ConsumerSpec(
            stream=EVENTS_STREAM,
            durable=CLUSTERS_DURABLE,
            filter_subject="nest.event.cluster.>",
            service=SOURCE,
            max_deliver=self.settings.max_deliver,
        )
        self._clusters_consumer = bus.consumer(clusters, self.handle_cluster_event)
        self._tasks.spawn("clusters", self._clusters_consumer.run())
        self._tasks.spawn("scheduler", self._scheduler_loop())
        self._probe_subscription = await serve_probe_location(bus)

    async def stop(self, timeout: float) -> None:
        if self._probe_subscription is not None:
            with contextlib.suppress(Exception):
                await self._probe_subscription.unsubscribe()
        if self._consumer is not None:
            await self._consumer.drain(timeout)
        if self._clusters_consumer is not None:
            await self._clusters_consumer.drain(timeout)
        if self._leases is not None:
            with contextlib.suppress(Exception):
                await self._leases.release(SCHEDULER_LEASE, self.instance)
        if self.restores is not None:
            await self.restores.staged.stop()
        try:
            await self._tasks.stop(2.0)
        finally:
            if self._stores is not None:
                await self._stores.close()
            await self.context.store.close()

    async def ready(self) -> dict[str, bool]:
        return {"intents": self._tasks.alive("intents"), "clusters": self._tasks.alive("clusters")}

    # Intents

    async def handle(self, envelope: Envelope, delivery: Delivery) -> None:
        try:
            payload = parse_payload(envelope)
        except (UnknownMessageType, ValidationError) as exc:
            raise Reject(f"not a backup intent: {exc}") from None
        if isinstance(payload, CATALOG_TYPES):
            assert self._catalog is not None
            await self._catalog.apply(payload)
            return
        if isinstance(payload, PrepareRestore) and self.restores is not None:
            await self.restores.prepare(payload)
            return
        if not isinstance(payload, RunBackup):
            raise Reject(f"{envelope.type} is not a backup intent")
        await self.on_run(payload)

    async def handle_cluster_event(self, envelope: Envelope, delivery: Delivery) -> None:
        """ClusterDeclared / ClusterDeleted into the catalog; other cluster events are not ours."""
        try:
            payload = parse_payload(envelope)
        except (UnknownMessageType, ValidationError):
            return  # a newer event type, or one that is not for us
        if isinstance(payload, CATALOG_TYPES):
            assert self._catalog is not None
            await self._catalog.apply(payload)

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

    async def _scheduler_loop(self) -> None:
        assert self._leases is not None
        while True:
            try:
                if await self._leases.hold(SCHEDULER_LEASE, self.instance):
                    await self.tick()
            except Exception:
                log.exception("scheduler tick failed")
            await asyncio.sleep(self.tick_seconds)

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
                    result: Any = await drills.drill_newest(
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
