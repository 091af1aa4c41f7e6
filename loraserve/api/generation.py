"""From a validated /run input to engine calls: templating, tokens, admission, adapter, events."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from loraserve import catalog
from loraserve.api.context import AppContext
from loraserve.api.schemas import PromptInput, RunInput
from loraserve.chat_template import unscoped_messages
from loraserve.errors import BadInput, CapacityExceeded, ContextWindowExceeded
from loraserve.types import AdapterRef, Backend, PromptTooLong, QueueFull, SamplingParams, StreamEvent


@dataclass(frozen=True)
class PreparedRun:
    request_id: str
    model_id: str
    backend: Backend
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterRef | None
    account_id: str  # the prefix-cache scope: one account's cached prompts never serve another's
    session_id: str | None  # x-session-affinity (session.py)

    def events(self) -> AsyncIterator[StreamEvent]:
        with engine_refusals():  # the queue may have filled since `prepare`
            return self.backend.generate(self.request_id, self.prompt_ids, self.params, self.adapter,
                                         self.account_id, self.session_id)

    def abort(self) -> None:
        self.backend.abort(self.request_id)


@contextmanager
def engine_refusals() -> Iterator[None]:
    """The engine's refusals as the API's errors: the one place they are translated."""
    try:
        yield
    except QueueFull:
        raise CapacityExceeded() from None
    except PromptTooLong as exc:
        raise ContextWindowExceeded(exc.needed, exc.window) from None


def prompt_text(backend: Backend, inputs: RunInput) -> str:
    """Contract section 2: raw prompts as they are, unscoped prompts and messages through the template."""
    try:
        if isinstance(inputs, PromptInput):
            if inputs.raw:
                return inputs.prompt
            return backend.render_chat(unscoped_messages(inputs.prompt))
        return backend.render_chat(inputs.chat())
    except ValueError as exc:  # the model's template refuses this conversation
        raise BadInput(f"messages: {exc}") from exc


def prepare(context: AppContext, account_id: str, model: str, inputs: RunInput,
            session_id: str | None) -> PreparedRun:
    """Everything before the engine. Blocking (tokenizer, SQLite): call it from a worker thread."""
    model_id = catalog.resolve(model, context.backends.keys(), lora=inputs.lora is not None)
    backend = context.backends[model_id]
    if backend.is_full():  # refused before the template, the tokenizer and the finetune lookup
        raise CapacityExceeded()
    params = inputs.sampling_params()
    prompt_ids = backend.encode(prompt_text(backend, inputs))
    with engine_refusals():  # refused before the finetune lookup, as before anything is queued
        backend.admit(len(prompt_ids), params.max_tokens)
    adapter = None
    if inputs.lora is not None:
        _, adapter = context.registry.adapter_for(account_id, model_id, inputs.lora)
    return PreparedRun(uuid.uuid4().hex, model_id, backend, prompt_ids, params, adapter, account_id,
                       session_id)

