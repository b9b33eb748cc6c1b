"""Result timing: when the last instance arrived and when processing started (``scored_at`` exists since 0001).

Also drops release 0.1.0's ``schema_version`` table: ``alembic_version`` records the schema from here on.
Downgrading restores it, so a database at 0001 is one release 0.1.0 opens as its own.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series_results") as batch:
        batch.add_column(sa.Column("last_instance_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("processing_started_at", sa.DateTime(), nullable=True))
    op.drop_table("schema_version")


def downgrade() -> None:
    schema_version = op.create_table(
        "schema_version",
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("applied_at", sa.DateTime(), server_default=sa.func.current_timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    op.bulk_insert(schema_version, [{"version": 1}])
    with op.batch_alter_table("series_results") as batch:
        batch.drop_column("processing_started_at")
        batch.drop_column("last_instance_at")
