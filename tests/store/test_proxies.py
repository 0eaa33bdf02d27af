"""Several real proxy processes on one real Redis, in front of the sandbox with its own rate
limit: one budget for all of them, and what happens when Redis goes away and comes back."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from proxy.config.keys import config_block
from tests.conftest import ProxyProcess, RedisServer, Sandbox, StartRedis, subprocess_env

BATCH_KEY = "ipk_batch_job_key_0123456789"
SCRIPT_KEY = "ipk_capped_script_key_0123456"


ThreeProxies = Callable[[int], tuple[RedisServer, list[ProxyProcess]]]


@pytest.fixture
def three_proxies(
    tmp_path: Path,
    start_sandbox_upstream: Callable[..., Sandbox],
    start_redis: StartRedis,
    spawn_proxy: Callable[..., ProxyProcess],
) -> ThreeProxies:
    """Three proxy processes sharing a redis-server and a budget of 60 calls a minute, in
    front of a sandbox allowing the given calls a minute; client keys `batch` and `script`
    (at most 5 a minute)."""

    def spawn(rate_limit: int) -> tuple[RedisServer, list[ProxyProcess]]:
        sandbox = start_sandbox_upstream(rate_limit_per_minute=rate_limit)
        redis = start_redis()
        config = tmp_path / "proxy.toml"
        config.write_text(
            config_block("batch", BATCH_KEY, ["read"])
            + config_block("script", SCRIPT_KEY, ["read"])
            + "requests_per_minute = 5\n"
        )
        proxies = [
            spawn_proxy(
                INVOISX_API_URL=sandbox.url,
                INVOISX_API_TOKEN=sandbox.token.value,
                INVOISX_PROXY_CONFIG=str(config),
                INVOISX_RATE_LIMIT_PER_MINUTE="60",
                INVOISX_RATE_LIMIT_MAX_WAIT="2",
                INVOISX_PROXY_REDIS_URL=redis.url,
            )
            for _ in range(3)
        ]
        return redis, proxies

    return spawn


async def _burst(proxies: list[ProxyProcess], key: str, calls: int) -> list[httpx.Response]:
    """`calls` GETs at once, spread evenly over the proxies."""
    clients = [
        httpx.AsyncClient(base_url=proxy.url, timeout=30, limits=httpx.Limits(max_connections=100))
        for proxy in proxies
    ]
    try:
        headers = {"Authorization": f"Bearer {key}"}
        return await asyncio.gather(
            *(
                clients[index % len(clients)].get("/api/v1/buyers", headers=headers)
                for index in range(calls)
            )
        )
    finally:
        for client in clients:
            await client.aclose()


def _windows(started: float) -> int:
    """InvoisX's minute windows (aligned to the clock's minute) touched since `started`."""
    return int(time.time() // 60) - int(started // 60) + 1


def test_three_proxies_spend_one_budget_and_invoisx_never_refuses(
    three_proxies: ThreeProxies,
) -> None:
    _, proxies = three_proxies(60)
    started = time.time()
    responses = asyncio.run(_burst(proxies, BATCH_KEY, 150))
    windows = _windows(started)
    statuses = [response.status_code for response in responses]
    forwarded = statuses.count(200)
    # Alone, each proxy would have let 57 through: 171 against InvoisX's 60.
    assert 50 <= forwarded <= 60 * windows
    refused = [response for response in responses if response.status_code == 429]
    assert len(refused) + forwarded == 150
    for response in refused:  # the proxies' own 429s, never InvoisX's
        assert "through this proxy" in response.json()["message"]
    assert {line["decision"] for proxy in proxies for line in _audit(proxy)} == {
        "forwarded",
        "rate_limited",
    }
    assert all(
        line["status"] == 200
        for proxy in proxies
        for line in _audit(proxy)
        if line["decision"] == "forwarded"
    )


def test_a_client_limit_holds_across_proxies(three_proxies: ThreeProxies) -> None:
    _, proxies = three_proxies(60)
    started = time.time()
    responses = asyncio.run(_burst(proxies, SCRIPT_KEY, 12))
    forwarded = [response.status_code for response in responses].count(200)
    assert 5 <= forwarded <= 5 * _windows(started)


def _audit(proxy: ProxyProcess) -> list[dict[str, object]]:
    return [line for line in proxy.lines() if line["event"] == "request"]


def test_an_outage_runs_each_proxy_on_its_share_and_recovery_comes_within_two_seconds(
    three_proxies: ThreeProxies,
) -> None:
    redis, proxies = three_proxies(600)
    first = proxies[0]
    time.sleep(1.5)  # a heartbeat from each: every proxy knows there are three
    ready = httpx.get(f"{first.url}/readyz").json()
    assert ready["state_store"] == {"kind": "redis", "up": True, "proxies": 3}
    assert "invoisx_proxy_state_store_up 1.0" in httpx.get(f"{first.url}/metrics").text

    redis.stop()
    with httpx.Client(base_url=first.url, headers={"Authorization": f"Bearer {BATCH_KEY}"}) as c:
        statuses = [c.get("/api/v1/buyers").status_code for _ in range(5)]
        first.wait_for("state_store_unavailable")
        # Not ready would take every sidecar out at once: it is reported, and still 200.
        answer = httpx.get(f"{first.url}/readyz")
        assert answer.status_code == 200 and answer.json()["state_store"]["up"] is False
        assert "invoisx_proxy_state_store_up 0.0" in httpx.get(f"{first.url}/metrics").text
        assert statuses == [200] * 5  # within its share, 20 of the proxies' 60

        redis.start()
        restarted = time.monotonic()
        for proxy in proxies:
            proxy.wait_for("state_store_recovered", timeout=3)
        assert time.monotonic() - restarted < 2.5
        assert c.get("/api/v1/buyers").status_code == 200
    time.sleep(1.5)
    for proxy in proxies:  # no connection from before the restart tripped it again
        events = [line["event"] for line in proxy.lines()]
        assert events.count("state_store_unavailable") == events.count("state_store_recovered")


def test_unreachable_redis_at_start_is_a_warning_not_a_crash(
    tmp_path: Path,
    start_sandbox_upstream: Callable[..., Sandbox],
    start_redis: StartRedis,
    spawn_proxy: Callable[..., ProxyProcess],
) -> None:
    sandbox = start_sandbox_upstream(rate_limit_per_minute=60)
    redis = start_redis()
    redis.stop()
    proxy = spawn_proxy(
        INVOISX_API_URL=sandbox.url,
        INVOISX_API_TOKEN=sandbox.token.value,
        INVOISX_PROXY_REDIS_URL=redis.url,
    )
    warning = proxy.wait_for("state_store_unavailable")
    assert warning["level"] == "warning"
    assert httpx.get(f"{proxy.url}/api/v1/buyers").status_code == 200
    redis.start()
    proxy.wait_for("state_store_recovered", timeout=3)


def test_a_redis_url_that_cannot_be_used_is_exit_2_naming_it(tmp_path: Path) -> None:
    for url, line in [
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "INVOISX_PROXY_REDIS_URL: cannot be"),
        ("http://:s3cret-pass@redis:6379", "INVOISX_PROXY_REDIS_URL: must start with redis://"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "serve", "--port", "0"],
            env=subprocess_env(
                INVOISX_API_TOKEN="ixt_token_0123456789", INVOISX_PROXY_REDIS_URL=url
            ),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith(f"invoisx-proxy: {line}")
        assert "s3cret" not in result.stderr
