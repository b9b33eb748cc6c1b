"""The schema of release 0.1.0, frozen: written out here, never derived from the live models.

Release 0.1.0 kept its own ``schema_version`` table (one row, version 1); its databases are stamped at this
revision instead of running it.

Revision ID: 0001
Revises: none
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema_version = op.create_table(
        "schema_version",
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("applied_at", sa.DateTime(), server_default=sa.func.current_timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    op.create_table(
        "series_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("station_name", sa.String(64), nullable=True),
        sa.Column("calling_ae", sa.String(16), nullable=True),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("series_description", sa.String(256), nullable=True),
        sa.Column("protocol_name", sa.String(256), nullable=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=True),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("completed_at", sa.DateTime(), nullable=False),
        sa.Column("scored_at", sa.DateTime(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),  # SeriesStatus member names
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("model_sha256", sa.String(64), nullable=True),
        sa.Column("scoring_time_s", sa.Float(), nullable=True),
        sa.Column("patch_scores", sa.JSON(), nullable=True),
        sa.Column("patch_origins", sa.JSON(), nullable=True),
        sa.Column("volume_shape", sa.JSON(), nullable=True),
        sa.Column("nifti_path", sa.Text(), nullable=True),
        sa.Column("below_threshold", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("series_instance_uid", "revision"),
    )
    op.create_index("ix_series_results_series_instance_uid", "series_results", ["series_instance_uid"])
    op.create_index("ix_series_results_completed_at", "series_results", ["completed_at"])
    op.create_index("ix_series_results_station_name", "series_results", ["station_name"])
    op.create_index("ix_series_results_status", "series_results", ["status"])
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),  # AlertChannel member names
        sa.Column("state", sa.String(16), nullable=False),  # AlertState member names
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("delivered_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("result_id", "channel"),
        sa.ForeignKeyConstraint(["result_id"], ["series_results.id"]),
    )
    op.create_index("ix_alerts_result_id", "alerts", ["result_id"])
    op.create_index("ix_alerts_state", "alerts", ["state"])
    op.bulk_insert(schema_version, [{"version": 1}])


def downgrade() -> None:
    op.drop_table("alerts")
    op.drop_table("series_results")
    op.drop_table("schema_version")
