"""The last step of an upload: the validated file goes into the adapter store and its record commits."""

from __future__ import annotations

import uuid

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loraserve.errors import FinetuneNotFound
from loraserve.registry.database import rows_matched
from loraserve.registry.finetunes import FLAG_COLUMNS, to_asset
from loraserve.registry.records import BUCKET_NAME, AssetFile, FinetuneAsset, now_iso
from loraserve.registry.schema import AssetRow, FinetuneRow
from loraserve.registry.storage import Upload
from loraserve.registry.store import AdapterStore


def commit_asset(
    sessions: sessionmaker[Session],
    store: AdapterStore,
    account_id: str,
    ref: str,
    finetune_id: str,
    file: AssetFile,
    upload: Upload,
) -> FinetuneAsset:
    """Record `upload` as the finetune's `file`; the caller holds the finetune's storage lock."""
    store.stage(upload, finetune_id, file)  # a remote store's PUT: before the transaction, never inside it
    now = now_iso()
    installed = False
    try:
        with sessions.begin() as s:
            # The UPDATE comes first: it takes the write lock, and finds the row gone if it was deleted.
            mark = (
                update(FinetuneRow)
                .where(FinetuneRow.id == finetune_id, FinetuneRow.account_id == account_id)
                .values({FLAG_COLUMNS[file]: True, FinetuneRow.modified_at: now})
            )
            if rows_matched(s.execute(mark)) == 0:
                raise FinetuneNotFound(ref)
            asset = s.scalars(
                select(AssetRow).where(AssetRow.finetune_id == finetune_id, AssetRow.file_name == file.value)
            ).first()
            if asset is None:
                asset = AssetRow(
                    id=str(uuid.uuid4()),
                    finetune_id=finetune_id,
                    file_name=file.value,
                    bucket_name=BUCKET_NAME,
                    created_at=now,
                )
                s.add(asset)
            asset.size_bytes, asset.sha256, asset.modified_at = upload.size, upload.sha256, now
            s.flush()
            record = to_asset(asset)
            # Last step before commit (the local store's rename; see LocalStore.install).
            store.install(upload, finetune_id, file)
            installed = True
    except BaseException:
        if installed:  # the commit failed after the install: take the unvouched file away now
            store.retract(finetune_id, file)
        raise
    store.settle(upload, finetune_id, file)
    return record
