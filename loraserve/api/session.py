"""Workers AI's `x-session-affinity` header: a client's opaque key for a session (a conversation, an agent
run) whose requests share a growing prompt prefix.

Workers AI sends a session's requests to the same instance, where its prefix is already in the prefix cache.
On one server every request already shares that cache, so here the key only travels with the request
(`Backend.generate`'s `session_id`); a backend spread over several engines routes on it (the Ray Serve
cluster sends a session's requests to one engine replica: loraserve/cluster/router.py). It is never
required, and a value that is not a sane routing key is refused (5006) rather than silently dropped.
"""

from __future__ import annotations

import re

from starlette.requests import Request

from loraserve.errors import BadInput

SESSION_HEADER = "x-session-affinity"
MAX_SESSION_CHARS = 256  # room for any UUID, hash or "<user>:<conversation>" key
# Printable ASCII, space included. Starlette reads header bytes as Latin-1, so a byte above 0x7e (UTF-8 text)
# shows here as a character outside the range and is refused too.
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


def session_affinity(request: Request) -> str | None:
    """The request's session key; None without the header, or with an empty one."""
    values = request.headers.getlist(SESSION_HEADER)
    if len(values) > 1:
        raise BadInput(f"{SESSION_HEADER}: the header was sent more than once")
    value = values[0] if values else ""
    if not value:
        return None
    if len(value) > MAX_SESSION_CHARS:
        raise BadInput(f"{SESSION_HEADER}: at most {MAX_SESSION_CHARS} characters")
    if not _PRINTABLE.fullmatch(value):
        raise BadInput(f"{SESSION_HEADER}: only printable ASCII characters are allowed")
    return value
