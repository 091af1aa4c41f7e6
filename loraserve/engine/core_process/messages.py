"""What a request's add, abort and adapter forget look like on their way to an engine: through the pipe to the
engine process (plain picklable data), or into AsyncEngine's inbox in the same process.

To the engine: `AddRequest`, `AbortRequest`, `ForgetAdapter`, `Shutdown`. From it: `Started` (where the
tokenizer is), then `Ready` (or `LoadFailed`), then one `StepOut` per step that produced something.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.engine.core.sequence import TokenScores
from loraserve.types import AdapterRef, FinishReason, ModelInfo, SamplingParams


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    adapter: AdapterRef | None
    cache_salt: str | None
    session_id: str | None  # the client's session key (Backend.generate): an engine itself ignores it


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class ForgetAdapter:
    key: str


@dataclass(frozen=True)
class Shutdown:
    """Finish: in-flight requests end with an error event, then the process exits."""


ToEngine = AddRequest | AbortRequest | ForgetAdapter | Shutdown


# One request's output of one step, a plain tuple (a step's message pickles ~5x faster than with a
# NamedTuple; channel_bench.py): the request id, its new token (None when it ended without one: an abort,
# an error, max_tokens 0), the finish reason once it ended, the tokens generated so far, the error
# message, when asked for, the token's scores and the prompt's, and the prompt tokens the prefix cache
# held at admission (Sequence.num_cached_prompt). The client makes the StreamEvent: text by its
# detokenizer, logprobs named by its tokenizer's bytes.
TokenOut = tuple[str, int | None, FinishReason | None, int, str | None, TokenScores | None,
                 list[TokenScores] | None, int]


def ended(request_id: str, finish: FinishReason, error: str | None = None) -> TokenOut:
    """A request's end without a token: an abort, or an error (its message)."""
    return request_id, None, finish, 0, error, None, None, 0


@dataclass(frozen=True)
class Snapshot:
    """The engine's gauges after a step (`LLMEngine.stats()`), and how many AddRequests it had taken by
    then: the client counts the ones sent since as queued, as AsyncEngine counts its inbox."""

    stats: dict[str, float]
    adds_taken: int


@dataclass(frozen=True)
class Started:
    """Sent before the weights load, so the API process reads the tokenizer meanwhile."""

    tokenizer_file: str  # a .gguf file or a Hugging Face directory


@dataclass(frozen=True)
class Ready:
    info: ModelInfo
    snapshot: Snapshot


@dataclass(frozen=True)
class LoadFailed:
    error: BaseException  # what load_engine raised (a RuntimeError naming it when it does not pickle)


@dataclass(frozen=True)
class StepOut:
    outputs: list[TokenOut]
    snapshot: Snapshot | None  # None: unchanged since the last one sent


FromEngine = Started | Ready | LoadFailed | StepOut
