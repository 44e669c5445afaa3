"""Revoked tokens: by `jti`, or every token of a subject issued up to `revoked_at`.

Each instance reads the rows not yet past `keep_until` (app/auth/revocations.py).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "revoked_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("jti", sa.String(255), nullable=True),
        sa.Column("subject", sa.String(255), nullable=True),
        sa.Column("revoked_at", sa.Float(), nullable=False),
        sa.Column("keep_until", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_revoked_tokens")),
    )
    # Every poll reads the rows still kept.
    op.create_index(op.f("ix_revoked_tokens_keep_until"), "revoked_tokens", ["keep_until"])


def downgrade() -> None:
    op.drop_index(op.f("ix_revoked_tokens_keep_until"), table_name="revoked_tokens")
    op.drop_table("revoked_tokens")
