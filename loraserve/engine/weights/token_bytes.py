"""Each token's own bytes, for reporting logprobs token by token.

Decoding one token alone does not give them: a byte-level token may hold part of a UTF-8 character
(it decodes to U+FFFD), and sentencepiece decoders drop the leading space of the first piece. So the
bytes are read from the vocabulary entry itself: byte-level BPE (GPT-2 style) spells each byte as one
printable character, sentencepiece spells a space as U+2581 and a raw byte as `<0xNN>`, and special
tokens are their text.
"""

from __future__ import annotations

from loraserve.engine.weights.tokenizer import Tokenizer

_SPACE_PIECE = "\u2581"


def _gpt2_byte_of_char() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others are
    shifted to U+0100 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


_BYTE_OF_CHAR = _gpt2_byte_of_char()


class TokenBytes:
    """token id -> its bytes, computed on first use and kept (the vocabulary never changes)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        # A byte-level vocabulary holds the characters of a space and a newline byte as tokens of their
        # own (not every byte's: those UTF-8 never uses may be missing).
        self._byte_level = not tokenizer.byte_token_ids and all(
            tokenizer.token_to_id(c) is not None for c in ("\u0120", "\u010a"))
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._bytes(token_id)
        return cached

    def _bytes(self, token_id: int) -> bytes:
        tok = self._tokenizer
        piece = tok.id_to_token(token_id)
        if piece is None:  # past the vocabulary (a model whose head is wider than its tokenizer)
            return b""
        if token_id in tok.special_ids:
            return piece.encode()
        if token_id in tok.byte_token_ids:
            return bytes([int(piece[3:5], 16)])
        if self._byte_level and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        return piece.replace(_SPACE_PIECE, " ").encode()
