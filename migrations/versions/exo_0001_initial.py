"""The first event store schema: events and snapshots.

Revision ID: exo_0001
Revises:
Create Date: 2025-01-01

Revision ids start with `exo_` so that a database migrated by some other Alembic project is
never mistaken for one of ours.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "exo_0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the values in exo.store.schema: a migration must not change when the code does.
_INDEX_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_SQLITE_APPLICATION_ID = 0x65786F00


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("event_index", _INDEX_TYPE, primary_key=True, autoincrement=False),
        sa.Column("term", sa.BigInteger(), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "snapshots",
        sa.Column("event_index", _INDEX_TYPE, primary_key=True, autoincrement=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
    )
    if op.get_bind().dialect.name == "sqlite":
        op.execute(f"PRAGMA application_id = {_SQLITE_APPLICATION_ID}")


def downgrade() -> None:
    op.drop_table("snapshots")
    op.drop_table("events")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("PRAGMA application_id = 0")
