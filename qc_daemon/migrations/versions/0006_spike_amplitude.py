"""The spike check beside the score (qc_daemon/spike_check.py): a k-space spike's stripe amplitude, or null.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series_results") as batch:
        batch.add_column(sa.Column("spike_amplitude", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series_results") as batch:
        batch.drop_column("spike_amplitude")
