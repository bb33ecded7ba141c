"""Cluster restores (requested through the API, progressed by the backup service and provisioner)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from services.api.models import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "restores",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("cluster_id", sa.String(36), nullable=False),
        sa.Column("cluster_name", sa.String(63), nullable=False),
        sa.Column("backup_id", sa.String(64), nullable=False),
        sa.Column("backup_ref", sa.String(255), nullable=False),
        sa.Column("location_id", sa.String(36), nullable=True),
        sa.Column("force", sa.Boolean, nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(128), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("etcd_revision", sa.BigInteger, nullable=True),
        sa.Column("history", JSON, nullable=False),
        sa.Column("active_cluster_id", sa.String(36), nullable=True, unique=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=True),
    )
    op.create_index(
        "ix_restores_cluster_created_at_id", "restores", ["cluster_id", "created_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_restores_cluster_created_at_id", table_name="restores")
    op.drop_table("restores")
