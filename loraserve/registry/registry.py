"""The registry: accounts, tokens and finetunes in a SQL database, adapter files in an adapter store
(store.py: the data dir's disk by default, or a shared store behind fsspec).

Every method runs its own short transaction, so one `Registry` serves all threads of the server.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from loraserve.errors import (
    AccountLimitExceeded,
    AuthenticationError,
    BadInput,
    FinetuneConflict,
    FinetuneNotFound,
    InvalidFinetune,
)
from loraserve.registry import accounts
from loraserve.registry.database import default_url, make_engine, migrate
from loraserve.registry.finetunes import asset_digests, resolve, to_finetune
from loraserve.registry.install import commit_asset
from loraserve.registry.limits import RegistryLimits
from loraserve.registry.names import check_account_id, check_description, check_label, check_model, check_name
from loraserve.registry.outage import OutageWatch
from loraserve.registry.records import AssetFile, Finetune, FinetuneAsset, PublicOrder, TokenInfo, now_iso
from loraserve.registry.recovery import RecoveryReport
from loraserve.registry.schema import AccountRow, AssetRow, FinetuneRow
from loraserve.registry.storage import AssetDigest, FinetuneStorage
from loraserve.registry.store import AdapterStoreConfig, open_store
from loraserve.registry.token_cache import TokenCache
from loraserve.registry.uploads import check_upload, size_cap
from loraserve.types import AdapterRef, ModelInfo

DEFAULT_LIMITS = RegistryLimits()
MAX_PUBLIC_PAGE = 1000

_ORDERINGS = {
    PublicOrder.CREATED_AT: (FinetuneRow.created_at.desc(), FinetuneRow.id),
    PublicOrder.MODIFIED_AT: (FinetuneRow.modified_at.desc(), FinetuneRow.id),
    PublicOrder.NAME: (FinetuneRow.name, FinetuneRow.id),
}


class Registry:
    def __init__(
        self, data_dir: Path, engine: Engine, limits: RegistryLimits, store: AdapterStoreConfig | None = None
    ) -> None:
        """Use `Registry.open`, which also migrates the database."""
        self.data_dir = data_dir
        self.limits = limits
        self.storage = FinetuneStorage(data_dir / "finetunes")  # the local tier, whatever the store
        self.store = open_store(self.storage, store)
        self._engine = engine
        # From here on (not while `open` migrates), a database that does not answer is a 3040 (outage.py).
        self._outages = OutageWatch(engine)
        self.token_cache = TokenCache()  # authenticate() fills it; the API reads it before a query
        # Records are built from rows after commit: no reload on attribute access.
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(
        cls,
        data_dir: Path,
        database_url: str | None = None,
        limits: RegistryLimits = DEFAULT_LIMITS,
        store: AdapterStoreConfig | None = None,
    ) -> Registry:
        data_dir = Path(data_dir).resolve()  # AdapterRef.path must not depend on the engine's cwd
        data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(database_url or default_url(data_dir))
        try:
            migrate(engine, data_dir / ".migrate.lock")
        except BaseException:
            engine.dispose()
            raise
        return cls(data_dir, engine, limits, store)

    def close(self) -> None:
        self._engine.dispose()

    def recover(self) -> RecoveryReport:
        """Repair what a crash left (dead temp files, orphan directories, files the database does not
        vouch for) before serving; see recovery.py. Safe while another process serves the same data dir.
        Raises RegistryCorrupt if the SQLite database fails its integrity check."""
        return self.store.recover(self._engine, self._sessions)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # accounts & tokens

    def create_token(self, account_id: str, label: str = "") -> str:
        """A new token for the account (created if new). The plaintext is returned once and never stored."""
        check_account_id(account_id)
        check_label(label)
        try:
            return self._add_token(account_id, label)
        except IntegrityError:
            # Two first tokens for one new account raced to create it; the retry finds it.
            return self._add_token(account_id, label)

    def _add_token(self, account_id: str, label: str) -> str:
        with self._sessions.begin() as s:
            accounts.ensure_account(s, account_id)
            return accounts.add_token(s, account_id, label)

    def revoke_token(self, token: str) -> bool:
        with self._sessions.begin() as s:
            revoked = accounts.revoke_token(s, token)
        self.token_cache.clear()  # after the commit: a check racing it finds the token revoked
        return revoked

    def revoke_all_tokens(self, account_id: str) -> int:
        with self._sessions.begin() as s:
            revoked = accounts.revoke_all(s, account_id)
        self.token_cache.clear()
        return revoked

    def list_tokens(self, account_id: str) -> list[TokenInfo]:
        with self._sessions() as s:
            return accounts.list_tokens(s, account_id)

    def authenticate(self, account_id: str, token: str) -> None:
        """Raises AuthenticationError unless `token` is a live token of `account_id`.

        An unknown account fails the same way as a wrong token, so callers cannot probe for accounts.
        """
        with self._sessions() as s:
            owner = accounts.token_owner(s, token)
        if not isinstance(account_id, str) or not accounts.owns(owner, account_id):
            raise AuthenticationError()
        self.token_cache.put(account_id, token)

    def token(self, token: str) -> TokenInfo:
        """The live token's metadata (its account included); AuthenticationError otherwise."""
        with self._sessions() as s:
            info = accounts.live_token(s, token)
        if info is None:
            raise AuthenticationError()
        return info

    def account_exists(self, account_id: str) -> bool:
        if not isinstance(account_id, str):
            return False
        with self._sessions() as s:
            return s.get(AccountRow, account_id) is not None

    # finetunes

    def create_finetune(
        self, account_id: str, model: str, name: str, description: str = "", public: bool = False
    ) -> Finetune:
        check_name(name)
        check_model(model)
        check_description(description)
        if not isinstance(public, bool):
            raise BadInput("public must be a boolean")
        conflict = FinetuneConflict(
            f"AiError: Bad input: a finetune named {name!r} already exists in this account"
        )
        now = now_iso()
        try:
            with self._sessions.begin() as s:
                # Locks the account row on PostgreSQL so the cap below is exact under concurrent creates;
                # on SQLite the INSERT takes the database's single write lock, which does the same.
                if s.get(AccountRow, account_id, with_for_update=True) is None:
                    raise AuthenticationError()
                taken = select(FinetuneRow.id).where(
                    FinetuneRow.account_id == account_id, FinetuneRow.name == name
                )
                if s.scalars(taken).first() is not None:
                    raise conflict
                row = FinetuneRow(
                    id=str(uuid.uuid4()),
                    account_id=account_id,
                    name=name,
                    description=description,
                    model=model,
                    public=public,
                    created_at=now,
                    modified_at=now,
                    has_config=False,
                    has_weights=False,
                )
                s.add(row)
                s.flush()
                count = s.scalar(select(func.count()).where(FinetuneRow.account_id == account_id)) or 0
                if count > self.limits.max_finetunes_per_account:
                    raise AccountLimitExceeded(
                        f"Account limited: at most {self.limits.max_finetunes_per_account} "
                        "finetunes per account"
                    )
                return to_finetune(row, self.store)
        except IntegrityError:
            # The unique (account, name) constraint caught a concurrent create of the same name.
            raise conflict from None

    def get_finetune(self, account_id: str, ref: str) -> Finetune:
        with self._sessions() as s:
            return to_finetune(resolve(s, account_id, ref, own_only=False), self.store)

    def list_finetunes(self, account_id: str) -> list[Finetune]:
        stmt = (
            select(FinetuneRow)
            .where(FinetuneRow.account_id == account_id)
            .order_by(FinetuneRow.created_at, FinetuneRow.id)
        )
        with self._sessions() as s:
            return [to_finetune(row, self.store) for row in s.scalars(stmt)]

    def list_public(
        self, limit: int = 50, offset: int = 0, order_by: str | PublicOrder = "created_at"
    ) -> list[Finetune]:
        """Public finetunes of all accounts; newest first, or by name."""
        try:
            order = PublicOrder(order_by)
        except ValueError:
            raise BadInput(f"orderBy must be one of {[o.value for o in PublicOrder]}") from None
        if not isinstance(limit, int) or not 1 <= limit <= MAX_PUBLIC_PAGE:
            raise BadInput(f"limit must be an integer in 1..{MAX_PUBLIC_PAGE}")
        if not isinstance(offset, int) or offset < 0:
            raise BadInput("offset must be an integer >= 0")
        stmt = (
            select(FinetuneRow)
            .where(FinetuneRow.public.is_(True))
            .order_by(*_ORDERINGS[order])
            .limit(limit)
            .offset(offset)
        )
        with self._sessions() as s:
            return [to_finetune(row, self.store) for row in s.scalars(stmt)]

    def delete_finetune(self, account_id: str, ref: str) -> Finetune:
        """Deletes an own finetune and its files. The caller should also drop it from the engine's caches."""
        with self._sessions.begin() as s:
            row = resolve(s, account_id, ref, own_only=True)
            finetune = to_finetune(row, self.store)
            self.store.before_delete(row.id)  # a remote store that is down refuses before anything commits
            s.execute(delete(AssetRow).where(AssetRow.finetune_id == row.id))
            s.execute(delete(FinetuneRow).where(FinetuneRow.id == row.id))
        # Files go after the commit: a crash in between leaves orphan files, never a row without files.
        self.store.remove(finetune.id)
        return finetune

    def add_asset(
        self, account_id: str, ref: str, file_name: str, source: BinaryIO, base: ModelInfo
    ) -> FinetuneAsset:
        """Receive, validate and atomically install one adapter file of an own finetune."""
        try:
            file = AssetFile(file_name)
        except ValueError:
            allowed = " or ".join(f.value for f in AssetFile)
            raise InvalidFinetune(f"file_name must be {allowed}, found {str(file_name)[:80]!r}") from None
        with self._sessions() as s:
            finetune_id = resolve(s, account_id, ref, own_only=True).id
        upload = self.storage.receive(finetune_id, file, source, size_cap(file, self.limits))
        try:
            # Serialises the two files' uploads: each cross-check must see the other's final state.
            with self.storage.locked(finetune_id):
                current = self._accepted(finetune_id, ref)
                # The other file, when accepted, is cross-checked from the local tier.
                others = [f for f in AssetFile if f is not file and f not in current.missing_files]
                self.store.materialize(finetune_id, others, lambda: self._digests(finetune_id))
                check_upload(self.storage, self.limits, current, file, upload.path, base)
                return commit_asset(self._sessions, self.store, account_id, ref, finetune_id, file, upload)
        except BaseException as exc:
            self.storage.discard(upload)
            if isinstance(exc, FinetuneNotFound):  # deleted meanwhile: leave no directory behind
                self.storage.remove_if_empty(finetune_id)
            raise

    def _accepted(self, finetune_id: str, ref: str) -> Finetune:
        with self._sessions() as s:
            row = s.get(FinetuneRow, finetune_id)
            if row is None:
                raise FinetuneNotFound(ref)
            return to_finetune(row, self.store)

    def adapter_for(self, account_id: str, model: str, ref: str) -> tuple[Finetune, AdapterRef]:
        """The adapter a run request names: visible to the account, made for `model`, and complete."""
        finetune = self.finetune_for_run(account_id, model, ref)
        # A remote store's copies are fetched into the local tier here, before the engine reads them.
        self.store.materialize(finetune.id, tuple(AssetFile), lambda: self._digests(finetune.id))
        return finetune, AdapterRef(key=finetune.id, path=str(self.storage.directory(finetune.id)))

    def finetune_for_run(self, account_id: str, model: str, ref: str) -> Finetune:
        """The finetune a run request names, checked as `adapter_for` does, with no file fetched."""
        with self._sessions() as s:
            finetune = to_finetune(resolve(s, account_id, ref, own_only=False, model=model), self.store)
        if not finetune.ready:
            missing = " and ".join(f.value for f in finetune.missing_files)
            raise InvalidFinetune(f"finetune {finetune.name} ({finetune.id}) is missing {missing}")
        return finetune

    def _digests(self, finetune_id: str) -> dict[AssetFile, AssetDigest]:
        with self._sessions() as s:
            return asset_digests(s, finetune_id)
