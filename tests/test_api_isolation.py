"""Two accounts on one server: a private finetune is invisible to the other account, whatever the
route and whether it is named by id or by name."""

from __future__ import annotations

from typing import Any

import httpx

from conftest import LiveServer, create_finetune


def code(response: httpx.Response) -> tuple[int, int]:
    return response.status_code, response.json()["errors"][0]["code"] if response.status_code != 200 else 0


def test_private_finetunes_are_invisible_to_other_accounts(server: LiveServer, peft_adapter: Any) -> None:
    alice, bob = server.new_account("alice"), server.new_account("bob")
    folder = peft_adapter()
    secret = create_finetune(server, bob, "bobs-secret", folder)
    alice_url = server.ai_url(alice) + "/finetunes"
    for ref in (secret["id"], "bobs-secret"):
        run = httpx.post(server.run_url(alice), headers=alice.headers, json={"prompt": "x", "lora": ref})
        assert code(run) == (404, 3037)
        assert code(httpx.get(f"{alice_url}/{ref}", headers=alice.headers)) == (404, 3037)
        assert code(httpx.delete(f"{alice_url}/{ref}", headers=alice.headers)) == (404, 3037)
        assert code(httpx.post(f"{alice_url}/{ref}/finetune-assets", headers=alice.headers,
                               data={"file_name": "adapter_config.json"},
                               files={"file": ("blob", (folder / "adapter_config.json").read_bytes())})) == (404, 3037)
    assert httpx.get(alice_url, headers=alice.headers).json()["result"] == []
    # Alice's token does not open Bob's account URL either.
    bob_url = server.ai_url(bob) + "/finetunes"
    assert code(httpx.get(bob_url, headers=alice.headers)) == (401, 10000)
    # Nothing of Bob's was touched.
    assert [f["id"] for f in httpx.get(bob_url, headers=bob.headers).json()["result"]] == [secret["id"]]
    ok = httpx.post(server.run_url(bob), headers=bob.headers, json={"prompt": "x", "lora": "bobs-secret", "max_tokens": 1})
    assert ok.status_code == 200


def test_same_name_in_two_accounts(server: LiveServer, peft_adapter: Any) -> None:
    alice, bob = server.new_account("alice"), server.new_account("bob")
    a = create_finetune(server, alice, "shared-name", peft_adapter())
    b = create_finetune(server, bob, "shared-name", peft_adapter(r=4))
    assert a["id"] != b["id"]
    for who, mine in ((alice, a), (bob, b)):
        got = httpx.get(server.ai_url(who) + "/finetunes/shared-name", headers=who.headers).json()["result"]
        assert got["id"] == mine["id"]
    assert httpx.delete(server.ai_url(alice) + "/finetunes/shared-name", headers=alice.headers).status_code == 200
    assert httpx.get(server.ai_url(bob) + "/finetunes/shared-name", headers=bob.headers).status_code == 200


