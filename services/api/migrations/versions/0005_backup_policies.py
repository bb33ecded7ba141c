"""Backup policies (schedule, targets, location, retention, encryption, RPO, drills)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from services.api.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "backup_policies",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column(
            "location_id",
            sa.String(36),
            sa.ForeignKey("backup_locations.id", name="fk_backup_policies_location_id"),
            nullable=False,
        ),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_backup_policies_created_at_id", "backup_policies", ["created_at", "id"])
    op.create_index("ix_backup_policies_location_id", "backup_policies", ["location_id"])


def downgrade() -> None:
    op.drop_index("ix_backup_policies_location_id", table_name="backup_policies")
    op.drop_index("ix_backup_policies_created_at_id", table_name="backup_policies")
    op.drop_table("backup_policies")
