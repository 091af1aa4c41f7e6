"""API tokens: random secrets handed out once and kept only as a hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets

TOKEN_BYTES = 32
# Longer input than any token we issue is refused before hashing: no work for junk headers.
MAX_TOKEN_CHARS = 256


def new_token() -> str:
    # Never a leading "-": pasted after `loraserve token revoke` it would parse as an option. Redrawing
    # the 1 in 64 such tokens costs well under a bit of entropy.
    while (token := secrets.token_urlsafe(TOKEN_BYTES)).startswith("-"):
        pass
    return token


def hash_token(token: str) -> str:
    # A plain (unsalted) hash is enough: tokens carry 256 bits of entropy, nothing to brute-force,
    # and an unsalted digest can be looked up by index.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def plausible_token(token: object) -> bool:
    return isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_CHARS


def digests_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
