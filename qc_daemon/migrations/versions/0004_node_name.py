"""The node that recorded each revision: several daemons may share one (PostgreSQL) database.

Rows from before stay null ("this node" to whichever daemon owns the database alone).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series_results") as batch:
        batch.add_column(sa.Column("node_name", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series_results") as batch:
        batch.drop_column("node_name")
