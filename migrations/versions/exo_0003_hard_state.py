"""Raft's hard state: the commit index, so a restart folds only what a majority held.

Revision ID: exo_0003
Revises: exo_0002
Create Date: 2026-12-07

One row (`id` = 1) once a node has recorded a commit index. A log without the row (written before
quorum commits) counts as committed to its end: under the rules it was written by, it was.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "exo_0003"
down_revision = "exo_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hard_state",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("commit_index", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("hard_state")
