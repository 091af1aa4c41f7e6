"""The registry: accounts, API tokens, finetunes and their validated adapter files.

Never imports torch: the API layer uses it directly, and `validate` is also a fuzzing target.
"""

from loraserve.registry.limits import RegistryLimits
from loraserve.registry.records import BUCKET_NAME, AssetFile, Finetune, FinetuneAsset, PublicOrder, TokenInfo
from loraserve.registry.registry import Registry
from loraserve.registry.validate import (
    AdapterConfig,
    AdapterTensors,
    parse_adapter_config,
    validate_safetensors,
)

__all__ = [
    "BUCKET_NAME",
    "AdapterConfig",
    "AdapterTensors",
    "AssetFile",
    "Finetune",
    "FinetuneAsset",
    "PublicOrder",
    "Registry",
    "RegistryLimits",
    "TokenInfo",
    "parse_adapter_config",
    "validate_safetensors",
]
