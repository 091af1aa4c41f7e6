"""Bearer-token authentication of the account routes (10000 / 7003)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from loraserve.api.context import get_context
from loraserve.errors import AuthenticationError, RouteNotFound
from loraserve.registry import Registry


def bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError()
    return token


async def authenticated_account(request: Request, account_id: str) -> str:
    """The path's account id once the token is checked against it.

    A token that passed a moment ago is taken from the registry's token cache on the event loop (under
    overload a refusal must not wait for a worker thread or the database); otherwise the database is
    asked from a worker thread. The token is looked for first so that a request without one learns
    nothing about the account.
    """
    token = bearer_token(request)
    registry = get_context(request).registry
    if not registry.token_cache.hit(account_id, token):
        await run_in_threadpool(_check, registry, request.url.path, account_id, token)
    return account_id


def _check(registry: Registry, path: str, account_id: str, token: str) -> None:
    if not registry.account_exists(account_id):
        raise RouteNotFound(path)
    registry.authenticate(account_id, token)


Account = Annotated[str, Depends(authenticated_account)]
