"""Backups as the API knows them (projected from backup events), with drill results

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from services.api.models import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "backups",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("ref", sa.String(255), nullable=False),
        sa.Column("target", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("cluster_id", sa.String(36), nullable=True),
        sa.Column("policy_id", sa.String(36), nullable=True),
        sa.Column("location_id", sa.String(36), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("completed_at", UTCDateTime, nullable=True),
        sa.Column("failed_at", UTCDateTime, nullable=True),
        sa.Column("pruned_at", UTCDateTime, nullable=True),
        sa.Column("stored_bytes", sa.BigInteger, nullable=True),
        sa.Column("plaintext_bytes", sa.BigInteger, nullable=True),
        sa.Column("stored_sha256", sa.String(64), nullable=True),
        sa.Column("plaintext_sha256", sa.String(64), nullable=True),
        sa.Column("encrypted", sa.Boolean, nullable=True),
        sa.Column("encryption_key_id", sa.String(128), nullable=True),
        sa.Column("verified", sa.Boolean, nullable=True),
        sa.Column("etcd_revision", sa.BigInteger, nullable=True),
        sa.Column("etcd_key_count", sa.BigInteger, nullable=True),
        sa.Column("kubernetes_version", sa.String(32), nullable=True),
        sa.Column("duration_seconds", sa.Float, nullable=True),
        sa.Column("reason", sa.String(128), nullable=True),
        sa.Column("message", sa.Text, nullable=True),
        sa.Column("last_drill", JSON, nullable=True),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_backups_created_at_id", "backups", ["created_at", "id"])
    op.create_index("ix_backups_target_created_at", "backups", ["target", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_backups_target_created_at", table_name="backups")
    op.drop_index("ix_backups_created_at_id", table_name="backups")
    op.drop_table("backups")
