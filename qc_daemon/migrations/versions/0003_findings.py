"""Findings beside the score: classical IQMs (and why any is null), the quality map and montage paths.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series_results") as batch:
        batch.add_column(sa.Column("iqms", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("iqm_errors", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("quality_map_path", sa.Text(), nullable=True))
        batch.add_column(sa.Column("montage_path", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series_results") as batch:
        batch.drop_column("montage_path")
        batch.drop_column("quality_map_path")
        batch.drop_column("iqm_errors")
        batch.drop_column("iqms")
