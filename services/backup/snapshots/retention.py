"""Which backups to delete: a pure function of the backups, a policy and the current time.

A policy has two optional rules, applied per target; a backup survives if ANY rule keeps it:

- `keep_last`: the N most recent backups;
- `keep_days`: every backup younger than D days.

With neither rule set nothing is deleted. Whatever the policy, the newest *verified* backup of
each target is always kept — a policy cannot leave a target with nothing known to restore.
Incomplete backups (no manifest) are not retention's business: `artifacts.cleanup_incomplete`
removes those.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from services.backup.stores.layout import BackupRef


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep the last `keep_last` and/or everything younger than `keep_days`; None = rule off."""

    keep_last: int | None = None
    keep_days: float | None = None

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 0:
            raise ValueError("keep_last must be at least 0")
        if self.keep_days is not None and self.keep_days < 0:
            raise ValueError("keep_days must be at least 0")

    @property
    def keeps_everything(self) -> bool:
        return self.keep_last is None and self.keep_days is None


@dataclass(frozen=True)
class Candidate:
    """A complete backup as retention sees it."""

    ref: BackupRef
    verified: bool


@dataclass(frozen=True)
class RetentionPlan:
    """The decision, each kept backup with the reasons it was kept."""

    keep: dict[BackupRef, tuple[str, ...]] = field(default_factory=dict)
    delete: tuple[BackupRef, ...] = ()


def plan(candidates: Iterable[Candidate], policy: RetentionPolicy, now: datetime) -> RetentionPlan:
    """Split `candidates` into kept (with reasons) and deleted, oldest deletion first."""
    by_target: dict[str, list[Candidate]] = defaultdict(list)
    for candidate in candidates:
        by_target[candidate.ref.target].append(candidate)
    keep: dict[BackupRef, tuple[str, ...]] = {}
    delete: list[BackupRef] = []
    cutoff = None if policy.keep_days is None else now - timedelta(days=policy.keep_days)
    for target in sorted(by_target):
        newest_first = sorted(by_target[target], key=lambda c: c.ref, reverse=True)
        newest_verified = next((c.ref for c in newest_first if c.verified), None)
        for position, candidate in enumerate(newest_first):
            reasons: list[str] = []
            if policy.keeps_everything:
                reasons.append("no retention policy")
            if policy.keep_last is not None and position < policy.keep_last:
                reasons.append(f"among the last {policy.keep_last}")
            if cutoff is not None and candidate.ref.created > cutoff:
                reasons.append(f"younger than {policy.keep_days:g} days")
            if candidate.ref == newest_verified:
                reasons.append("newest verified backup")
            if reasons:
                keep[candidate.ref] = tuple(reasons)
            else:
                delete.append(candidate.ref)
    return RetentionPlan(keep=keep, delete=tuple(sorted(delete, key=lambda r: r.created)))
