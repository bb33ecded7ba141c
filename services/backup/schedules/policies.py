"""What backup policies ask for, as pure functions: targets, schedule keys, RPO, run settings.

- `plan_targets`: one target per policy and (the Foundry DB; each known cluster that is not being
  deleted, for `allClusters`; the named ones that are known and not being deleted, otherwise).
- `rpo_of`: the policy's recovery point objective: `rpoMinutes`, or twice the longest interval
  between two consecutive firings of its schedule (a schedule may fire unevenly, e.g. weekdays
  only, so its average interval would raise false alarms every weekend).
- `rpo_period_due`: which RPO period (1, 2, ...) is missed now and not yet reported.
- `retention_of`: the policy's retention as the retention module takes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from libs.common.contract.backup import BackupKind
from libs.common.contract.backup_policy import BackupPolicySpec
from libs.common.cron import longest_interval
from services.backup.catalog import ClusterEntry, PolicyEntry
from services.backup.snapshots.retention import RetentionPolicy

FOUNDRY_TARGET = "foundry"


@dataclass(frozen=True)
class PolicyTarget:
    """One target a policy backs up."""

    policy_id: str
    target: str
    kind: BackupKind
    cluster_id: str | None = None
    kubernetes_version: str | None = None

    @property
    def key(self) -> str:
        """`<policy id>.<target>`: unique per policy and target, a valid KV key."""
        return f"{self.policy_id}.{self.target}"


def plan_targets(policy: PolicyEntry, clusters: Iterable[ClusterEntry]) -> list[PolicyTarget]:
    spec = policy.spec
    if spec is None:
        return []
    planned: list[PolicyTarget] = []
    if spec.targets.foundry:
        planned.append(PolicyTarget(policy.policy_id, FOUNDRY_TARGET, "foundry"))
    live = {c.cluster_id: c for c in clusters if not (c.deleted or c.deletion_requested) and c.name}
    chosen = (
        sorted(live.values(), key=lambda c: c.name)
        if spec.targets.all_clusters
        else [live[i] for i in dict.fromkeys(spec.targets.cluster_ids) if i in live]
    )
    for cluster in chosen:
        planned.append(
            PolicyTarget(
                policy.policy_id,
                cluster.target,
                "etcd",
                cluster_id=cluster.cluster_id,
                kubernetes_version=cluster.kubernetes_version,
            )
        )
    return planned


def rpo_of(spec: BackupPolicySpec) -> timedelta:
    if spec.rpo_minutes is not None:
        return timedelta(minutes=spec.rpo_minutes)
    return 2 * longest_interval(spec.schedule)


def rpo_period_due(
    now: datetime,
    reference: datetime,
    rpo: timedelta,
    reported_reference: datetime | None,
    reported_period: int,
) -> int | None:
    """The RPO period to report now, or None.

    `reference` is the last success (or when the target was first seen). Period k is missed
    once more than k * rpo has passed since it; each period is reported once, and a new
    reference (a success) starts the count again."""
    elapsed = now - reference
    if rpo <= timedelta(0) or elapsed <= rpo:
        return None
    period = int(elapsed / rpo)
    if reported_reference == reference and reported_period >= period:
        return None
    return period


def retention_of(spec: BackupPolicySpec) -> RetentionPolicy:
    return RetentionPolicy(keep_last=spec.retention.keep_last, keep_days=spec.retention.keep_days)
