"""The shared budget on a real redis-server: atomic across proxies, timed by Redis, and a
share of its own for each proxy while Redis is unreachable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import structlog
from redis.asyncio import Redis
from structlog.testing import capture_logs

from proxy.config.credentials import TokenHolder, UpstreamToken
from proxy.metrics import Metrics
from proxy.store.budget import SharedBudget
from proxy.store.state import StateStore, redis_client
from tests.conftest import RedisServer, StartRedis

pytestmark = pytest.mark.anyio
TOKEN = "ixt_shared_budget_secret_token"
Proxies = Callable[..., list[SharedBudget]]


@pytest.fixture
async def proxies(start_redis: StartRedis) -> AsyncIterator[tuple[RedisServer, Proxies]]:
    """A redis-server, and a factory of budgets as separate proxies hold them: each with its
    own client, connections and metrics."""
    server = start_redis()
    made: list[SharedBudget] = []
    stores: list[StateStore] = []

    def make(count: int, per_minute: int, **options: Any) -> list[SharedBudget]:
        for _ in range(count):
            tokens = TokenHolder(UpstreamToken(TOKEN, None))
            metrics = Metrics(tokens)
            store = StateStore(
                redis_client(server.url, 0.2),
                timeout=0.2,
                log=structlog.get_logger(),
                metrics=metrics,
            )
            stores.append(store)
            made.append(
                SharedBudget(store, tokens, per_minute, prefix="t:", metrics=metrics, **options)
            )
        return made[-count:]

    yield server, make
    for store in stores:
        await store.aclose()


async def _admitted(budget: SharedBudget, client: str, tries: int) -> int:
    return sum([not (await budget.take(client, None, {})).wait for _ in range(tries)])


async def test_concurrent_calls_from_four_proxies_never_admit_more_than_the_limit(
    proxies: tuple[RedisServer, Proxies],
) -> None:
    _, make = proxies
    budgets = make(4, 40)
    verdicts = await asyncio.gather(
        *(budget.take("batch", None, {}) for budget in budgets for _ in range(50))
    )
    assert sum(not verdict.wait for verdict in verdicts) == 38  # 2 kept for newcomers
    assert max(verdict.used for verdict in verdicts) == 38


async def test_the_window_runs_on_redis_clock_not_the_proxys(
    proxies: tuple[RedisServer, Proxies],
) -> None:
    _, make = proxies
    # A proxy whose clock is an hour fast, and one whose clock is right.
    (fast,) = make(1, 10, wall=lambda: time.time() + 3600)
    (right,) = make(1, 10)
    first = await fast.take("batch", None, {})
    assert abs(first.reset - (time.time() + 60)) < 2
    assert await _admitted(fast, "batch", 10) + await _admitted(right, "batch", 10) == 8


async def test_what_invoisx_says_to_one_proxy_holds_back_the_others(
    proxies: tuple[RedisServer, Proxies],
) -> None:
    _, make = proxies
    one, other = make(2, 60)
    assert (await one.take("batch", None, {})).wait == 0
    await one.learn(429, None, None, 3)
    assert 2.5 < (await other.take("app", None, {})).wait <= 3
    await one.learn(200, 0, int(time.time()) + 20, None)  # nothing left until InvoisX's reset
    assert 19 < (await other.take("app", None, {})).wait <= 22


async def test_keys_name_the_tokens_fingerprint_never_the_token(
    proxies: tuple[RedisServer, Proxies],
) -> None:
    server, make = proxies
    (budget,) = make(1, 60)
    await budget.take("batch", None, {})
    await budget.heartbeat()
    redis = Redis.from_url(server.url)
    keys = sorted(
        str(key, "ascii") if isinstance(key, bytes) else key for key in await redis.keys("*")
    )
    dump = b"".join([await redis.dump(key) or b"" for key in keys])
    await redis.aclose()
    fingerprint = TokenHolder(UpstreamToken(TOKEN, None)).current.fingerprint
    assert keys == [f"t:budget:{fingerprint}", f"t:proxies:{fingerprint}"]
    assert TOKEN.encode() not in dump


async def test_under_a_high_limit_a_lease_saves_asking_redis_for_every_call(
    proxies: tuple[RedisServer, Proxies],
) -> None:
    server, make = proxies
    (budget,) = make(1, 64_000)
    redis = Redis.from_url(server.url)
    key = f"t:budget:{budget._tokens.current.fingerprint}"
    assert (await budget.take("batch", None, {})).wait == 0
    leased = int(await redis.hget(key, "used") or 0)
    assert 900 < leased <= 1000  # 1/64 of what is free, at most 1000: counted at once
    before = int((await redis.info("stats"))["total_commands_processed"])
    assert await _admitted(budget, "batch", 499) == 499
    assert int((await redis.info("stats"))["total_commands_processed"]) == before + 1  # INFO
    await budget.refund("batch")  # back to the lease, not to Redis
    await asyncio.sleep(1.1)  # the lease ends; what it did not spend goes back with the next
    assert (await budget.take("batch", None, {})).wait == 0
    new_lease = budget._leases["batch"].left + 1
    used = int(await redis.hget(key, "used") or 0)
    await redis.aclose()
    assert used == 499 + new_lease  # 500 spent, one refunded; the rest given back


async def test_without_redis_each_proxy_admits_its_share_then_hands_back_what_it_admitted(
    proxies: tuple[RedisServer, Proxies],
) -> None:
    server, make = proxies
    budgets = make(3, 60)
    for budget in budgets:
        await budget.heartbeat()
    await budgets[0].heartbeat()  # now every one has seen all three
    first = budgets[0]
    assert first.proxies == 3
    assert await _admitted(first, "batch", 6) == 6
    server.stop()
    with capture_logs() as logs:
        # The first call notices Redis is gone: one timeout, then the share of 20 at once.
        started = time.monotonic()
        apart = await _admitted(first, "batch", 40)
        assert time.monotonic() - started < 1
    assert apart == 20 - 2 - 1  # 6 of 60 were spent: 2 of its 20; 1 kept for newcomers
    assert [line["event"] for line in logs] == ["state_store_unavailable"]
    assert first.describe() == {"kind": "redis", "up": False, "proxies": 3}
    assert "invoisx_proxy_state_store_up 0.0" in first._metrics.render().decode()

    server.start()
    with capture_logs() as logs:
        started = time.monotonic()
        while not first.describe()["up"]:
            await first.heartbeat()
            await asyncio.sleep(0.2)
        recovered_in = time.monotonic() - started
    assert recovered_in < 2
    assert [line["event"] for line in logs] == ["state_store_recovered"]
    # Redis restarted empty: what this proxy admitted apart is counted in the new window.
    after = await first.take("batch", None, {})
    assert after.wait == 0 and after.used == apart + 1
    with capture_logs() as logs:
        assert await _admitted(first, "batch", 5) == 5
    assert logs == []  # connections from before the restart were not reused


async def test_apart_a_proxy_holds_back_only_for_the_apps_it_serves(
    proxies: tuple[RedisServer, Proxies],
) -> None:
    server, make = proxies
    here, there = make(2, 60)
    for budget in (here, there, here):
        await budget.heartbeat()
    reserved = {"app": 12}
    assert (await here.take("app", None, reserved)).wait == 0
    assert await _admitted(there, "batch", 6) == 6  # it has seen 7 of 60 spent
    assert await _admitted(here, "batch", 6) == 6  # and this one 13
    server.stop()
    there_batch = sum([not (await there.take("batch", None, reserved)).wait for _ in range(40)])
    here_batch = sum([not (await here.take("batch", None, reserved)).wait for _ in range(40)])
    here_app = sum([not (await here.take("app", None, reserved)).wait for _ in range(40)])
    # Shares of 30: `there` never served the app, so its batch keeps back only 2 for newcomers;
    # here the batch leaves the app at least its 12, and the app gets them.
    assert there_batch == 30 - 4 - 2
    assert here_app >= 12
    assert here_batch + here_app == 30 - 7 - 2


async def test_unreachable_at_start_means_running_on_a_share_not_failing(
    proxies: tuple[RedisServer, Proxies],
) -> None:
    server, make = proxies
    server.stop()
    (budget,) = make(1, 60)
    with capture_logs() as logs:
        await budget.heartbeat()
        verdict = await budget.take("batch", None, {})
    assert verdict.wait == 0
    assert [line["event"] for line in logs] == ["state_store_unavailable"]
    assert logs[0]["log_level"] == "warning"
