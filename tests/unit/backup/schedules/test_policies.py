"""Policies as pure functions: the default RPO, which period to report, targets per policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from libs.common.contract.backup_policy import BackupPolicySpec
from libs.common.cron import CronSchedule, longest_interval
from services.backup.catalog import ClusterEntry, PolicyEntry
from services.backup.schedules.policies import plan_targets, retention_of, rpo_of, rpo_period_due

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def spec(**values: object) -> BackupPolicySpec:
    return BackupPolicySpec.model_validate(
        {"schedule": "0 * * * *", "targets": {"foundry": True}, "locationId": "l", **values}
    )


@pytest.mark.parametrize(
    ("expression", "longest"),
    [
        ("0 * * * *", timedelta(hours=1)),
        ("*/5 * * * *", timedelta(minutes=5)),
        ("15,45 * * * *", timedelta(minutes=30)),
        ("0 0,6 * * *", timedelta(hours=18)),
        ("0 9-17 * * 1-5", timedelta(days=2, hours=16)),  # Friday 17:00 -> Monday 09:00
        ("0 3 * * 0", timedelta(days=7)),
        ("@monthly", timedelta(days=31)),
        ("0 0 29 2 *", timedelta(days=4 * 365 + 1)),
        ("0 0 1 1 *", timedelta(days=366)),
    ],
)
def test_longest_interval_between_firings(expression: str, longest: timedelta) -> None:
    assert longest_interval(expression) == longest
    assert CronSchedule.parse(expression).longest_interval() == longest


def test_default_rpo_is_twice_the_longest_interval_and_rpo_minutes_wins() -> None:
    assert rpo_of(spec()) == timedelta(hours=2)
    assert rpo_of(spec(schedule="0 9-17 * * 1-5")) == timedelta(days=5, hours=8)
    assert rpo_of(spec(schedule="@daily", rpoMinutes=90)) == timedelta(minutes=90)


def test_each_rpo_period_is_reported_once_and_a_success_starts_over() -> None:
    rpo = timedelta(hours=2)
    assert rpo_period_due(T0 + timedelta(hours=2), T0, rpo, None, 0) is None
    assert rpo_period_due(T0 + timedelta(hours=2, seconds=1), T0, rpo, None, 0) == 1
    assert rpo_period_due(T0 + timedelta(hours=3), T0, rpo, T0, 1) is None
    assert rpo_period_due(T0 + timedelta(hours=4, minutes=1), T0, rpo, T0, 1) == 2
    assert rpo_period_due(T0 + timedelta(hours=9), T0, rpo, T0, 2) == 4  # missed ticks: newest
    success = T0 + timedelta(hours=5)
    assert rpo_period_due(T0 + timedelta(hours=6), success, rpo, T0, 4) is None
    assert rpo_period_due(T0 + timedelta(hours=7, minutes=1), success, rpo, T0, 4) == 1


def test_targets_follow_known_clusters_and_skip_deleted_ones() -> None:
    clusters = [
        ClusterEntry(cluster_id="c1", name="alpha", generation=1, kubernetes_version="1.31.4"),
        ClusterEntry(cluster_id="c2", name="beta", generation=3, deletion_requested=True),
        ClusterEntry(cluster_id="c3", name="gamma", generation=1, deleted=True),
        ClusterEntry(cluster_id="c4", name="delta", generation=2),
    ]
    every = PolicyEntry(
        policy_id="p", generation=1, spec=spec(targets={"foundry": True, "allClusters": True})
    )
    assert [(t.key, t.kind, t.cluster_id) for t in plan_targets(every, clusters)] == [
        ("p.foundry", "foundry", None),
        ("p.cluster-alpha", "etcd", "c1"),
        ("p.cluster-delta", "etcd", "c4"),
    ]
    assert plan_targets(every, clusters)[1].kubernetes_version == "1.31.4"
    named = PolicyEntry(
        policy_id="q",
        generation=1,
        spec=spec(targets={"clusterIds": ["c4", "c2", "unknown", "c4"]}),
    )
    assert [t.target for t in plan_targets(named, clusters)] == ["cluster-delta"]


def test_retention_of_a_policy() -> None:
    policy = retention_of(spec(retention={"keepLast": 24, "keepDays": 7}))
    assert (policy.keep_last, policy.keep_days) == (24, 7)
    assert retention_of(spec()).keeps_everything
