"""Instruments and api clients, with the seed instruments.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEED_INSTRUMENTS = [
    # symbol, name, asset class, price decimals, reference price
    ("AAPL", "Apple Inc.", "equity", 4, "189.2300"),
    ("MSFT", "Microsoft Corporation", "equity", 4, "415.5000"),
    ("GOOGL", "Alphabet Inc. Class A", "equity", 4, "171.1000"),
    ("AMZN", "Amazon.com, Inc.", "equity", 4, "186.4000"),
    ("TSLA", "Tesla, Inc.", "equity", 4, "245.0000"),
    ("BTC-USD", "Bitcoin / US Dollar", "crypto", 2, "67250.00"),
    ("ETH-USD", "Ether / US Dollar", "crypto", 2, "3450.00"),
    ("SOL-USD", "Solana / US Dollar", "crypto", 4, "152.3000"),
    ("EUR-USD", "Euro / US Dollar", "fx", 5, "1.08450"),
    ("GBP-USD", "British Pound / US Dollar", "fx", 5, "1.27120"),
]


def upgrade() -> None:
    instruments = op.create_table(
        "instruments",
        sa.Column("symbol", sa.String(16), nullable=False),
        sa.Column("name", sa.String(120), nullable=False),
        sa.Column("asset_class", sa.String(16), nullable=False),
        sa.Column("price_decimals", sa.Integer(), nullable=False),
        sa.Column("reference_price", sa.Numeric(24, 8), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("symbol", name=op.f("pk_instruments")),
    )
    op.create_table(
        "api_clients",
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(120), nullable=False),
        sa.Column("secret_hash", sa.String(255), nullable=False),
        sa.Column("symbols", sa.JSON(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("client_id", name=op.f("pk_api_clients")),
    )
    op.bulk_insert(
        instruments,
        [
            {
                "symbol": symbol,
                "name": name,
                "asset_class": asset_class,
                "price_decimals": decimals,
                "reference_price": price,
                "active": True,
            }
            for symbol, name, asset_class, decimals, price in SEED_INSTRUMENTS
        ],
    )


def downgrade() -> None:
    op.drop_table("api_clients")
    op.drop_table("instruments")
