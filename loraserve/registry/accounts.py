"""Accounts and their API tokens, as queries over one SQLAlchemy session (the caller owns the transaction)."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from loraserve.registry.database import rows_matched
from loraserve.registry.records import TokenInfo, now_iso
from loraserve.registry.schema import AccountRow, TokenRow
from loraserve.registry.tokens import digests_equal, hash_token, new_token, plausible_token


def ensure_account(s: Session, account_id: str) -> None:
    if s.get(AccountRow, account_id) is None:
        s.add(AccountRow(id=account_id, created_at=now_iso()))
        s.flush()


def add_token(s: Session, account_id: str, label: str) -> str:
    token = new_token()
    s.add(TokenRow(account_id=account_id, token_hash=hash_token(token), label=label, created_at=now_iso()))
    s.flush()
    return token


def token_owner(s: Session, token: str) -> str | None:
    """The account a live token belongs to, or None."""
    info = live_token(s, token)
    return None if info is None else info.account_id


def live_token(s: Session, token: str) -> TokenInfo | None:
    """The metadata of a live token, or None."""
    if not plausible_token(token):
        return None
    digest = hash_token(token)
    r = s.scalars(select(TokenRow).where(TokenRow.token_hash == digest)).first()
    if r is None or r.revoked_at is not None or not digests_equal(r.token_hash, digest):
        return None
    return TokenInfo(
        id=r.id, account_id=r.account_id, label=r.label, created_at=r.created_at, revoked_at=None
    )


def revoke_token(s: Session, token: str) -> bool:
    if not plausible_token(token):
        return False
    stmt = (
        update(TokenRow)
        .where(TokenRow.token_hash == hash_token(token), TokenRow.revoked_at.is_(None))
        .values(revoked_at=now_iso())
    )
    return rows_matched(s.execute(stmt)) > 0


def revoke_all(s: Session, account_id: str) -> int:
    stmt = (
        update(TokenRow)
        .where(TokenRow.account_id == account_id, TokenRow.revoked_at.is_(None))
        .values(revoked_at=now_iso())
    )
    return rows_matched(s.execute(stmt))


def list_tokens(s: Session, account_id: str) -> list[TokenInfo]:
    rows = s.scalars(select(TokenRow).where(TokenRow.account_id == account_id).order_by(TokenRow.id))
    return [
        TokenInfo(
            id=r.id, account_id=r.account_id, label=r.label, created_at=r.created_at, revoked_at=r.revoked_at
        )
        for r in rows
    ]


def owns(owner: str | None, account_id: str) -> bool:
    return owner is not None and digests_equal(owner, account_id)
