"""Streaming text out of generated token ids, one delta per token, never half a character.

Decoding each token alone is wrong twice over: a character may be split across byte tokens (emoji,
CJK), and sentencepiece decoders drop the leading space of the first token they see. So, as vLLM
does, we decode a short window that starts a few tokens back (`prefix_offset`), compare it with the
decode of the window without the new tokens (up to `read_offset`), and emit the difference once it
no longer ends in U+FFFD, the mark of an unfinished UTF-8 sequence. The window slides forward on
every emission, so the work per token is bounded by the window, not by the length of the text.
"""

from __future__ import annotations

from collections.abc import Sequence

from loraserve.engine.weights.tokenizer import Tokenizer

# How far back the first window reaches into the prompt, so the first generated token is decoded in
# context (its leading space survives, a character the prompt left unfinished can complete).
_PROMPT_CONTEXT = 5
# Past this many tokens held back, a trailing U+FFFD is taken as final (the model emitted invalid
# UTF-8) rather than unfinished: no UTF-8 character is longer than 4 bytes, so a real one would have
# completed long before. This is what keeps a stream of garbage bytes from growing the window forever.
_MAX_HELD_TOKENS = 16
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's generated ids into text deltas. Special tokens produce no text."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None) -> None:
        self._tokenizer = tokenizer
        context = list(prompt_ids[-_PROMPT_CONTEXT:]) if prompt_ids else []
        # Only the window ever gets decoded, so only the window is kept.
        self._ids: list[int] = context
        self._read_offset = len(context)  # ids[:read_offset] have been emitted (or belong to the prompt)
        self._prefix_len = len(self._decode(context))  # chars of decode(ids[:read_offset])

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes; empty while a character is still unfinished."""
        if token_id in self._tokenizer.special_ids:
            # Skipped outright rather than kept in the window: a run of them must not grow it.
            return ""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back, at the end of the generation (an unfinished character as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if not self._ids:
            return ""
        text = self._decode(self._ids)
        forced = final or len(self._ids) - self._read_offset >= _MAX_HELD_TOKENS
        unfinished = text.endswith(_REPLACEMENT) or self._ids[-1] in self._tokenizer.byte_token_ids
        if not forced and (unfinished or len(text) <= self._prefix_len):
            # Unfinished character (or a run of byte-fallback tokens, which decodes as one piece), or a
            # token that decodes to nothing: keep the window as it is, so what comes next is decoded in
            # the same context.
            return ""
        delta = text[self._prefix_len:]
        # Slide: the emitted tokens become the new context, the old context is dropped.
        self._ids = self._ids[self._read_offset:]
        self._read_offset = len(self._ids)
        self._prefix_len = len(self._decode(self._ids))
        return delta
