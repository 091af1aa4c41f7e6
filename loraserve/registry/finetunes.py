"""Finetune lookups over one session: resolving "id or name" with the visibility rules, and row -> record."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import InstrumentedAttribute, Session

from loraserve.errors import FinetuneNotFound
from loraserve.registry.names import MAX_NAME_CHARS, parse_uuid, same_model
from loraserve.registry.records import AssetFile, Finetune, FinetuneAsset
from loraserve.registry.schema import AssetRow, FinetuneRow
from loraserve.registry.storage import AssetDigest

if TYPE_CHECKING:
    from loraserve.registry.store import AdapterStore

# Longer than any id or name: refused without a query.
_MAX_REF_CHARS = max(MAX_NAME_CHARS, 64)
# The column that records each file as accepted.
FLAG_COLUMNS: dict[AssetFile, InstrumentedAttribute[bool]] = {
    AssetFile.CONFIG: FinetuneRow.has_config,
    AssetFile.WEIGHTS: FinetuneRow.has_weights,
}


def to_finetune(row: FinetuneRow, store: AdapterStore) -> Finetune:
    # A flag counts only with its file in the store (on disk, for the local one): a lost file must make
    # the finetune not ready.
    return Finetune(
        id=row.id,
        account_id=row.account_id,
        name=row.name,
        description=row.description,
        model=row.model,
        public=row.public,
        created_at=row.created_at,
        modified_at=row.modified_at,
        has_config=row.has_config and store.has(row.id, AssetFile.CONFIG),
        has_weights=row.has_weights and store.has(row.id, AssetFile.WEIGHTS),
    )


def to_asset(row: AssetRow) -> FinetuneAsset:
    return FinetuneAsset(
        id=row.id,
        finetune_id=row.finetune_id,
        file_name=row.file_name,
        bucket_name=row.bucket_name,
        created_at=row.created_at,
        modified_at=row.modified_at,
    )


def asset_digests(s: Session, finetune_id: str) -> dict[AssetFile, AssetDigest]:
    """What the database records of the finetune's accepted files."""
    rows = s.scalars(select(AssetRow).where(AssetRow.finetune_id == finetune_id))
    return {AssetFile(r.file_name): AssetDigest(r.size_bytes, r.sha256) for r in rows}


def _fits(row: FinetuneRow, model: str | None) -> bool:
    return model is None or same_model(row.model, model)


def resolve(
    s: Session, account_id: str, ref: str, *, own_only: bool, model: str | None = None
) -> FinetuneRow:
    """The finetune `ref` (id or name) names for `account_id`, else FinetuneNotFound.

    Own finetunes first; then, unless `own_only`, public ones of any account (the oldest wins when
    several accounts publish one name). A foreign private finetune is indistinguishable from none.
    With `model`, only a finetune created for that base model matches.
    """
    if not isinstance(ref, str) or not 0 < len(ref) <= _MAX_REF_CHARS:
        raise FinetuneNotFound(str(ref)[:_MAX_REF_CHARS])
    finetune_id = parse_uuid(ref)
    if finetune_id is not None:
        row = s.get(FinetuneRow, finetune_id)
        if (
            row is not None
            and (row.account_id == account_id or (row.public and not own_only))
            and _fits(row, model)
        ):
            return row
        raise FinetuneNotFound(ref)
    own = s.scalars(
        select(FinetuneRow).where(FinetuneRow.account_id == account_id, FinetuneRow.name == ref)
    ).first()
    if own is not None:
        # An own name shadows other accounts' public finetunes of that name, whatever their model.
        if _fits(own, model):
            return own
        raise FinetuneNotFound(ref)
    if not own_only:
        public = select(FinetuneRow).where(FinetuneRow.name == ref, FinetuneRow.public.is_(True))
        for row in s.scalars(public.order_by(FinetuneRow.created_at, FinetuneRow.id)):
            if _fits(row, model):
                return row
    raise FinetuneNotFound(ref)
