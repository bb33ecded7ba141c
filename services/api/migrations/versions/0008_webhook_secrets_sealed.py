"""Webhook signing secrets stored sealed (AES-256-GCM under the secrets key), not in clear

Existing clear-text secrets are sealed by the API at its next start (the migration has no key);
until then the clear column still holds them.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhooks") as batch:
        batch.add_column(sa.Column("sealed_secret", sa.Text(), nullable=True))
        batch.alter_column("secret", existing_type=sa.String(256), nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("webhooks") as batch:
        batch.drop_column("sealed_secret")
