"""One checkpoint object per job and step: two syncs of one run (a worker and its successor after
a lost heartbeat) can no longer record a step twice.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database that already holds a duplicate keeps its first row of each (job, step).
    op.execute("DELETE FROM checkpoints WHERE seq NOT IN (SELECT MIN(seq) FROM checkpoints GROUP BY job_id, step)")
    op.create_index("ix_checkpoints_job_step", "checkpoints", ["job_id", "step"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_checkpoints_job_step", table_name="checkpoints")
