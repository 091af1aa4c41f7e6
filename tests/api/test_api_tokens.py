"""The token and account routes wrangler calls outside the AI API (loraserve/api/routes_tokens.py):
every token is an Account API Token, answered as Cloudflare answers for one."""

from __future__ import annotations

import httpx

from conftest import Account, LiveServer, fails


def test_user_routes_say_this_is_an_account_token(server: LiveServer, account: Account) -> None:
    root = f"{server.base_url}/client/v4"
    fails(httpx.get(f"{root}/user/tokens/verify", headers=account.headers), 401, 1000)
    fails(httpx.get(f"{root}/user", headers=account.headers), 403, 9109)


def test_accounts_and_account_token_verify(server: LiveServer, account: Account) -> None:
    root = f"{server.base_url}/client/v4"
    listed = httpx.get(f"{root}/accounts", headers=account.headers).json()
    assert listed["success"] is True and [a["id"] for a in listed["result"]] == [account.id]
    assert listed["result_info"]["total_pages"] == 1
    verified = httpx.get(f"{root}/accounts/{account.id}/tokens/verify", headers=account.headers).json()
    assert verified["success"] is True and verified["result"]["status"] == "active"
    other = server.new_account("other")
    for url, headers in ((f"{root}/accounts", {"Authorization": "Bearer nope"}), (f"{root}/accounts", {}),
                         (f"{root}/accounts/{other.id}/tokens/verify", account.headers)):
        fails(httpx.get(url, headers=headers), 401, 10000)
    server.registry.revoke_token(account.token)
    fails(httpx.get(f"{root}/accounts", headers=account.headers), 401, 10000)
