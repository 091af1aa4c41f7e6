"""What an uploaded adapter file must pass before it is installed: its own checks, then the cross-check
against the other file when that one is already accepted."""

from __future__ import annotations

from pathlib import Path

from loraserve.registry.limits import RegistryLimits
from loraserve.registry.records import AssetFile, Finetune
from loraserve.registry.storage import FinetuneStorage
from loraserve.registry.validate import (
    MAX_CONFIG_BYTES,
    check_against_config,
    parse_adapter_config,
    read_adapter_tensors,
    validate_safetensors,
)
from loraserve.types import ModelInfo


def size_cap(file: AssetFile, limits: RegistryLimits) -> int:
    """Bytes an upload may have; a config is refused long before a 300 MB weights limit."""
    if file is AssetFile.CONFIG:
        return min(limits.max_file_bytes, MAX_CONFIG_BYTES)
    return limits.max_file_bytes


def check_upload(
    storage: FinetuneStorage,
    limits: RegistryLimits,
    current: Finetune,
    file: AssetFile,
    path: Path,
    base: ModelInfo,
) -> None:
    """Raises InvalidFinetune unless the file at `path` may become `current`'s `file`.

    `current` says which files are accepted (in the DB and on disk); only those are cross-checked, so a
    file left by a crash between rename and commit is never trusted.
    """
    if file is AssetFile.CONFIG:
        config = parse_adapter_config(path.read_bytes(), base, limits)
        if current.has_weights:
            weights = read_adapter_tensors(storage.path(current.id, AssetFile.WEIGHTS), base, limits)
            check_against_config(weights, config)
        return
    stored = None
    if current.has_config:
        stored = parse_adapter_config(storage.path(current.id, AssetFile.CONFIG).read_bytes(), base, limits)
    validate_safetensors(path, base, stored, limits)
