"""Conditions and phase from an observation, and what counts as a transition."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from libs.common.contract.cluster import ClusterSpec
from services.provisioner import status
from services.provisioner.status import Observation, build_status, fingerprint, phase_of

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def all_true(**kwargs: object) -> Observation:
    observation = Observation("c-1", 3, **kwargs)  # type: ignore[arg-type]
    for type_ in status.CONDITION_TYPES:
        observation.set(type_, True, "Fine")
    return observation


def test_all_true_is_ready() -> None:
    assert phase_of(all_true()) == ("Ready", "", "")


def test_the_first_false_condition_explains_provisioning() -> None:
    observation = all_true()
    observation.set(status.DATASTORE, False, "WaitingForMembers", "1/3 etcd members ready")
    observation.set(status.ADDONS, False, "WaitingForControlPlane", "later")
    assert phase_of(observation) == ("Provisioning", "WaitingForMembers", "1/3 etcd members ready")


def test_a_loss_after_ready_is_degraded_and_a_rollout_is_upgrading() -> None:
    observation = all_true(was_ready=True)
    observation.set(status.CONTROL_PLANE, False, "RollingOut", "1/2 updated")
    assert phase_of(observation)[0] == "Degraded"
    observation.upgrading = True
    assert phase_of(observation) == ("Upgrading", "Upgrading", "1/2 updated")


def test_a_change_rolling_out_on_a_ready_cluster_is_provisioning_unless_something_is_lost() -> None:
    # A scale or an add-on toggle: the control plane rolls out (and the add-ons wait for it)
    # while it keeps every replica it had.
    observation = all_true(was_ready=True)
    observation.set(status.CONTROL_PLANE, False, "RollingOut", "1/3 updated, 1/3 available")
    observation.set(status.ADDONS, False, "WaitingForControlPlane", "later")
    observation.changing |= {status.CONTROL_PLANE, status.ADDONS}
    assert phase_of(observation) == ("Provisioning", "RollingOut", "1/3 updated, 1/3 available")
    # An etcd member gone meanwhile is a loss, whatever else rolls out.
    observation.set(status.DATASTORE, False, "WaitingForMembers", "1/3 etcd members ready")
    assert phase_of(observation) == ("Degraded", "WaitingForMembers", "1/3 etcd members ready")
    # So is a management API that stops answering: nothing can be seen or healed.
    unreachable = Observation("c-1", 3, was_ready=True)
    unreachable.set(status.MANAGEMENT, False, "Unavailable", "down")
    unreachable.unknown_from(status.PKI, "ManagementClusterUnavailable", "waiting")
    assert phase_of(unreachable)[:2] == ("Degraded", "Unavailable")


def test_a_ready_spec_is_the_capacity_a_loss_is_measured_against() -> None:
    spec = ClusterSpec.model_validate(
        {"controlPlane": {"replicas": 3}, "network": {"serviceType": "NodePort"}}
    )
    assert status.Capacity.of(spec) == status.Capacity(3, 3, "NodePort")


def test_failures_win_and_no_management_cluster_is_pending() -> None:
    observation = all_true()
    observation.failure = ("UpgradeRefused", "skips a minor")
    assert phase_of(observation) == ("Failed", "UpgradeRefused", "skips a minor")
    waiting = Observation("c-1", 1, not_configured=True)
    waiting.set(status.MANAGEMENT, False, "NotConfigured", "set NEST_KUBECONFIG")
    waiting.unknown_from(status.PKI, "ManagementClusterUnavailable", "waiting")
    assert phase_of(waiting) == ("Pending", "NotConfigured", "set NEST_KUBECONFIG")
    event = build_status(waiting, [], NOW)
    assert [c.status for c in event.conditions] == ["False"] + ["Unknown"] * 5


def test_transition_times_move_only_when_the_status_does() -> None:
    first = build_status(all_true(), [], NOW)
    later = NOW + timedelta(minutes=5)
    observation = all_true()
    observation.set(status.ADDONS, False, "TenantAPIUnavailable", "down")
    second = build_status(observation, first.conditions, later)
    times = {c.type: c.last_transition_time for c in second.conditions}
    assert times[status.ADDONS] == later
    assert times[status.PKI] == NOW
    assert fingerprint(first) != fingerprint(second)
    assert fingerprint(build_status(all_true(), second.conditions, later)) == fingerprint(first)
