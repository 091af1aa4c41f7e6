"""Cloudflare's token and account routes that wrangler calls outside the AI API: after an
authentication failure, and for `wrangler whoami`, it asks who the token belongs to. Every token here
is what Cloudflare calls an *Account API Token*, and these answer as Cloudflare does for one:
`/user/tokens/verify` refuses it (code 1000, which wrangler reads as "an account token"), `/user` has no
user (9109), and `/accounts` and `/accounts/{id}/tokens/verify` name its one account."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from loraserve.api.auth import Account, bearer_token
from loraserve.api.context import get_context
from loraserve.api.envelope import success, success_response
from loraserve.errors import WorkersAIError

# Not in /openapi.json: compatibility plumbing for wrangler, not part of the Workers AI API.
router = APIRouter(include_in_schema=False)


class InvalidUserToken(WorkersAIError):
    code, status = 1000, 401

    def __init__(self) -> None:
        super().__init__("Invalid API Token")


class NoUser(WorkersAIError):
    code, status = 9109, 403

    def __init__(self) -> None:
        super().__init__("Unauthorized to access requested resource")


@router.get("/user/tokens/verify")
async def verify_user_token() -> JSONResponse:
    raise InvalidUserToken()


@router.get("/user")
async def user() -> JSONResponse:
    raise NoUser()


@router.get("/accounts")
async def list_accounts(request: Request) -> JSONResponse:
    info = await run_in_threadpool(get_context(request).registry.token, bearer_token(request))
    account = {"id": info.account_id, "name": info.account_id, "type": "standard"}
    # wrangler pages through this list: result_info says there is one page.
    pages = {"page": 1, "per_page": 20, "count": 1, "total_count": 1, "total_pages": 1}
    return JSONResponse({**success([account]), "result_info": pages})


@router.get("/accounts/{account_id}/tokens/verify")
async def verify_account_token(request: Request, account: Account) -> JSONResponse:
    info = await run_in_threadpool(get_context(request).registry.token, bearer_token(request))
    return success_response({"id": str(info.id), "status": "active"})
