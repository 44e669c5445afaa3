"""API clients' scopes: what a client may do beyond reading its symbols (`publish`: push
prices with `POST /v1/ingest`). Existing clients get none.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A server default fills the rows already there, on SQLite and PostgreSQL alike; batch
    # mode lets SQLite (which cannot alter a column) take the add and the later drop.
    with op.batch_alter_table("api_clients") as batch:
        batch.add_column(
            sa.Column("scopes", sa.JSON(), nullable=False, server_default=sa.text("'[]'"))
        )


def downgrade() -> None:
    with op.batch_alter_table("api_clients") as batch:
        batch.drop_column("scopes")
