"""Accounts and API tokens on a real SQLite registry."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraserve.errors import AuthenticationError
from loraserve.registry import Registry


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    with Registry.open(tmp_path / "data") as r:
        yield r


def test_token_authenticates_its_account_only(reg: Registry) -> None:
    assert not reg.account_exists("alice")
    token = reg.create_token("alice", label="laptop")
    assert reg.account_exists("alice")
    assert len(token) >= 43  # 32 random bytes, urlsafe base64
    reg.authenticate("alice", token)
    reg.create_token("bob")
    for account, tok in [
        ("bob", token),
        ("carol", token),
        ("alice", token + "x"),
        ("alice", ""),
        ("alice", token[:-1]),
        ("alice", "x" * 10_000),
        ("", token),
    ]:
        with pytest.raises(AuthenticationError) as info:
            reg.authenticate(account, tok)
        assert (info.value.code, info.value.status, info.value.message) == (
            10000,
            401,
            "Authentication error",
        )


def test_tokens_are_unique_and_an_account_may_hold_several(reg: Registry) -> None:
    tokens = {reg.create_token("alice") for _ in range(5)}
    assert len(tokens) == 5
    for t in tokens:
        reg.authenticate("alice", t)
    assert [t.label for t in reg.list_tokens("alice")] == [""] * 5


def test_revoke_stops_a_token_at_once(reg: Registry) -> None:
    keep, drop = reg.create_token("alice"), reg.create_token("alice")
    reg.authenticate("alice", drop)
    assert reg.revoke_token(drop) is True
    with pytest.raises(AuthenticationError):
        reg.authenticate("alice", drop)
    reg.authenticate("alice", keep)
    assert reg.revoke_token(drop) is False  # already revoked
    assert reg.revoke_token("never-issued") is False
    assert reg.revoke_token("") is False
    infos = reg.list_tokens("alice")
    assert [i.live for i in infos] == [True, False] and infos[1].revoked_at is not None


def test_revoke_all_tokens_of_one_account(reg: Registry) -> None:
    a = [reg.create_token("alice") for _ in range(3)]
    b = reg.create_token("bob")
    reg.revoke_token(a[0])
    assert reg.revoke_all_tokens("alice") == 2
    assert reg.revoke_all_tokens("alice") == 0
    assert reg.revoke_all_tokens("nobody") == 0
    for t in a:
        with pytest.raises(AuthenticationError):
            reg.authenticate("alice", t)
    reg.authenticate("bob", b)
    assert reg.account_exists("alice")  # the account outlives its tokens


def test_only_the_hash_is_stored(tmp_path: Path) -> None:
    with Registry.open(tmp_path) as reg:
        token = reg.create_token("alice")
    files = [p for p in tmp_path.iterdir() if p.name.startswith("registry.sqlite3")]
    assert files
    blob = b"".join(p.read_bytes() for p in files)  # the database, its WAL and shared memory
    assert token.encode() not in blob
    assert hashlib.sha256(token.encode()).hexdigest().encode() in blob
    with Registry.open(tmp_path) as reg:  # and it still works after a restart
        reg.authenticate("alice", token)


@pytest.mark.parametrize("account", ["", "a/b", "a b", "x" * 65, "ac\ncount"])
def test_bad_account_ids_are_refused(reg: Registry, account: str) -> None:
    with pytest.raises(ValueError, match="account id"):
        reg.create_token(account)
    assert not reg.account_exists(account)


def test_bad_labels_are_refused(reg: Registry) -> None:
    with pytest.raises(ValueError, match="label"):
        reg.create_token("alice", label="x" * 201)
    with pytest.raises(ValueError, match="label"):
        reg.create_token("alice", label="a\x00b")
    assert not reg.account_exists("alice")


def test_no_token_starts_with_a_dash() -> None:
    """A leading "-" would make `loraserve token revoke TOKEN` read the token as an option."""
    from loraserve.registry.tokens import new_token

    tokens = [new_token() for _ in range(2000)]  # about 31 would start with "-" otherwise
    assert not any(t.startswith("-") for t in tokens) and len(set(tokens)) == 2000
    assert all(len(t) == 43 for t in tokens)
