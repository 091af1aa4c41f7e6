"""The registry's knobs: what an account may store."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegistryLimits:
    """Per-deployment limits. The defaults beat the public service (rank 32, 300 MB, 100 finetunes)."""

    max_rank: int = 64
    max_file_bytes: int = 300 * 1024 * 1024
    max_finetunes_per_account: int = 100

    def __post_init__(self) -> None:
        for name in ("max_rank", "max_file_bytes", "max_finetunes_per_account"):
            value = getattr(self, name)
            # bool is an int in Python; a flag here is always a mistake.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RegistryLimits.{name} must be an integer >= 1, got {value!r}")
        if self.max_rank > 4096:
            raise ValueError("RegistryLimits.max_rank must be <= 4096")
