"""The token cache: a busy account costs the database one query a second, and revocation is honoured at
once through the same registry, within the TTL through another one (another gateway, the CLI)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraserve.errors import AuthenticationError
from loraserve.registry import Registry
from loraserve.registry.token_cache import TOKEN_CACHE_TTL_S, TokenCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_entries_live_for_the_ttl_only() -> None:
    clock = Clock()
    cache = TokenCache(ttl_s=1.0, clock=clock)
    assert not cache.hit("alice", "t0k")
    cache.put("alice", "t0k")
    assert cache.hit("alice", "t0k")
    assert not cache.hit("bob", "t0k") and not cache.hit("alice", "t0k2")  # the pair, not the token
    clock.now += 0.99
    assert cache.hit("alice", "t0k")
    clock.now += 0.02
    assert not cache.hit("alice", "t0k")
    cache.put("alice", "t0k")
    cache.clear()
    assert not cache.hit("alice", "t0k")


def test_bounded_and_zero_ttl_keeps_nothing() -> None:
    clock = Clock()
    cache = TokenCache(ttl_s=1.0, max_entries=3, clock=clock)
    for i in range(10):
        cache.put("a", f"token-{i}")
    assert sum(cache.hit("a", f"token-{i}") for i in range(10)) <= 3 and cache.hit("a", "token-9")
    off = TokenCache(ttl_s=0.0)
    off.put("a", "t")
    assert not off.hit("a", "t")
    with pytest.raises(ValueError, match="ttl_s"):
        TokenCache(ttl_s=-1)
    with pytest.raises(ValueError, match="max_entries"):
        TokenCache(max_entries=0)


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Registry, Registry]]:
    # Two registries on one database: two gateways, or a gateway and the `loraserve token` command.
    with Registry.open(tmp_path / "data") as first, Registry.open(tmp_path / "data") as second:
        yield first, second


def test_revocation_through_the_same_registry_is_at_once(two: tuple[Registry, Registry]) -> None:
    reg, _ = two
    token = reg.create_token("alice")
    reg.authenticate("alice", token)
    assert reg.token_cache.hit("alice", token)
    reg.revoke_token(token)
    assert not reg.token_cache.hit("alice", token)
    with pytest.raises(AuthenticationError):
        reg.authenticate("alice", token)
    again = reg.create_token("alice")
    reg.authenticate("alice", again)
    reg.revoke_all_tokens("alice")
    assert not reg.token_cache.hit("alice", again)


def test_revocation_elsewhere_is_honoured_within_the_ttl(two: tuple[Registry, Registry]) -> None:
    gateway, other = two
    token = gateway.create_token("alice")
    gateway.authenticate("alice", token)
    other.revoke_token(token)
    revoked_at = time.monotonic()
    while gateway.token_cache.hit("alice", token):
        time.sleep(0.01)
    assert time.monotonic() - revoked_at <= TOKEN_CACHE_TTL_S + 0.1  # + this loop's polling
    with pytest.raises(AuthenticationError):
        gateway.authenticate("alice", token)
    assert not gateway.token_cache.hit("alice", token)  # failures are never cached
