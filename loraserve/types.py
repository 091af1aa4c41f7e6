"""Plain data shared by the engine and the server.

Nothing here imports torch: the API layer talks to the engine only through these types and the
`Backend` protocol, so the server can be type-checked and imported without the engine's weight.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

# The seven projections a Llama-family decoder layer has, in PEFT's names. Adapters may target any subset.
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens or the context window reached
    ABORT = "abort"  # the caller went away (abort(request_id))
    ERROR = "error"  # the engine could not run the request (adapter failed to load, ...)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; defaults are the Workers AI ones (contract section 1)."""

    max_tokens: int = 256
    temperature: float = 0.6  # 0 means greedy
    top_p: float = 1.0  # values >= 1 mean no cut
    top_k: int = 0  # 0 means no cut
    seed: int | None = None  # same seed + same input = same output, whatever else shares the batch
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output; 1 means off
    frequency_penalty: float = 0.0  # OpenAI style, over output tokens; 0 means off
    presence_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()  # extra stops beside the model's EOS
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError("temperature must be in [0, 5]")
        if not 0.0 <= self.top_p <= 2.0:
            raise ValueError("top_p must be in [0, 2]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 <= self.repetition_penalty <= 2.0:
            raise ValueError("repetition_penalty must be in [0, 2]")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter on disk, in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

    `key` identifies the adapter in the engine's caches (the finetune id); two refs with the same key
    must point at the same files.
    """

    key: str
    path: str


@dataclass(frozen=True)
class StreamEvent:
    """One step of a generation's output as the server sees it.

    `text` is a valid UTF-8 delta (never half a character). The last event has `finish_reason` set.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    error: str | None = None


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ModelInfo:
    """What the server and the registry need to know about a loaded base model."""

    context_window: int
    num_layers: int
    vocab_size: int
    # PEFT target name -> (in_features, out_features) of that projection; adapters are checked against it.
    lora_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    architecture: str = "llama"  # what adapter_config.json's model_type should say (llama / mistral / ...)


class Backend(Protocol):
    """A loaded model that can generate. Implemented by `loraserve.engine.async_engine.AsyncEngine`."""

    @property
    def info(self) -> ModelInfo: ...

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The model's chat template applied, ready to tokenize, ending with the assistant's turn open."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the model's BOS where the model adds one; special tokens parsed."""
        ...

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: AdapterRef | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Queue a request; iterate its events. Raises ValueError when it can never fit the context.

        Requests share cached prompt prefixes only with requests of the same `cache_salt` (the server
        passes the account, so no tenant can time another's prompts)."""
        ...

    def is_full(self) -> bool:
        """True while `generate` would refuse a new request (queue full): callers may refuse early,
        before spending anything on it."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request now: its KV blocks and adapter pin are freed at once. Unknown ids are ignored."""
        ...

    def forget_adapter(self, key: str) -> None:
        """Drop a deleted adapter from every cache tier."""
        ...

    def stats(self) -> dict[str, float]:
        """Gauges for /metrics and /healthz: queue depth, KV blocks used/free, adapters resident."""
        ...
