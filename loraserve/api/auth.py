"""Bearer-token authentication of the account routes (10000 / 7003)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from loraserve.api.context import get_context
from loraserve.errors import AuthenticationError, RouteNotFound


def bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError()
    return token


def authenticated_account(request: Request, account_id: str) -> str:
    """The path's account id once the token is checked against it.

    A plain `def`: FastAPI runs it in its thread pool, where blocking on SQLite is fine.
    The token is looked for first so that a request without one learns nothing about the account.
    """
    token = bearer_token(request)
    registry = get_context(request).registry
    if not registry.account_exists(account_id):
        raise RouteNotFound(request.url.path)
    registry.authenticate(account_id, token)
    return account_id


Account = Annotated[str, Depends(authenticated_account)]
