"""The model's own score and the N/2 ghost check beside the series' score (qc_daemon/ghost_check.py).

``score`` became the lower of the model's score and the ghost check's. Rows from before keep a null
``model_score``: their ``score`` was the model's.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series_results") as batch:
        batch.add_column(sa.Column("model_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("ghost_ratio", sa.Float(), nullable=True))
        batch.add_column(sa.Column("ghost_axis", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series_results") as batch:
        batch.drop_column("ghost_axis")
        batch.drop_column("ghost_ratio")
        batch.drop_column("model_score")
