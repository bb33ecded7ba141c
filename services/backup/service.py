"""The backup service: consumes `nest.intent.backup.run`, emits the scheduled runs, reports events.

Transport only; the work is in `runs.run_backup`.

- Intents arrive on one durable consumer (`backup`). Each run publishes `BackupStarted`, then
  `BackupCompleted` or `BackupFailed`. A backup-domain failure (bucket missing, snapshot corrupt,
  ...) is reported and acked: the next scheduled run is the retry, and an operator sees the
  reason at once. Anything unexpected is reported and re-raised, so the bus retries it and
  finally dead-letters it.
- The scheduler loop runs on the one replica holding the `scheduler` lease. For each schedule
  it asks `schedule.plan_run` whether a run is due (missed runs collapse into one catch-up run),
  publishes a RunBackup intent whose Nats-Msg-Id is derived from the target and firing time
  (so even two emitters store it once), then advances `lastRun` with a compare-and-set.
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
    INTENTS_STREAM,
    Envelope,
    UnknownMessageType,
    envelope_for,
    parse_payload,
)
from libs.common.contract.backup import BackupCompleted, BackupFailed, BackupStarted, RunBackup
from libs.common.contract.backup_location import (
    PROBE_LOCATION_RPC_SUBJECT,
    LocationProbed,
    ProbeErrorKind,
    ProbeLocationRequest,
)
from libs.common.contract.restore import PrepareRestore
from libs.common.cron import CronError, CronSchedule, latest_due, plan_run
from libs.common.kv import Leases
from libs.common.runner import instance_name
from libs.common.settings import Settings
from libs.common.tasks import TaskSet
from services.backup import config, errors
from services.backup.access import rpc_etcd_access
from services.backup.layout import new_ref
from services.backup.restores import RestorePreparer, preparer_for
from services.backup.runs import BackupContext, EtcdAccess, RunRequest, run_backup
from services.backup.state import ScheduleRecord, Schedules, open_leases
from services.backup.store import probe

log = logging.getLogger(__name__)

SOURCE = "backup"
DURABLE = "backup"
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
        await self._ensure_foundry_schedule()
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
        self._tasks.spawn("scheduler", self._scheduler_loop())
        self._probe_subscription = await serve_probe_location(bus)

    async def stop(self, timeout: float) -> None:
        if self._probe_subscription is not None:
            with contextlib.suppress(Exception):
                await self._probe_subscription.unsubscribe()
        if self._consumer is not None:
            await self._consumer.drain(timeout)
        if self._leases is not None:
            with contextlib.suppress(Exception):
                await self._leases.release(SCHEDULER_LEASE, self.instance)
        if self.restores is not None:
            await self.restores.staged.stop()
        try:
            await self._tasks.stop(2.0)
        finally:
            await self.context.store.close()

    async def ready(self) -> dict[str, bool]:
        return {"intents": self._tasks.alive("intents")}

    # Intents

    async def handle(self, envelope: Envelope, delivery: Delivery) -> None:
        try:
            payload = parse_payload(envelope)
        except (UnknownMessageType, ValidationError) as exc:
            raise Reject(f"not a backup intent: {exc}") from None
        if isinstance(payload, PrepareRestore) and self.restores is not None:
            await self.restores.prepare(payload)
            return
        if not isinstance(payload, RunBackup):
            raise Reject(f"{envelope.type} is not a backup intent")
        await self.on_run(payload)

    async def on_run(self, intent: RunBackup) -> None:
        """Take one backup and report it. One run at a time per replica (bounded memory/IO)."""
        async with self._run_lock:
            now = self.clock()
            ref = new_ref(intent.target, now)
            await self.bus.publish(
                BackupStarted(
                    target=intent.target, kind=intent.kind, backup=str(ref), started_at=now
                ),
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
                result = await run_backup(request, ref, self.context, now)
            except Exception as exc:
                reason = exc.reason if isinstance(exc, errors.BackupError) else "InternalError"
                log.warning(
                    "backup failed",
                    extra={"backup": str(ref), "reason": reason, "error": str(exc)},
                )
                await self.bus.publish(
                    BackupFailed(
                        target=intent.target,
                        kind=intent.kind,
                        backup=str(ref),
                        failed_at=self.clock(),
                        reason=reason,
                        message=str(exc),
                    ),
                    source=SOURCE,
                    subject=intent.target,
                )
                if isinstance(exc, errors.BackupError):
                    return
                raise
            manifest = result.manifest
            await self.bus.publish(
                BackupCompleted(
                    target=intent.target,
                    kind=intent.kind,
                    backup=str(ref),
                    completed_at=manifest.completed_at,
                    stored_bytes=manifest.stored_size,
                    plaintext_sha256=manifest.plaintext_sha256,
                    encrypted=manifest.encrypted,
                    verified=manifest.verified_at is not None,
                    etcd_revision=manifest.etcd.revision if manifest.etcd else None,
                    pruned=[str(r) for r in result.pruned],
                ),
                source=SOURCE,
                subject=intent.target,
            )

    # Schedules

    async def _ensure_foundry_schedule(self) -> None:
        """The Foundry DB schedule comes from settings; keep its lastRun across restarts."""
        assert self._schedules is not None
        for _ in range(5):
            existing = await self._schedules.get(FOUNDRY_TARGET)
            if existing is None:
                record = ScheduleRecord(
                    target=FOUNDRY_TARGET, kind="foundry", cron=self.foundry_schedule.expression
                )
                if await self._schedules.put(record, None):
                    return
                continue
            record, revision = existing
            if record.cron == self.foundry_schedule.expression:
                return
            record.cron = self.foundry_schedule.expression
            if await self._schedules.put(record, revision):
                return

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
        """Emit every due run once; return the targets emitted (the lease is the caller's)."""
        assert self._schedules is not None
        now = self.clock()
        emitted: list[str] = []
        for record, revision in await self._schedules.all():
            try:
                schedule = CronSchedule.parse(record.cron)
            except CronError as exc:
                log.warning("bad schedule", extra={"target": record.target, "error": str(exc)})
                continue
            if record.last_run is None:
                # A new schedule waits for its first firing time instead of running now.
                record.last_run = now
                await self._schedules.put(record, revision)
                continue
            decision = plan_run(schedule, record.last_run, now)
            if not decision.run_now:
                continue
            due = latest_due(schedule, record.last_run, now) or now
            intent = RunBackup(
                target=record.target,
                kind=record.kind,
                cluster_id=record.cluster_id,
                kubernetes_version=record.kubernetes_version,
                trigger="schedule",
                scheduled_for=due,
            )
            subject, envelope = envelope_for(intent, source=SOURCE, subject=record.target)
            envelope.id = f"backup-schedule-{record.target}-{due.strftime('%Y%m%dT%H%M%SZ')}"
            await self.bus.publish_envelope(subject, envelope)
            record.last_run = due
            if await self._schedules.put(record, revision):
                emitted.append(record.target)
                if decision.missed > 1:
                    log.info(
                        "missed scheduled backups collapsed into one catch-up run",
                        extra={"target": record.target, "missed": decision.missed},
                    )
        return emitted
