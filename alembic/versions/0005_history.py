"""History in the database: published ticks and folded candles, kept `HISTORY_DAYS`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ticks",
        sa.Column("symbol", sa.String(16), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.Column("frame", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("symbol", "seq", name=op.f("pk_ticks")),
    )
    op.create_index("ix_ticks_symbol_ts", "ticks", ["symbol", "ts"])
    op.create_table(
        "candles",
        sa.Column("symbol", sa.String(16), nullable=False),
        sa.Column("interval", sa.String(4), nullable=False),
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.Column("open", sa.String(40), nullable=False),
        sa.Column("high", sa.String(40), nullable=False),
        sa.Column("low", sa.String(40), nullable=False),
        sa.Column("close", sa.String(40), nullable=False),
        sa.Column("volume", sa.String(40), nullable=False),
        sa.PrimaryKeyConstraint("symbol", "interval", "start", name=op.f("pk_candles")),
    )


def downgrade() -> None:
    op.drop_table("candles")
    op.drop_index("ix_ticks_symbol_ts", table_name="ticks")
    op.drop_table("ticks")
