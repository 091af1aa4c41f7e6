"""What every Backend does with text before an engine sees token ids: the model's chat template applied and
the result tokenized, beside the ModelInfo it reports. Shared by the in-process engine (async_engine.py), the
client of an engine process (core_process/client.py) and the cluster gateway's backend (cluster/backend.py).
Torch-free."""

from __future__ import annotations

from collections.abc import Sequence

from loraserve.chat_template import ChatTemplate
from loraserve.engine.weights.tokenizer import Tokenizer
from loraserve.types import ChatMessage, ModelInfo


class TextFace:
    """Mixed into a Backend, which sets these three in its constructor."""

    tokenizer: Tokenizer
    chat_template: ChatTemplate
    _info: ModelInfo

    @property
    def info(self) -> ModelInfo:
        return self._info

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return self.chat_template.render(messages)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)
