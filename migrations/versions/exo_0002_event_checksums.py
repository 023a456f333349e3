"""Every event carries a checksum: CRC32C of its payload, filled in for the events already stored.

Revision ID: exo_0002
Revises: exo_0001
Create Date: 2026-12-07

The column is added with a server default of 0 (SQLite adds a NOT NULL column only with a
default), then every existing row gets its payload's CRC32C, in pages, inside the upgrade's
transaction: an upgrade that stops half way leaves the file at exo_0001, untouched.
"""

from __future__ import annotations

import google_crc32c
import sqlalchemy as sa
from alembic import op

revision = "exo_0002"
down_revision = "exo_0001"
branch_labels = None
depends_on = None

_PAGE_ROWS = 10_000


def upgrade() -> None:
    op.add_column("events", sa.Column("checksum", sa.BigInteger(), nullable=False, server_default="0"))
    events = sa.table(
        "events", sa.column("event_index", sa.BigInteger()), sa.column("payload", sa.LargeBinary()),
        sa.column("checksum", sa.BigInteger()),
    )  # fmt: skip
    bind = op.get_bind()
    update = (
        sa.update(events)
        .where(events.c.event_index == sa.bindparam("index"))
        .values(checksum=sa.bindparam("crc"))
    )
    after = -1
    while True:
        rows = bind.execute(
            sa.select(events.c.event_index, events.c.payload)
            .where(events.c.event_index > after)
            .order_by(events.c.event_index)
            .limit(_PAGE_ROWS)
        ).all()
        if not rows:
            return
        bind.execute(
            update, [{"index": index, "crc": google_crc32c.value(payload)} for index, payload in rows]
        )
        after = rows[-1][0]


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_column("checksum")
