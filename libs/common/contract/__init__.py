"""The event contract: every intent and event type, its subject and its payload model.

`MESSAGES` is the single registry: the bus validates payloads against it, the API generates its
AsyncAPI document from it, and a test checks that nothing is published outside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from pydantic import BaseModel

from libs.common.contract.backup import (
    BackupCompleted,
    BackupFailed,
    BackupStarted,
    DrillFailed,
    DrillPassed,
    RpoMissed,
    RunBackup,
)
from libs.common.contract.backup_policy import (
    ApplyBackupLocation,
    ApplyBackupPolicy,
    DeleteBackupLocation,
    DeleteBackupPolicy,
)
from libs.common.contract.base import WireModel
from libs.common.contract.cluster import (
    ClusterDeclared,
    ClusterDeleted,
    ClusterStatusChanged,
    DeleteCluster,
    ReconcileCluster,
)
from libs.common.contract.envelope import Envelope
from libs.common.contract.restore import PrepareRestore, RestoreEtcd, RestoreProgressed
from libs.common.contract.rpc import RpcMethod

INTENTS_STREAM = "NEST_INTENTS"
EVENTS_STREAM = "NEST_EVENTS"
DLQ_STREAM = "NEST_DLQ"


def intent_subject(service: str, verb: str) -> str:
    return f"nest.intent.{service}.{verb}"


def event_subject(domain: str, name: str) -> str:
    return f"nest.event.{domain}.{name}"


def rpc_subject(service: str, method: str) -> str:
    return f"nest.rpc.{service}.{method}"


def heartbeat_subject(service: str, instance: str) -> str:
    return f"nest.heartbeat.{service}.{instance}"


def dlq_subject(service: str) -> str:
    return f"nest.dlq.{service}"


PayloadType: TypeAlias = type[WireModel]


@dataclass(frozen=True)
class MessageType:
    """One entry of the contract."""

    type: str
    subject: str
    kind: Literal["intent", "event"]
    payload: PayloadType
    summary: str


MESSAGES: tuple[MessageType, ...] = (
    MessageType(
        type="io.nest.cluster.reconcile.v1",
        subject=intent_subject("provisioner", "reconcile"),
        kind="intent",
        payload=ReconcileCluster,
        summary="Bring a hosted control plane to the desired spec and generation.",
    ),
    MessageType(
        type="io.nest.cluster.delete.v1",
        subject=intent_subject("provisioner", "delete"),
        kind="intent",
        payload=DeleteCluster,
        summary="Remove everything Nest created for a cluster.",
    ),
    MessageType(
        type="io.nest.cluster.status_changed.v1",
        subject=event_subject("cluster", "status_changed"),
        kind="event",
        payload=ClusterStatusChanged,
        summary="The observed status of a cluster changed.",
    ),
    MessageType(
        type="io.nest.cluster.deleted.v1",
        subject=event_subject("cluster", "deleted"),
        kind="event",
        payload=ClusterDeleted,
        summary="A cluster and everything Nest created for it are gone.",
    ),
    MessageType(
        type="io.nest.backup.run.v1",
        subject=intent_subject("backup", "run"),
        kind="intent",
        payload=RunBackup,
        summary="Take one backup of a target (the Foundry DB or a cluster's etcd) now.",
    ),
    MessageType(
        type="io.nest.backup.started.v1",
        subject=event_subject("backup", "started"),
        kind="event",
        payload=BackupStarted,
        summary="A backup run began.",
    ),
    MessageType(
        type="io.nest.backup.completed.v1",
        subject=event_subject("backup", "completed"),
        kind="event",
        payload=BackupCompleted,
        summary="A backup is stored and verified; retention may have pruned older ones.",
    ),
    MessageType(
        type="io.nest.backup.failed.v1",
        subject=event_subject("backup", "failed"),
        kind="event",
        payload=BackupFailed,
        summary="A backup run failed; no incomplete backup is listed.",
    ),
    MessageType(
        type="io.nest.backup.drill_passed.v1",
        subject=event_subject("backup", "drill_passed"),
        kind="event",
        payload=DrillPassed,
        summary="A restore drill of a target's newest backup into scratch checked out.",
    ),
    MessageType(
        type="io.nest.backup.drill_failed.v1",
        subject=event_subject("backup", "drill_failed"),
        kind="event",
        payload=DrillFailed,
        summary="A restore drill failed: the newest backup would not restore as recorded.",
    ),
    MessageType(
        type="io.nest.backup.rpo_missed.v1",
        subject=event_subject("backup", "rpo_missed"),
        kind="event",
        payload=RpoMissed,
        summary="No successful backup of a target within its policy's recovery point objective.",
    ),
    MessageType(
        type="io.nest.backup.policy_apply.v1",
        subject=intent_subject("backup", "policy_apply"),
        kind="intent",
        payload=ApplyBackupPolicy,
        summary="Create or replace a backup policy in the backup service's copy.",
    ),
    MessageType(
        type="io.nest.backup.policy_delete.v1",
        subject=intent_subject("backup", "policy_delete"),
        kind="intent",
        payload=DeleteBackupPolicy,
        summary="Forget a backup policy (its backups stay).",
    ),
    MessageType(
        type="io.nest.backup.location_apply.v1",
        subject=intent_subject("backup", "location_apply"),
        kind="intent",
        payload=ApplyBackupLocation,
        summary="Create or replace a backup location (secret sealed) in the backup service's copy.",
    ),
    MessageType(
        type="io.nest.backup.location_delete.v1",
        subject=intent_subject("backup", "location_delete"),
        kind="intent",
        payload=DeleteBackupLocation,
        summary="Forget a backup location.",
    ),
    MessageType(
        type="io.nest.cluster.declared.v1",
        subject=event_subject("cluster", "declared"),
        kind="event",
        payload=ClusterDeclared,
        summary="The API accepted a cluster or a change to it (name, version, labels).",
    ),
    MessageType(
        type="io.nest.restore.prepare.v1",
        subject=intent_subject("backup", "restore_prepare"),
        kind="intent",
        payload=PrepareRestore,
        summary="Fetch and verify a backup for a cluster restore, then hand it to the provisioner.",
    ),
    MessageType(
        type="io.nest.restore.etcd.v1",
        subject=intent_subject("provisioner", "restore"),
        kind="intent",
        payload=RestoreEtcd,
        summary="Restore a cluster's etcd members from a staged, verified snapshot.",
    ),
    MessageType(
        type="io.nest.restore.progressed.v1",
        subject=event_subject("restore", "progressed"),
        kind="event",
        payload=RestoreProgressed,
        summary="A cluster restore moved to a new phase (or failed, with a reason).",
    ),
)

BY_TYPE: dict[str, MessageType] = {m.type: m for m in MESSAGES}
BY_PAYLOAD: dict[type[BaseModel], MessageType] = {m.payload: m for m in MESSAGES}


class UnknownMessageType(ValueError):
    """An envelope whose type is not part of the contract."""


def envelope_for(
    payload: WireModel,
    *,
    source: str,
    subject: str | None = None,
    correlation_id: str | None = None,
) -> tuple[str, Envelope]:
    """Wrap a payload in its envelope and return it with the NATS subject it goes to."""
    entry = BY_PAYLOAD.get(type(payload))
    if entry is None:
        raise UnknownMessageType(f"{type(payload).__name__} is not part of the event contract")
    envelope = Envelope(
        source=f"/nest/{source}",
        type=entry.type,
        subject=subject,
        correlationid=correlation_id,
        data=payload.wire(),
    )
    return entry.subject, envelope


def parse_payload(envelope: Envelope) -> Any:
    """The typed payload of an envelope; raises UnknownMessageType or pydantic.ValidationError."""
    entry = BY_TYPE.get(envelope.type)
    if entry is None:
        raise UnknownMessageType(f"unknown event type {envelope.type!r}")
    return entry.payload.model_validate(envelope.data)


__all__ = [
    "DLQ_STREAM",
    "EVENTS_STREAM",
    "INTENTS_STREAM",
    "MESSAGES",
    "Envelope",
    "MessageType",
    "RpcMethod",
    "UnknownMessageType",
    "dlq_subject",
    "envelope_for",
    "event_subject",
    "heartbeat_subject",
    "intent_subject",
    "parse_payload",
    "rpc_subject",
]
