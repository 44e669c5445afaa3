"""Per-symbol seq high-water marks, checkpointed by the producer.

If Redis loses its data while the producer changes, the new leader resumes above the last
checkpoint instead of restarting seq.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tick_sequences",
        sa.Column("symbol", sa.String(16), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("symbol", name=op.f("pk_tick_sequences")),
    )


def downgrade() -> None:
    op.drop_table("tick_sequences")
