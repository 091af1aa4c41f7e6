"""The rate limit counted in Redis (`serve --redis-url`): the Lua script's sliding window on a real
redis-server, one account's limit held across two gateways, and 429 / 3040 while Redis is down, served
again once it is back. Skipped only where redis-server or the redis package is missing."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from loraserve.api import ServerSettings
from loraserve.api.ratelimit import MemoryRateLimiter, rate_limiter_for
from loraserve.cli import app as cli_app
from loraserve.errors import RateLimited
from loraserve.registry import Registry

from conftest import LORA_MODEL, fails, ok
from redis_helpers import RedisServer, gateway, require_redis_server

pytest.importorskip("redis", reason="the redis package is not installed (pip install -e '.[dev]')")
from loraserve.api.ratelimit_redis import RedisRateLimiter, RedisUnavailable

MakeLimiter = Callable[..., RedisRateLimiter]
BODY = {"prompt": "x", "max_tokens": 1}


@pytest.fixture
async def make_limiter(redis_server: RedisServer) -> AsyncIterator[MakeLimiter]:
    """`make_limiter(limit, window_s, url=..., key_prefix=...)`: limiters on keys no other test uses."""
    prefix = f"test-{uuid.uuid4().hex}:"
    made: list[RedisRateLimiter] = []

    def make(limit: int, window_s: float = 60.0, **options: Any) -> RedisRateLimiter:
        options.setdefault("key_prefix", prefix)
        made.append(RedisRateLimiter(options.pop("url", redis_server.url), limit, window_s, **options))
        return made[-1]

    yield make
    for limiter in made:
        await limiter.aclose()


async def allowed(limiter: RedisRateLimiter, key: str) -> bool:
    try:
        await limiter.check(key)
    except RateLimited:
        return False
    return True


# -- the script ---------------------------------------------------------------------------------------


async def test_limit_per_account_shared_by_two_limiters(make_limiter: MakeLimiter) -> None:
    first, second = make_limiter(3), make_limiter(3)  # two gateways' limiters on one Redis
    assert [await allowed(limiter, "a") for limiter in (first, second, first, second)] == [
        True, True, True, False]
    with pytest.raises(RateLimited) as limited:
        await first.check("a")
    assert (limited.value.code, limited.value.status) == (3036, 429)
    assert [await allowed(second, "b") for _ in range(4)] == [True, True, True, False]  # its own count


async def test_sliding_window(make_limiter: MakeLimiter) -> None:
    """Limit 3 in 1.5 s: one call at t0, two at t0 + 0.75; at t0 + 1.6 only the first has left the
    window, so exactly one more call fits (a fixed window restarting at t0 + 1.5 would allow three)."""
    limiter = make_limiter(3, window_s=1.5)
    assert await allowed(limiter, "a")
    t0 = time.monotonic()  # after the first call was counted: its window ends before t0 + 1.5
    await asyncio.sleep(0.75)
    assert [await allowed(limiter, "a") for _ in range(3)] == [True, True, False]
    await asyncio.sleep(t0 + 1.6 - time.monotonic())
    assert [await allowed(limiter, "a") for _ in range(2)] == [True, False]


async def test_refused_calls_are_not_logged_and_the_log_expires(
    make_limiter: MakeLimiter, redis_server: RedisServer
) -> None:
    from redis.asyncio import Redis

    limiter = make_limiter(2, window_s=0.5, key_prefix="bounded:")
    for _ in range(10):
        await allowed(limiter, "a")
    client = Redis.from_url(redis_server.url)
    try:
        assert await client.zcard("bounded:a") == 2  # memory: `limit` entries an account, however hammered
        assert 0 < await client.pttl("bounded:a") <= 500
        await asyncio.sleep(0.6)
        assert await client.exists("bounded:a") == 0  # an idle account costs nothing
        assert [await allowed(limiter, "a") for _ in range(3)] == [True, True, False]
    finally:
        await client.delete("bounded:a")
        await client.aclose()


async def test_limiter_arguments_are_checked(make_limiter: MakeLimiter) -> None:
    with pytest.raises(ValueError, match="limit must be >= 1"):
        make_limiter(0)
    with pytest.raises(ValueError, match="window_s"):
        make_limiter(1, window_s=0.0001)


# -- Redis away ---------------------------------------------------------------------------------------


async def test_no_redis_listening_is_3040_at_once(make_limiter: MakeLimiter) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    limiter = make_limiter(3, url=f"redis://127.0.0.1:{port}/0")
    began = time.monotonic()
    with pytest.raises(RedisUnavailable) as unavailable:
        await limiter.check("a")
    assert time.monotonic() - began < 1
    error = unavailable.value
    assert (error.code, error.status) == (3040, 429) and "(Redis) is unavailable" in error.message


async def test_a_redis_that_does_not_answer_times_out_fast(make_limiter: MakeLimiter) -> None:
    """Accepted by the kernel, never read: the socket timeout (0.25 s, one retry) bounds the wait."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        limiter = make_limiter(3, url=f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        began = time.monotonic()
        with pytest.raises(RedisUnavailable):
            await limiter.check("a")
        assert 0.2 < time.monotonic() - began < 2


# -- configuration ------------------------------------------------------------------------------------


def test_redis_url_is_validated() -> None:
    for good in ("redis://127.0.0.1:6379/0", "rediss://:secret@cache.example:6380", "unix:///run/redis.sock"):
        assert ServerSettings(redis_url=good).redis_url == good
    for bad, why in (("http://cache:6379", "must start with redis://"), ("redis://", "names no host"),
                     ("unix://", "names no socket path"), ("redis://cache:port", "not a number"),
                     ("redis://:pw@cache:99999", "not a number")):
        with pytest.raises(ValueError, match=why) as refused:
            ServerSettings(redis_url=bad)
        assert "pw" not in str(refused.value)  # a URL may hold a password: messages leave it out


async def test_the_limiter_is_chosen_once_from_the_settings() -> None:
    assert isinstance(rate_limiter_for(ServerSettings()), MemoryRateLimiter)
    url = "redis://127.0.0.1:1/0"
    disabled = rate_limiter_for(ServerSettings(redis_url=url, rate_limit_per_minute=0))
    assert isinstance(disabled, MemoryRateLimiter) and not disabled.enabled  # no limit needs no Redis
    shared = rate_limiter_for(ServerSettings(redis_url=url))
    assert isinstance(shared, RedisRateLimiter)
    await shared.aclose()


def test_serve_refuses_a_bad_redis_url_before_loading(tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["serve", "--data-dir", str(tmp_path), "--model", f"{LORA_MODEL}=random:tiny"]
    flag = runner.invoke(cli_app, [*base, "--redis-url", "http://cache:6379"])
    assert flag.exit_code == 2 and "redis_url must start with redis://" in flag.stderr
    env = runner.invoke(cli_app, base, env={"LORASERVE_REDIS_URL": "redis://"})
    assert env.exit_code == 2 and "redis_url names no host" in env.stderr


# -- gateways -----------------------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    registry = Registry.open(tmp_path / "registry")
    yield registry
    registry.close()


def test_one_accounts_limit_holds_across_two_gateways(
    registry: Registry, tiny_backend: Any, redis_server: RedisServer
) -> None:
    account, other = f"two-gw-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {registry.create_token(account)}"}
    other_headers = {"Authorization": f"Bearer {registry.create_token(other)}"}
    backends = {LORA_MODEL: tiny_backend}
    settings = ServerSettings(rate_limit_per_minute=4, redis_url=redis_server.url)
    with gateway(registry, backends, settings) as first, gateway(registry, backends, settings) as second:

        def run(base_url: str, who: str = account, auth: dict[str, str] = headers) -> httpx.Response:
            url = f"{base_url}/client/v4/accounts/{who}/ai/run/{LORA_MODEL}"
            return httpx.post(url, headers=auth, json=BODY, timeout=30)

        for base_url in (first, second, first, second):
            ok(run(base_url))
        for base_url in (first, second):
            assert "too many requests" in fails(run(base_url), 429, 3036)
        ok(run(second, other, other_headers))  # another account's count is its own


def test_redis_down_is_3040_and_service_resumes_when_it_is_back(
    registry: Registry, tiny_backend: Any, tmp_path: Path
) -> None:
    require_redis_server()
    account = "redis-outage"
    headers = {"Authorization": f"Bearer {registry.create_token(account)}"}
    with RedisServer(tmp_path) as redis:
        settings = ServerSettings(rate_limit_per_minute=100, redis_url=redis.url)
        with gateway(registry, {LORA_MODEL: tiny_backend}, settings) as base_url:
            url = f"{base_url}/client/v4/accounts/{account}/ai/run/{LORA_MODEL}"
            ok(httpx.post(url, headers=headers, json=BODY, timeout=30))
            redis.kill()
            for _ in range(2):  # the dropped pooled connection, then a fresh connect refused
                message = fails(httpx.post(url, headers=headers, json=BODY, timeout=30), 429, 3040)
                assert "(Redis) is unavailable" in message
            chat = httpx.post(f"{base_url}/client/v4/accounts/{account}/ai/v1/chat/completions",
                              headers=headers, timeout=30,
                              json={"model": LORA_MODEL, "messages": [{"role": "user", "content": "x"}]})
            assert chat.status_code == 429 and "(Redis) is unavailable" in chat.json()["error"]["message"]
            redis.start()  # same port, empty: the gateway reconnects by itself
            ok(httpx.post(url, headers=headers, json=BODY, timeout=30))
