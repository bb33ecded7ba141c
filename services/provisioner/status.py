"""Conditions and phase of a cluster, from what one reconcile pass observed. Pure functions.

Condition types, all reported on every status event:

- `ManagementClusterAvailable`: the management cluster's API answers.
- `PKIReady`: every certificate Secret exists and is current.
- `DatastoreReady`: the etcd StatefulSet has every member ready on the current revision.
- `ControlPlaneReady`: the control-plane Deployment rolled out with every replica available.
- `EndpointReady`: the endpoint Service has an address clients can reach.
- `AddonsReady`: the tenant API answers and Nest's tenant objects are applied.

The phase sums them up: `Ready` when all hold, `Upgrading` while a version change rolls out,
`Degraded` when a cluster that was Ready lost something it had, `Failed` for what needs a new
spec, `Pending` while no management cluster is configured, `Provisioning` otherwise, including
a Ready cluster rolling out a change (a scale, an add-on toggle, a renewed certificate) with
nothing lost: the conditions that only such a change holds back are `Observation.changing`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from libs.common.contract.cluster import (
    ClusterEndpoint,
    ClusterSpec,
    ClusterStatusChanged,
    Condition,
    ConditionStatus,
    Phase,
)

MANAGEMENT = "ManagementClusterAvailable"
PKI = "PKIReady"
DATASTORE = "DatastoreReady"
CONTROL_PLANE = "ControlPlaneReady"
ENDPOINT = "EndpointReady"
ADDONS = "AddonsReady"
CONDITION_TYPES: tuple[str, ...] = (MANAGEMENT, PKI, DATASTORE, CONTROL_PLANE, ENDPOINT, ADDONS)


@dataclass(frozen=True)
class Check:
    """One condition as observed now, without its transition time."""

    type: str
    status: ConditionStatus
    reason: str
    message: str = ""


@dataclass(frozen=True)
class Capacity:
    """What a cluster had when it was last Ready, the baseline against which a loss is told
    from a change rolling out: every replica and member of that spec was available."""

    control_plane: int
    """Control-plane replicas available."""
    datastore: int
    """etcd members ready."""
    service_type: str
    """The endpoint Service's type (a new type needs a new address, which is no loss)."""

    @classmethod
    def of(cls, spec: ClusterSpec) -> Capacity:
        return cls(
            control_plane=spec.control_plane.replicas,
            datastore=spec.datastore.replicas,
            service_type=spec.network.service_type,
        )


@dataclass
class Observation:
    """What a reconcile pass found; `build_status` turns it into an event."""

    cluster_id: str
    generation: int
    checks: dict[str, Check] = field(default_factory=dict)
    endpoint: ClusterEndpoint | None = None
    upgrading: bool = False
    """A version change is rolling out."""
    failure: tuple[str, str] | None = None
    """(reason, message) of a failure that needs a new spec, e.g. UpgradeRefused."""
    was_ready: bool = False
    """The cluster has been Ready before (a loss is Degraded, not Provisioning)."""
    not_configured: bool = False
    """No management cluster is configured at all."""
    changing: set[str] = field(default_factory=set)
    """Conditions that are not true only because a change is rolling out while the cluster
    keeps what it had (its `Capacity` when last Ready): on a cluster that was Ready they make
    it `Provisioning`, not `Degraded`."""

    def set(self, type_: str, ok: bool | None, reason: str, message: str = "") -> None:
        status: ConditionStatus = "Unknown" if ok is None else ("True" if ok else "False")
        self.checks[type_] = Check(type_, status, reason, message)

    def unknown_from(self, start: str, reason: str, message: str) -> None:
        """Mark `start` and every later condition not yet observed as Unknown."""
        for type_ in CONDITION_TYPES[CONDITION_TYPES.index(start) :]:
            if type_ not in self.checks:
                self.set(type_, None, reason, message)

    @property
    def all_true(self) -> bool:
        return all(
            self.checks.get(t, Check(t, "Unknown", "")).status == "True" for t in CONDITION_TYPES
        )


def phase_of(observation: Observation) -> tuple[Phase, str, str]:
    """(phase, reason, message) for `observation`."""
    if observation.failure is not None:
        reason, message = observation.failure
        return "Failed", reason, message
    if observation.not_configured:
        check = observation.checks[MANAGEMENT]
        return "Pending", check.reason, check.message
    if observation.all_true:
        return "Ready", "", ""
    first = _first_not_true(observation)
    if observation.upgrading:
        return "Upgrading", "Upgrading", first.message if first else ""
    if observation.was_ready:
        lost = _first_not_true(observation, skip=observation.changing)
        if lost is not None:
            return "Degraded", lost.reason, lost.message
    reason, message = (first.reason, first.message) if first else ("", "")
    return "Provisioning", reason, message


def _first_not_true(observation: Observation, skip: set[str] | None = None) -> Check | None:
    for type_ in CONDITION_TYPES:
        check = observation.checks.get(type_)
        if check is not None and check.status != "True" and type_ not in (skip or ()):
            return check
    return None


def build_status(
    observation: Observation,
    previous: Sequence[Condition],
    now: datetime,
) -> ClusterStatusChanged:
    """The event for `observation`; a condition keeps its transition time while its status does."""
    before = {condition.type: condition for condition in previous}
    conditions: list[Condition] = []
    for type_ in CONDITION_TYPES:
        check = observation.checks.get(type_) or Check(type_, "Unknown", "NotObserved")
        old = before.get(type_)
        since = old.last_transition_time if old is not None and old.status == check.status else now
        conditions.append(
            Condition(
                type=type_,
                status=check.status,
                reason=check.reason,
                message=check.message,
                last_transition_time=since,
            )
        )
    phase, reason, message = phase_of(observation)
    return ClusterStatusChanged(
        cluster_id=observation.cluster_id,
        observed_generation=observation.generation,
        phase=phase,
        reason=reason,
        message=message,
        conditions=conditions,
        endpoint=observation.endpoint,
    )


def fingerprint(event: ClusterStatusChanged) -> tuple[object, ...]:
    """What makes two status events different for a reader (transition times excluded)."""
    return (
        event.observed_generation,
        event.phase,
        event.reason,
        event.message,
        tuple((c.type, c.status, c.reason, c.message) for c in event.conditions),
        None if event.endpoint is None else (event.endpoint.host, event.endpoint.port),
    )
