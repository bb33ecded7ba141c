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
    # Placeholder: the tables are added by the change that builds this resource.
    _ = (sa, op, UTCDateTime, JSON)


def downgrade() -> None:
    pass
