"""The first inspection record: inspections and drift events.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("station", sa.String(200), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("mtime_ns", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64)),
        sa.Column("judged_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(200)),
        sa.Column("model_version", sa.String(64)),
        sa.Column("threshold", sa.Float),
        sa.Column("pixel_threshold", sa.Float),
        sa.Column("score", sa.Float),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("overlay", sa.Text),
        sa.Column("mask", sa.Text),
        sa.Column("latency_ms", sa.Float),
        sa.Column("error", sa.Text),
        sa.Column("action_done", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("feedback", sa.String(32)),
        sa.Column("feedback_note", sa.Text),
        sa.UniqueConstraint("station", "path", "size", "mtime_ns",
                            name="uq_inspections_photo"),
    )
    op.create_index("ix_inspections_judged_at", "inspections", ["judged_at"])
    op.create_table(
        "drift_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("station", sa.String(200), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_version", sa.String(64)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("window", sa.Integer, nullable=False),
        sa.Column("p_value", sa.Float),
        sa.Column("evidence", sa.Text),
    )


def downgrade() -> None:
    op.drop_table("drift_events")
    op.drop_index("ix_inspections_judged_at", "inspections")
    op.drop_table("inspections")
