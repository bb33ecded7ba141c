"""The Foundry DB tables (SQLAlchemy 2 declarative). Queries live in each domain's repository."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.api.kit.clock import utcnow

__all__ = ["Base", "utcnow"]

JsonType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JsonType, datetime: UTCDateTime}


class Cluster(Base):
    """A hosted control plane: desired state (spec, generation) and projected status."""

    __tablename__ = "clusters"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deletion_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    phase: Mapped[str] = mapped_column(String(32), default="Pending")
    observed_generation: Mapped[int] = mapped_column(Integer, default=0)
    status_reason: Mapped[str] = mapped_column(String(128), default="")
    status_message: Mapped[str] = mapped_column(Text, default="")
    conditions: Mapped[list[dict[str, Any]]] = mapped_column(JsonType, default=list)
    endpoint: Mapped[dict[str, Any] | None] = mapped_column(JsonType, nullable=True)
    status_sequence: Mapped[int] = mapped_column(BigInteger, default=0)
    """The NEST_EVENTS stream sequence of the last status event applied (stale-event guard)."""
    version: Mapped[int] = mapped_column(Integer, default=1)
    """Bumped by every write of labels or spec (and by delete): the ETag."""

    __table_args__ = (Index("ix_clusters_created_at_id", "created_at", "id"),)


class OutboxMessage(Base):
    """An envelope committed with the write that caused it, waiting to be published."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    subject: Mapped[str] = mapped_column(String(255))
    envelope: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (Index("ix_outbox_pending", "sent_at", "id"),)


class ApiToken(Base):
    """A bearer token. Only its SHA-256 is stored; the token itself is shown once at creation."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63))
    labels: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    scope: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    display_prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(36), nullable=True)

    __table_args__ = (Index("ix_api_tokens_created_at_id", "created_at", "id"),)


class SystemFlag(Base):
    """One-time facts about this installation (e.g. the initial admin token was created)."""

    __tablename__ = "system_flags"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AuditEvent(Base):
    """Who did what, with which outcome. Never holds a request body or a secret."""

    __tablename__ = "audit_events"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    token_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    token_name: Mapped[str | None] = mapped_column(String(63), nullable=True)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    resource: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    correlation_id: Mapped[str | None] = mapped_column(String(128), nullable=True)

    __table_args__ = (
        Index("ix_audit_events_time_id", "time", "id"),
        Index("ix_audit_events_resource_time", "resource", "time"),
    )


class IdempotencyRecord(Base):
    """The first response to a POST carrying an Idempotency-Key, replayed for retries."""

    __tablename__ = "idempotency_records"

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    """SHA-256 of the caller's credentials: keys are scoped per token."""
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    body_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response_body: Mapped[str | None] = mapped_column(Text, nullable=True)
    response_headers: Mapped[dict[str, Any] | None] = mapped_column(JsonType, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_idempotency_expires_at", "expires_at"),)


class EventRecord(Base):
    """One event seen on NEST_EVENTS, stored whole: the history behind GET /events and SSE."""

    __tablename__ = "events"

    position: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    """Order of recording; rows become visible in this order (the SSE id and list cursor)."""
    id: Mapped[str] = mapped_column(String(255), unique=True)
    """The envelope id: a redelivered event is stored once."""
    type: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(255))
    subject: Mapped[str | None] = mapped_column(String(255), nullable=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    correlation_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    stream_sequence: Mapped[int] = mapped_column(BigInteger)
    envelope: Mapped[dict[str, Any]] = mapped_column(JsonType)
    """The CloudEvent exactly as received (every attribute, extensions included)."""
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        Index("ix_events_type_position", "type", "position"),
        Index("ix_events_subject_position", "subject", "position"),
        Index("ix_events_recorded_at", "recorded_at"),
        {"sqlite_autoincrement": True},
    )


class Webhook(Base):
    """A subscription: matching events are POSTed, signed, to `url`."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    url: Mapped[str] = mapped_column(String(2048))
    event_types: Mapped[list[str]] = mapped_column(JsonType, default=list)
    secret: Mapped[str | None] = mapped_column(String(256), nullable=True)
    """Legacy: a clear-text HMAC key from before 0008, sealed into `sealed_secret` (and this
    set to NULL) at the API's next start."""
    sealed_secret: Mapped[str | None] = mapped_column(Text, nullable=True)
    """The HMAC key sealed by libs.common.secrets (context `webhook:<id>`): opened only to sign
    a delivery; never returned after creation, never logged."""
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_delivery_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (Index("ix_webhooks_created_at_id", "created_at", "id"),)


class WebhookDelivery(Base):
    """One event owed to one webhook: the durable delivery queue, written with the event row."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    webhook_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("webhooks.id", ondelete="CASCADE")
    )
    event_position: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("events.position", ondelete="CASCADE"),
    )
    event_id: Mapped[str] = mapped_column(String(255))
    event_type: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    """pending, delivered or failed."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    """A replica attempts a delivery only while it holds an unexpired lease on the row."""
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    response_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_webhook_created", "webhook_id", "created_at", "id"),
        Index("ix_webhook_deliveries_event", "event_position"),
    )


class BackupLocation(Base):
    """Where backups may be stored: an S3 bucket or a local directory, checked when written."""

    __tablename__ = "backup_locations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    kind: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType)
    """The wire spec without the secret access key."""
    sealed_secret: Mapped[str | None] = mapped_column(Text, nullable=True)
    """The secret access key, sealed by libs.common.secrets; never returned, never logged."""
    generation: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_backup_locations_created_at_id", "created_at", "id"),)


class Backup(Base):
    """A backup as the API knows it, projected from backup events (never written by requests).

    `id` is the backup folder's name `<YYYYMMDDTHHMMSSZ>-<8 hex>`; `created_at` is the time in
    that name (the list order). Events may arrive in any order and more than once: `state` only
    moves forward (Running → Completed/Failed → Pruned) and figures are filled from whichever
    event carries them."""

    __tablename__ = "backups"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    ref: Mapped[str] = mapped_column(String(255))
    target: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    cluster_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    policy_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    location_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    trigger: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    pruned_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    stored_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    plaintext_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    stored_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    plaintext_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    encrypted: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    encryption_key_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    verified: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    etcd_revision: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    etcd_key_count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    kubernetes_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    duration_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str | None] = mapped_column(String(128), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_drill: Mapped[dict[str, Any] | None] = mapped_column(JsonType, nullable=True)
    """{at, passed, reason, message, figures} of the newest drill of this backup."""
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        Index("ix_backups_created_at_id", "created_at", "id"),
        Index("ix_backups_target_created_at", "target", "created_at"),
    )


class BackupPolicy(Base):
    """When, what, where to and how long to back up (the backup service schedules from a copy)."""

    __tablename__ = "backup_policies"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType)
    """The wire spec (libs.common.contract.backup_policy.BackupPolicySpec)."""
    location_id: Mapped[str] = mapped_column(String(36), ForeignKey("backup_locations.id"))
    """= spec.locationId; the foreign key refuses deleting a location a policy uses."""
    generation: Mapped[int] = mapped_column(Integer, default=1)
    version: Mapped[int] = mapped_column(Integer, default=1)
    """Bumped by every write of labels or spec: the ETag."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        Index("ix_backup_policies_created_at_id", "created_at", "id"),
        Index("ix_backup_policies_location_id", "location_id"),
    )


class Restore(Base):
    """A restore of a cluster's etcd from a backup (services/api/restores), progressed by
    `RestoreProgressed` events from the backup service and the provisioner.

    `active_cluster_id` holds the cluster id while the restore is not finished and is cleared
    when it is: its unique constraint lets only one restore per cluster be under way, even
    when two requests race."""

    __tablename__ = "restores"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    cluster_id: Mapped[str] = mapped_column(String(36))
    cluster_name: Mapped[str] = mapped_column(String(63))
    backup_id: Mapped[str] = mapped_column(String(64))
    backup_ref: Mapped[str] = mapped_column(String(255))
    location_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    force: Mapped[bool] = mapped_column(Boolean, default=False)
    phase: Mapped[str] = mapped_column(String(16), default="Pending")
    reason: Mapped[str] = mapped_column(String(128), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    etcd_revision: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JsonType, default=list)
    """[{phase, at, reason, message}] of every phase the restore went through, in order."""
    active_cluster_id: Mapped[str | None] = mapped_column(String(36), nullable=True, unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (Index("ix_restores_cluster_created_at_id", "cluster_id", "created_at", "id"),)
