"""A checkpoint's tensor names as the engine takes them.

A multimodal wrapper (Gemma3ForConditionalGeneration, Mistral3ForConditionalGeneration) is served as its
text model: its decoder's tensors get the text model's own names, its vision tower and projector are left
out. Both layouts transformers has written are read: `language_model.model.X` and
`language_model.lm_head.weight` (the Hub's files, and what transformers 5 saves again), and
`model.language_model.X` with `lm_head.weight` (what transformers 4.52 to 4.57 saved).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Buffers some old checkpoints saved beside the weights; the engine computes them, so they are dropped.
_ROTARY_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_WRAPPED_TEXT = (("language_model.model.", "model."), ("model.language_model.", "model."),
                 ("language_model.lm_head.", "lm_head."))
_WRAPPED_OTHERS = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                   "model.multi_modal_projector.")


@dataclass(frozen=True)
class CheckpointNames:
    wrapped: bool  # a multimodal wrapper's checkpoint, served as its text model

    def engine_name(self, stored: str) -> str | None:
        """The engine's (HF text model's) name of a stored tensor, None for one the engine leaves out; a name
        it does not know is kept, for the caller to refuse."""
        if self.wrapped:
            if stored.startswith(_WRAPPED_OTHERS):
                return None
            for prefix, replacement in _WRAPPED_TEXT:
                if stored.startswith(prefix):
                    stored = replacement + stored.removeprefix(prefix)
                    break
        return None if _ROTARY_BUFFER.fullmatch(stored) else stored
