"""Backup locations (S3 buckets or local directories; the secret key stored sealed)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from services.api.models import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "backup_locations",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("sealed_secret", sa.Text, nullable=True),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index(
        "ix_backup_locations_created_at_id", "backup_locations", ["created_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_backup_locations_created_at_id", table_name="backup_locations")
    op.drop_table("backup_locations")
