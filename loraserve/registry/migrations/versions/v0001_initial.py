"""Initial schema: accounts, tokens, finetunes, finetune_assets.

Revision ID: 0001
Revises:
Create Date: 2024-04-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_TS = sa.String(24)


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_accounts"),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("revoked_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tokens"),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_tokens_account_id_accounts", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("token_hash", name="uq_tokens_token_hash"),
    )
    op.create_index("ix_tokens_account_id", "tokens", ["account_id"])
    op.create_table(
        "finetunes",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("public", sa.Boolean(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("modified_at", _TS, nullable=False),
        sa.Column("has_config", sa.Boolean(), nullable=False),
        sa.Column("has_weights", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_finetunes"),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_finetunes_account_id_accounts", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("account_id", "name", name="uq_finetunes_account_id_name"),
    )
    op.create_index("ix_finetunes_account_id", "finetunes", ["account_id"])
    op.create_index("ix_finetunes_name", "finetunes", ["name"])
    op.create_index("ix_finetunes_public_created_at", "finetunes", ["public", "created_at"])
    op.create_table(
        "finetune_assets",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("finetune_id", sa.String(36), nullable=False),
        sa.Column("file_name", sa.String(64), nullable=False),
        sa.Column("bucket_name", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("modified_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_finetune_assets"),
        sa.ForeignKeyConstraint(
            ["finetune_id"],
            ["finetunes.id"],
            name="fk_finetune_assets_finetune_id_finetunes",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("finetune_id", "file_name", name="uq_finetune_assets_finetune_id_file_name"),
    )
    op.create_index("ix_finetune_assets_finetune_id", "finetune_assets", ["finetune_id"])


def downgrade() -> None:
    op.drop_table("finetune_assets")
    op.drop_table("finetunes")
    op.drop_table("tokens")
    op.drop_table("accounts")
