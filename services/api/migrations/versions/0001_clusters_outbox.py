"""clusters and the outbox

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from services.api.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "clusters",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("deletion_requested_at", UTCDateTime, nullable=True),
        sa.Column("phase", sa.String(32), nullable=False),
        sa.Column("observed_generation", sa.Integer, nullable=False),
        sa.Column("status_reason", sa.String(128), nullable=False),
        sa.Column("status_message", sa.Text, nullable=False),
        sa.Column("conditions", JSON, nullable=False),
        sa.Column("endpoint", JSON, nullable=True),
        sa.Column("status_sequence", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_clusters_created_at_id", "clusters", ["created_at", "id"])
    op.create_table(
        "outbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("envelope", sa.Text, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("sent_at", UTCDateTime, nullable=True),
    )
    op.create_index("ix_outbox_pending", "outbox", ["sent_at", "id"])


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_table("clusters")
