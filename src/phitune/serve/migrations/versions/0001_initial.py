"""The tables of phitune 0.1.0, the last release that made them with `create_all`: a database it
wrote has these and no alembic_version table, and is stamped with this revision (`db.migrate`).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _seq() -> sa.Column:
    return sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True)


def upgrade() -> None:
    _keys_and_files()
    _jobs()
    _events_and_checkpoints()


def _keys_and_files() -> None:
    op.create_table(
        "api_keys",
        _seq(),
        sa.Column("org", sa.String(64), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Integer(), nullable=False),
    )
    op.create_index("ix_api_keys_org", "api_keys", ["org"])
    op.create_table(
        "files",
        _seq(),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("org", sa.String(64), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_details", sa.Text(), nullable=True),
        sa.Column("deleted", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_files_org", "files", ["org"])
    op.create_index("ix_files_id", "files", ["id"], unique=True)


def _jobs() -> None:
    op.create_table(
        "jobs",
        _seq(),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("org", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("training_file", sa.String(40), nullable=False),
        sa.Column("validation_file", sa.String(40), nullable=True),
        sa.Column("suffix", sa.String(64), nullable=True),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=True),
        sa.Column("method", sa.JSON(), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("phitune", sa.JSON(), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("fine_tuned_model", sa.String(255), nullable=True),
        sa.Column("finished_at", sa.Integer(), nullable=True),
        sa.Column("trained_tokens", sa.Integer(), nullable=True),
        sa.Column("result_files", sa.JSON(), nullable=False),
        sa.Column("estimated_finish", sa.Integer(), nullable=True),
        sa.Column("total_steps", sa.Integer(), nullable=True),
        sa.Column("worker", sa.String(64), nullable=True),
        sa.Column("heartbeat", sa.Float(), nullable=True),
        sa.Column("requested", sa.String(16), nullable=True),
        sa.Column("model_deleted", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_jobs_org", "jobs", ["org"])
    op.create_index("ix_jobs_id", "jobs", ["id"], unique=True)


def _events_and_checkpoints() -> None:
    op.create_table(
        "events",
        _seq(),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("step", sa.Integer(), nullable=True),
    )
    op.create_index("ix_events_id", "events", ["id"], unique=True)
    op.create_index("ix_events_job_id", "events", ["job_id"])
    op.create_table(
        "checkpoints",
        _seq(),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("model_name", sa.String(255), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_checkpoints_id", "checkpoints", ["id"], unique=True)
    op.create_index("ix_checkpoints_job_id", "checkpoints", ["job_id"])


def downgrade() -> None:
    for table in ("checkpoints", "events", "jobs", "files", "api_keys"):
        op.drop_table(table)
