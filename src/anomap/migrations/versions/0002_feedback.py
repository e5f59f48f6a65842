"""Operator feedback: who marked a verdict and when; threshold changes.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inspections") as batch:
        batch.add_column(sa.Column("feedback_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("feedback_by", sa.String(200)))
    op.create_table(
        "threshold_changes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("station", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("who", sa.String(200)),
        sa.Column("old", sa.Float, nullable=False),
        sa.Column("new", sa.Float, nullable=False),
        sa.Column("why", sa.Text),
        sa.Column("undoes", sa.Integer),
    )


def downgrade() -> None:
    op.drop_table("threshold_changes")
    with op.batch_alter_table("inspections") as batch:
        batch.drop_column("feedback_by")
        batch.drop_column("feedback_at")
