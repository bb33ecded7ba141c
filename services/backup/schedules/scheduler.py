"""The scheduler: one tick on the replica holding the `scheduler` lease.

Each tick:

1. **Syncs** the schedule records (`nest_backup_schedules`) with the catalog: one `backup`
   record per policy and target (`backup.<policy id>.<target>`), one `drill` record per policy
   and target when the policy has a `drillSchedule` (`drill.<policy id>.<target>`); records of
   policies or targets that are gone are removed. The settings-based Foundry DB schedule
   (NEST_BACKUP_FOUNDRY_SCHEDULE, key `foundry`) exists only while no policy does. A record's
   `lastRun` survives restarts and cron changes.
2. **Emits** what is due, with the catch-up rule of `libs.common.cron.plan_run` (however many
   firings were missed, one run): a backup record publishes a `RunBackup` whose Nats-Msg-Id is
   derived from policy, target and firing time, then advances `lastRun` by compare-and-set; a
   drill record advances `lastRun` first and, if this replica won, starts the drill.
3. **Checks the RPO** of every policy's target (`nest_backup_rpo`): when more than the policy's
   RPO has passed since the last success (or since the target was first seen), `RpoMissed` is
   published once per RPO period (its Nats-Msg-Id names the period), until a success.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from libs.common.bus import Bus
from libs.common.contract import envelope_for
from libs.common.contract.backup import RpoMissed, RunBackup
from libs.common.cron import CronError, CronSchedule, latest_due, plan_run
from services.backup.catalog import Catalog, PolicyEntry
from services.backup.schedules.policies import (
    FOUNDRY_TARGET,
    PolicyTarget,
    plan_targets,
    rpo_of,
    rpo_period_due,
)
from services.backup.schedules.records import ScheduleRecord, Schedules
from services.backup.schedules.rpo import RpoBook, RpoRecord

log = logging.getLogger(__name__)

STAMP = "%Y%m%dT%H%M%SZ"
StartDrill = Callable[[ScheduleRecord], Awaitable[None]]
"""Start the drill of a drill record (returns once started, not when done)."""


def _schedule_fields(record: ScheduleRecord) -> tuple[object, ...]:
    return (record.cron, record.kind, record.cluster_id, record.kubernetes_version)


class Scheduler:
    """Schedules from policies (and the settings' Foundry DB schedule while there is none)."""

    def __init__(
        self,
        *,
        bus: Bus,
        source: str,
        catalog: Catalog,
        schedules: Schedules,
        rpo: RpoBook,
        foundry_cron: str,
        clock: Callable[[], datetime],
        start_drill: StartDrill,
    ) -> None:
        self.bus = bus
        self.source = source
        self.catalog = catalog
        self.schedules = schedules
        self.rpo = rpo
        self.foundry_cron = foundry_cron
        self.clock = clock
        self.start_drill = start_drill

    async def tick(self) -> list[str]:
        """Sync, emit what is due, check RPOs; returns the keys of the runs emitted."""
        now = self.clock()
        policies = await self.catalog.policies()
        clusters = await self.catalog.clusters()
        planned = {p.policy_id: plan_targets(p, clusters) for p in policies}
        await self.sync(self.desired(policies, planned))
        emitted = await self.emit(now)
        await self.check_rpo(now, policies, planned)
        return emitted

    def desired(
        self, policies: list[PolicyEntry], planned: dict[str, list[PolicyTarget]]
    ) -> dict[str, ScheduleRecord]:
        wanted: dict[str, ScheduleRecord] = {}
        if not policies:
            wanted[FOUNDRY_TARGET] = ScheduleRecord(
                target=FOUNDRY_TARGET, kind="foundry", cron=self.foundry_cron
            )
        for policy in policies:
            assert policy.spec is not None
            for target in planned[policy.policy_id]:
                crons = [("backup", policy.spec.schedule)]
                if policy.spec.drill_schedule:
                    crons.append(("drill", policy.spec.drill_schedule))
                for purpose, cron in crons:
                    key = f"{purpose}.{target.key}"
                    wanted[key] = ScheduleRecord(
                        target=target.target,
                        kind=target.kind,
                        cron=cron,
                        cluster_id=target.cluster_id,
                        kubernetes_version=target.kubernetes_version,
                        key=key,
                        policy_id=policy.policy_id,
                        purpose="drill" if purpose == "drill" else "backup",
                    )
        return wanted

    async def sync(self, wanted: dict[str, ScheduleRecord]) -> None:
        held = {
            record.record_key: (record, revision) for record, revision in await self.schedules.all()
        }
        for key, (record, revision) in held.items():
            if key in wanted:
                fresh = wanted[key]
                if _schedule_fields(record) != _schedule_fields(fresh):
                    fresh.last_run = record.last_run
                    await self.schedules.put(fresh, revision)
            elif record.policy_id is not None or key == FOUNDRY_TARGET:
                # A policy's target that is gone, or the settings' schedule now that policies
                # exist. Schedules written by hand (no policy) are left alone.
                await self.schedules.delete(key)
                log.info("schedule removed", extra={"schedule": key})
        for key, fresh in wanted.items():
            if key not in held and await self.schedules.put(fresh, None):
                log.info("schedule added", extra={"schedule": key, "cron": fresh.cron})

    async def emit(self, now: datetime) -> list[str]:
        emitted: list[str] = []
        for record, revision in await self.schedules.all():
            try:
                schedule = CronSchedule.parse(record.cron)
            except CronError as exc:
                log.warning("bad schedule", extra={"target": record.target, "error": str(exc)})
                continue
            if record.last_run is None:
                # A new schedule waits for its first firing time instead of running now.
                record.last_run = now
                await self.schedules.put(record, revision)
                continue
            decision = plan_run(schedule, record.last_run, now)
            if not decision.run_now:
                continue
            due = latest_due(schedule, record.last_run, now) or now
            if decision.missed > 1:
                log.info(
                    "missed scheduled runs collapsed into one catch-up run",
                    extra={"schedule": record.record_key, "missed": decision.missed},
                )
            if record.purpose == "drill":
                record.last_run = due
                if await self.schedules.put(record, revision):
                    await self.start_drill(record)
                    emitted.append(record.record_key)
                continue
            intent = RunBackup(
                target=record.target,
                kind=record.kind,
                cluster_id=record.cluster_id,
                kubernetes_version=record.kubernetes_version,
                trigger="schedule",
                scheduled_for=due,
                policy_id=record.policy_id,
            )
            subject, envelope = envelope_for(intent, source=self.source, subject=record.target)
            stamp = due.strftime(STAMP)
            envelope.id = (
                f"backup-schedule-{record.policy_id}-{record.target}-{stamp}"
                if record.policy_id
                else f"backup-schedule-{record.target}-{stamp}"
            )
            await self.bus.publish_envelope(subject, envelope)
            record.last_run = due
            if await self.schedules.put(record, revision):
                emitted.append(record.record_key)
        return emitted

    async def check_rpo(
        self, now: datetime, policies: list[PolicyEntry], planned: dict[str, list[PolicyTarget]]
    ) -> list[RpoMissed]:
        published: list[RpoMissed] = []
        live: set[str] = set()
        for policy in policies:
            assert policy.spec is not None
            try:
                rpo = rpo_of(policy.spec)
            except CronError:
                continue
            for target in planned[policy.policy_id]:
                live.add(target.key)
                held = await self.rpo.get(target.key)
                if held is None:
                    await self.rpo.put(
                        RpoRecord(policy_id=policy.policy_id, target=target.target, first_seen=now),
                        None,
                    )
                    continue
                record, revision = held
                period = rpo_period_due(
                    now, record.reference, rpo, record.reported_reference, record.reported_period
                )
                if period is None:
                    continue
                missed = RpoMissed(
                    policy_id=policy.policy_id,
                    target=target.target,
                    kind=target.kind,
                    cluster_id=target.cluster_id,
                    rpo_seconds=int(rpo.total_seconds()),
                    last_success_at=record.last_success,
                    detected_at=now,
                )
                subject, envelope = envelope_for(missed, source=self.source, subject=target.target)
                envelope.id = (
                    f"rpo-{policy.policy_id}-{target.target}-"
                    f"{record.reference.strftime(STAMP)}-{period}"
                )
                await self.bus.publish_envelope(subject, envelope)
                record.reported_reference = record.reference
                record.reported_period = period
                await self.rpo.put(record, revision)
                published.append(missed)
                log.warning(
                    "no successful backup within the RPO",
                    extra={"policyId": policy.policy_id, "target": target.target, "period": period},
                )
        for key in await self.rpo.keys():
            if key not in live:
                await self.rpo.delete(key)
        return published
