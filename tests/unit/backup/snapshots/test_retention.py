"""Retention selection: explicit cases and properties that must hold for any input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.backup.snapshots.retention import Candidate, RetentionPolicy, plan
from services.backup.stores.layout import BackupRef

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def backup(target: str, days_ago: float, verified: bool = True, backup_id: str = "") -> Candidate:
    created = (NOW - timedelta(days=days_ago)).replace(microsecond=0)
    return Candidate(
        BackupRef(target, created, backup_id or f"{int(days_ago * 1000):08x}"), verified
    )


def test_no_policy_keeps_everything() -> None:
    items = [backup("a", d) for d in range(10)]
    result = plan(items, RetentionPolicy(), NOW)
    assert result.delete == ()
    assert set(result.keep) == {c.ref for c in items}


def test_keep_last_per_target() -> None:
    items = [backup("a", d) for d in range(5)] + [backup("b", d) for d in range(3)]
    result = plan(items, RetentionPolicy(keep_last=2), NOW)
    kept = sorted((r.target, (NOW - r.created).days) for r in result.keep)
    assert kept == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert [(NOW - r.created).days for r in result.delete if r.target == "a"] == [4, 3, 2]


def test_keep_days_or_last_whichever_keeps_more() -> None:
    items = [backup("a", d) for d in (0.5, 1.5, 2.5, 10, 20)]
    result = plan(items, RetentionPolicy(keep_last=1, keep_days=3), NOW)
    assert len(result.keep) == 3
    assert {(NOW - r.created).days for r in result.delete} == {10, 20}


def test_newest_verified_survives_even_keep_last_zero() -> None:
    items = [backup("a", 0, verified=False), backup("a", 1), backup("a", 2)]
    result = plan(items, RetentionPolicy(keep_last=0, keep_days=0), NOW)
    assert list(result.keep) == [items[1].ref]
    assert result.keep[items[1].ref] == ("newest verified backup",)


def test_old_verified_backup_survives_a_tight_age_limit() -> None:
    items = [backup("a", 100), backup("a", 1, verified=False)]
    result = plan(items, RetentionPolicy(keep_days=7), NOW)
    assert set(result.keep) == {items[0].ref, items[1].ref}


def test_policy_refuses_negative_values() -> None:
    with pytest.raises(ValueError, match="keep_last"):
        RetentionPolicy(keep_last=-1)
    with pytest.raises(ValueError, match="keep_days"):
        RetentionPolicy(keep_days=-0.5)


candidates = st.lists(
    st.builds(
        backup,
        target=st.sampled_from(["a", "b", "c"]),
        days_ago=st.floats(-2, 400, allow_nan=False),
        verified=st.booleans(),
        backup_id=st.text("0123456789abcdef", min_size=8, max_size=8),
    ),
    max_size=40,
    unique_by=lambda c: c.ref,
)
policies = st.builds(
    RetentionPolicy,
    keep_last=st.none() | st.integers(0, 10),
    keep_days=st.none() | st.floats(0, 365, allow_nan=False),
)


@given(items=candidates, policy=policies)
def test_properties(items: list[Candidate], policy: RetentionPolicy) -> None:
    result = plan(items, policy, NOW)
    refs = {c.ref for c in items}
    deleted = set(result.delete)
    # A partition of the input.
    assert deleted.isdisjoint(result.keep)
    assert deleted | set(result.keep) == refs
    for target in {c.ref.target for c in items}:
        mine = sorted((c for c in items if c.ref.target == target), key=lambda c: c.ref)
        # The newest verified backup of every target is never deleted.
        verified = [c.ref for c in mine if c.verified]
        if verified:
            assert verified[-1] not in deleted
        # The last N are kept.
        if policy.keep_last:
            assert not deleted & {c.ref for c in mine[-policy.keep_last :]}
        # Everything younger than D days is kept.
        if policy.keep_days is not None:
            cutoff = NOW - timedelta(days=policy.keep_days)
            assert not deleted & {c.ref for c in mine if c.ref.created > cutoff}
    # Nothing is deleted without a policy; nothing kept has no reason.
    if policy.keeps_everything:
        assert not deleted
    assert all(result.keep.values())
