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
    # Placeholder: the tables are added by the change that builds this resource.
    _ = (sa, op, UTCDateTime, JSON)


def downgrade() -> None:
    pass
