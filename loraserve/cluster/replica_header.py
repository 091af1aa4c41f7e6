"""The `x-loraserve-replica` response header: which engine replica served the request, as Cloudflare
names its data centre in `cf-ray`; and `x-loraserve-gateway`, on every response: which gateway replica
answered it (with several gateways, Serve's proxy spreads requests over them).

The middleware gives each HTTP request a `ServedBy` slot through a context variable; the gateway's
backend, called somewhere below with that context (or a copy of it: tasks and worker threads copy
contexts, and the slot is shared by reference), fills it in when a replica's first streamed item names
itself. The header is added as the response starts: a whole answer starts after its run ended, a stream
after its first event, so the replica is known by then. Responses that reached no engine replica carry no
`x-loraserve-replica`.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REPLICA_HEADER = "x-loraserve-replica"
GATEWAY_HEADER = "x-loraserve-gateway"


@dataclass
class ServedBy:
    replica: str | None = None


_served_by: ContextVar[ServedBy | None] = ContextVar("loraserve_served_by", default=None)


def served_by() -> ServedBy | None:
    """The current HTTP request's slot; None outside one (a caller that is not the gateway's app)."""
    return _served_by.get()


class ReplicaHeaderMiddleware:
    """`gateway`: this gateway replica's name, sent on every response; None sends no gateway header."""

    def __init__(self, app: ASGIApp, gateway: str | None = None) -> None:
        self.app = app
        self._gateway = [(GATEWAY_HEADER.encode(), gateway.encode())] if gateway is not None else []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        slot = ServedBy()

        async def send_naming_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                named = [(REPLICA_HEADER.encode(), slot.replica.encode())] if slot.replica is not None else []
                message = {**message, "headers": [*message.get("headers", []), *self._gateway, *named]}
            await send(message)

        token = _served_by.set(slot)
        try:
            await self.app(scope, receive, send_naming_replica)
        finally:
            _served_by.reset(token)
