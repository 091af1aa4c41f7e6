"""What the registry hands out: plain frozen records, shaped for the Workers AI JSON."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime

# Workers AI reports where an asset lives; ours all live on the server's disk under one name.
BUCKET_NAME = "loraserve-finetunes"


class AssetFile(enum.Enum):
    """The two files of a PEFT LoRA adapter, the only names an upload may carry."""

    CONFIG = "adapter_config.json"
    WEIGHTS = "adapter_model.safetensors"


class PublicOrder(enum.Enum):
    """Sort keys accepted by `Registry.list_public` (the API's `orderBy`)."""

    CREATED_AT = "created_at"
    MODIFIED_AT = "modified_at"
    NAME = "name"


def now_iso() -> str:
    """UTC now as Workers AI writes it: ISO 8601 with milliseconds and a Z."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Finetune:
    id: str
    account_id: str
    name: str
    description: str
    model: str
    public: bool
    created_at: str
    modified_at: str
    # True only when the DB records the file as accepted AND it is on disk.
    has_config: bool
    has_weights: bool

    @property
    def ready(self) -> bool:
        return self.has_config and self.has_weights

    @property
    def missing_files(self) -> tuple[AssetFile, ...]:
        present = {AssetFile.CONFIG: self.has_config, AssetFile.WEIGHTS: self.has_weights}
        return tuple(f for f, ok in present.items() if not ok)

    def to_api(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "model": self.model,
            "public": self.public,
            "created_at": self.created_at,
            "modified_at": self.modified_at,
        }


@dataclass(frozen=True)
class FinetuneAsset:
    id: str
    finetune_id: str
    file_name: str
    bucket_name: str
    created_at: str
    modified_at: str

    def to_api(self) -> dict[str, object]:
        return {
            "id": self.id,
            "finetune_id": self.finetune_id,
            "file_name": self.file_name,
            "bucket_name": self.bucket_name,
            "created_at": self.created_at,
            "modified_at": self.modified_at,
        }


@dataclass(frozen=True)
class TokenInfo:
    """A token's metadata; the token itself is never stored, so it cannot be shown again."""

    id: int
    account_id: str
    label: str
    created_at: str
    revoked_at: str | None

    @property
    def live(self) -> bool:
        return self.revoked_at is None
