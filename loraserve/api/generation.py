"""From a validated /run input to engine calls: templating, tokens, context check, adapter, events."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loraserve import catalog
from loraserve.api.context import AppContext
from loraserve.api.envelope import InternalError
from loraserve.api.schemas import PromptInput, RunInput
from loraserve.chat_template import unscoped_messages
from loraserve.errors import (
    BadInput,
    CapacityExceeded,
    ContextWindowExceeded,
    InvalidFinetune,
    WorkersAIError,
)
from loraserve.types import AdapterRef, Backend, FinishReason, SamplingParams, StreamEvent

logger = logging.getLogger("loraserve.api")


@dataclass(frozen=True)
class PreparedRun:
    request_id: str
    model_id: str
    backend: Backend
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterRef | None
    account_id: str  # the prefix-cache scope: one account's cached prompts never serve another's

    def events(self) -> AsyncIterator[StreamEvent]:
        return self.backend.generate(self.request_id, self.prompt_ids, self.params, self.adapter, self.account_id)

    def abort(self) -> None:
        self.backend.abort(self.request_id)


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


def prepare(context: AppContext, account_id: str, model: str, inputs: RunInput) -> PreparedRun:
    """Everything before the engine. Blocking (tokenizer, SQLite): call it from a worker thread."""
    model_id = catalog.resolve(model, context.backends.keys(), lora=inputs.lora is not None)
    backend = context.backends[model_id]
    if backend.is_full():  # refused before the template, the tokenizer and the finetune lookup
        raise CapacityExceeded()
    params = inputs.sampling_params()
    prompt_ids = backend.encode(prompt_text(backend, inputs))
    window = backend.info.context_window
    if len(prompt_ids) + params.max_tokens > window:
        raise ContextWindowExceeded(len(prompt_ids) + params.max_tokens, window)
    adapter = None
    if inputs.lora is not None:
        _, adapter = context.registry.adapter_for(account_id, model_id, inputs.lora)
    return PreparedRun(uuid.uuid4().hex, model_id, backend, prompt_ids, params, adapter, account_id)


def event_error(run: PreparedRun, event: StreamEvent) -> WorkersAIError | None:
    """The API error for an event that reports a failure, if it does."""
    if event.finish_reason is not FinishReason.ERROR and event.error is None:
        return None
    if run.adapter is not None:
        # The one failure a caller can cause: an adapter that validated but would not load.
        return InvalidFinetune(f"Finetune {run.adapter.key} could not be loaded: {event.error}")
    logger.error("engine error on request %s (%s): %s", run.request_id, run.model_id, event.error)
    return InternalError()


def usage(run: PreparedRun, last: StreamEvent | None) -> dict[str, int]:
    prompt = last.prompt_tokens if last is not None else len(run.prompt_ids)
    completion = last.completion_tokens if last is not None else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
