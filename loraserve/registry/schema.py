"""The registry's tables. Migrations (migrations/versions) create them; this is the query-side view.

Timestamps are stored as the ISO strings the API returns ("2024-04-02T12:34:56.789Z"): the fixed
width makes them sort correctly as text on every database, and no timezone conversion can creep in.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TIMESTAMP_CHARS = 24

# Stable constraint names, so later migrations (and SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class AccountRow(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[str] = mapped_column(String(TIMESTAMP_CHARS))


class TokenRow(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    # sha256 hex of the token; the plaintext is never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[str] = mapped_column(String(TIMESTAMP_CHARS))
    revoked_at: Mapped[str | None] = mapped_column(String(TIMESTAMP_CHARS), nullable=True)


class FinetuneRow(Base):
    __tablename__ = "finetunes"
    __table_args__ = (
        UniqueConstraint("account_id", "name", name="uq_finetunes_account_id_name"),
        Index("ix_finetunes_public_created_at", "public", "created_at"),
        Index("ix_finetunes_name", "name"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(256))
    public: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[str] = mapped_column(String(TIMESTAMP_CHARS))
    modified_at: Mapped[str] = mapped_column(String(TIMESTAMP_CHARS))
    has_config: Mapped[bool] = mapped_column(Boolean)
    has_weights: Mapped[bool] = mapped_column(Boolean)


class AssetRow(Base):
    __tablename__ = "finetune_assets"
    __table_args__ = (
        UniqueConstraint("finetune_id", "file_name", name="uq_finetune_assets_finetune_id_file_name"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    finetune_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("finetunes.id", ondelete="CASCADE"), index=True
    )
    file_name: Mapped[str] = mapped_column(String(64))
    bucket_name: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[str] = mapped_column(String(TIMESTAMP_CHARS))
    modified_at: Mapped[str] = mapped_column(String(TIMESTAMP_CHARS))
