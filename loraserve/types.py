"""Plain data shared by the engine and the server.

Nothing here imports torch: the API layer talks to the engine only through these types and the
`Backend` protocol, so the server can be type-checked and imported without the engine's weight.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from loraserve.peft import LORA_TARGETS as LORA_TARGETS  # PEFT's names of the seven projections


class QueueFull(Exception):
    """The engine's queue is at its limit: the request was not taken; it may be tried again later."""


class PromptTooLong(ValueError):
    """The prompt plus max_tokens exceed the context window: the request can never run as it is (a
    ValueError, as any other request the engine cannot take)."""

    def __init__(self, prompt_tokens: int, max_tokens: int, window: int) -> None:
        super().__init__(f"prompt ({prompt_tokens}) + max_tokens ({max_tokens}) exceeds the context "
                         f"window ({window})")
        self.needed = prompt_tokens + max_tokens
        self.window = window


def check_context_window(prompt_tokens: int, max_tokens: int, window: int) -> None:
    """The context-window rule, for every layer that admits requests: raises PromptTooLong."""
    if prompt_tokens + max_tokens > window:
        raise PromptTooLong(prompt_tokens, max_tokens, window)


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens or the context window reached
    ABORT = "abort"  # the caller went away (abort(request_id))
    ERROR = "error"  # the engine could not run the request (adapter failed to load, ...)
    # The engine stopped under the request (its step raised, it shut down, or its process died): not the
    # request's doing, so the API answers "try again" rather than blaming the request or its adapter.
    LOST = "lost"


@dataclass(frozen=True)
class Limit:
    """The inclusive range a sampling value must lie in; None leaves that side open."""

    ge: int | float | None = None
    le: int | float | None = None

    def check(self, name: str, value: float) -> None:
        if (self.ge is not None and value < self.ge) or (self.le is not None and value > self.le):
            raise ValueError(f"{name} must be {self}")

    def __str__(self) -> str:
        if self.le is None:
            return f">= {self.ge}"
        if self.ge is None:
            return f"<= {self.le}"
        return f"in [{self.ge}, {self.le}]"


# Each sampling range, declared once. The engine's own (SamplingParams checks them) are the widest; the
# two API faces publish and enforce theirs, narrower where their contract is (their schemas read these).
ENGINE_MAX_TOKENS = Limit(ge=0)  # 0 scores the prompt (prompt_logprobs) and generates nothing
MAX_TOKENS = Limit(ge=1)
OPENAI_COMPLETION_MAX_TOKENS = Limit(ge=0)  # OpenAI's legacy completions take 0 (echo: score the prompt)
# Alternatives reported per position. Each costs a top-k over the vocabulary and a little memory per
# token, so the engine bounds them; the completions face takes OpenAI's 5, chat OpenAI's 20.
LOGPROBS = Limit(0, 20)
OPENAI_COMPLETION_LOGPROBS = Limit(0, 5)
OPENAI_CHAT_TOP_LOGPROBS = Limit(0, 20)
TEMPERATURE = Limit(0, 5)
TOP_P = Limit(0, 2)
TOP_K = Limit(ge=0)  # 0 means no cut
REPETITION_PENALTY = Limit(0, 2)
PENALTY = Limit(-2, 2)  # frequency and presence penalties: OpenAI's range, the engine takes all of it
WORKERS_AI_TOP_K = Limit(1, 50)  # the OpenAI face takes top_k too, as vLLM does, with these bounds
WORKERS_AI_SEED = Limit(1, 9_999_999_999)
WORKERS_AI_PENALTY = Limit(0, 2)  # /run's frequency and presence penalties
OPENAI_SEED = Limit(-(2**63), 2**63 - 1)


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
    # Log-probabilities of the model's raw next-token distribution (before temperature, top-k/p and
    # penalties): None asks for none; k reports each token's own and the k most likely alternatives.
    logprobs: int | None = None  # of each generated token
    prompt_logprobs: int | None = None  # of each prompt token but the first (nothing predicts it)

    def __post_init__(self) -> None:
        ENGINE_MAX_TOKENS.check("max_tokens", self.max_tokens)
        TEMPERATURE.check("temperature", self.temperature)
        TOP_P.check("top_p", self.top_p)
        TOP_K.check("top_k", self.top_k)
        REPETITION_PENALTY.check("repetition_penalty", self.repetition_penalty)
        PENALTY.check("frequency_penalty", self.frequency_penalty)
        PENALTY.check("presence_penalty", self.presence_penalty)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                LOGPROBS.check(name, value)

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
class TokenLogprob:
    """A token and its log-probability. `token` is its bytes as the tokenizer spells them: a byte-level
    token may hold part of a UTF-8 character, so it is not always text on its own."""

    token_id: int
    token: bytes
    logprob: float


@dataclass(frozen=True)
class PositionLogprobs:
    """One position of the text: its token (generated, or the prompt's), that token's logprob (None for
    the prompt's first token: nothing predicts it), and the k most likely tokens there, most likely
    first (the token itself may be among them)."""

    token_id: int
    token: bytes
    logprob: float | None
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class StreamEvent:
    """One step of a generation's output as the server sees it.

    `text` is a valid UTF-8 delta (never half a character). The last event has `finish_reason` set.
    `logprobs` has one entry per token generated in this step when the request asked for them
    (`SamplingParams.logprobs`); the text of a token may arrive in a later event than its logprobs.
    `prompt_logprobs`, when asked for, comes whole with the first event: one entry per prompt token.
    `cached_tokens`: the prompt tokens whose K/V the prefix cache held when the request was first
    admitted (so 0 in an event that ends a request before it ran).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprobs: tuple[PositionLogprobs, ...] = ()
    prompt_logprobs: tuple[PositionLogprobs, ...] | None = None
    cached_tokens: int = 0


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
    weights: str = ""  # how the weights are held, for people: "gguf" (blocks as stored), "float32", ...


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
        session_id: str | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Queue a request; iterate its events. Refuses it at once as `admit` does.

        Requests share cached prompt prefixes only with requests of the same `cache_salt` (the server
        passes the account, so no tenant can time another's prompts). `session_id` is the client's opaque
        session key (Workers AI's `x-session-affinity`): a backend spread over several engines sends a
        session's requests to the same one, so that its cached prefix is there; one engine ignores it."""
        ...

    def admit(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raises what `generate` would raise for such a request now: PromptTooLong (never fits the
        context window), QueueFull (try again later). Callers may ask before spending anything more."""
        ...

    def is_full(self) -> bool:
        """True while `generate` would refuse any new request (QueueFull): callers may refuse early,
        before even tokenizing it."""
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
