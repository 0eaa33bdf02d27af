"""The budget's rules, held to the same cases in this process and as the Redis script.

Every case runs twice: on `MemoryBudget` (stages/budget.py) and on `SharedBudget`
(store/budget.lua on a real redis-server), so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any

import pytest
import structlog

from proxy.config.credentials import TokenHolder, UpstreamToken
from proxy.metrics import Metrics
from proxy.stages.ratelimit import Budget, MemoryBudget
from proxy.store.budget import SharedBudget
from proxy.store.state import StateStore, redis_client
from tests.conftest import StartRedis

NONE: Mapping[str, int] = {}
MakeBudget = Callable[[int], Coroutine[Any, Any, Budget]]


@pytest.fixture(params=["memory", "redis"])
async def make_budget(
    request: pytest.FixtureRequest, start_redis: StartRedis
) -> AsyncIterator[MakeBudget]:
    stores: list[StateStore] = []
    url = start_redis().url if request.param == "redis" else ""

    async def make(per_minute: int) -> Budget:
        if not url:
            return MemoryBudget(per_minute)
        tokens = TokenHolder(UpstreamToken("ixt_budget_test_token", None))
        metrics = Metrics(tokens)
        store = StateStore(
            redis_client(url, 0.5), timeout=0.5, log=structlog.get_logger(), metrics=metrics
        )
        stores.append(store)
        return SharedBudget(store, tokens, per_minute, prefix="test:", metrics=metrics)

    yield make
    for store in stores:
        await store.aclose()


async def _admitted(budget: Budget, client: str, tries: int, **options: Any) -> int:
    cap, reserved = options.get("cap"), options.get("reserved", NONE)
    return sum([not (await budget.take(client, cap, reserved)).wait for _ in range(tries)])


pytestmark = pytest.mark.anyio


async def test_one_client_alone_spends_the_window_but_a_little_room_for_newcomers(
    make_budget: MakeBudget,
) -> None:
    budget = await make_budget(20)
    assert await _admitted(budget, "batch", 30) == 19  # 5% of 20, rounded up, kept back
    waiting = await budget.take("batch", None, NONE)
    assert 58 < waiting.wait <= 60  # held until the window ends: it opened just now
    assert (await budget.take("newcomer", None, NONE)).wait == 0
    assert 59 < (await budget.take("another", None, NONE)).wait <= 61  # now it is all spent
    assert abs(waiting.reset - (time.time() + 60)) < 2


async def test_a_light_client_keeps_what_its_recent_rate_needs(make_budget: MakeBudget) -> None:
    budget = await make_budget(60)
    assert (await budget.take("app", None, NONE)).wait == 0  # one call: about 12 a minute
    batch = await _admitted(budget, "batch", 80)
    # The app's ~12 a minute for the whole window, and 3 for newcomers, stay back.
    assert 40 <= batch <= 46
    assert await _admitted(budget, "app", 10) == 10


async def test_a_reservation_is_kept_for_its_client(make_budget: MakeBudget) -> None:
    budget = await make_budget(20)
    reserved = {"payments": 5}
    assert await _admitted(budget, "batch", 30, reserved=reserved) == 14  # 5 and 1 kept back
    assert await _admitted(budget, "payments", 5, reserved=reserved) == 5
    assert (await budget.take("batch", None, reserved)).wait > 1


async def test_a_client_cap_holds_within_the_window(make_budget: MakeBudget) -> None:
    budget = await make_budget(60)
    assert await _admitted(budget, "script", 10, cap=3) == 3
    assert (await budget.take("script", 3, NONE)).wait > 55
    assert await _admitted(budget, "other", 3) == 3


async def test_invoisx_remaining_and_reset_place_the_window(make_budget: MakeBudget) -> None:
    budget = await make_budget(20)
    assert await _admitted(budget, "batch", 2) == 2
    reset = int(time.time()) + 30
    # InvoisX counted 15 (another user of the token): 5 remain, one of them for newcomers.
    await budget.learn(200, 5, reset, None)
    assert await _admitted(budget, "batch", 10) == 4
    verdict = await budget.take("batch", None, NONE)
    assert verdict.reset == reset and verdict.used == 19


async def test_invoisx_429_spends_the_window_until_retry_after(make_budget: MakeBudget) -> None:
    budget = await make_budget(60)
    assert await _admitted(budget, "batch", 1) == 1
    await budget.learn(429, None, None, 2)
    verdict = await budget.take("app", None, NONE)
    assert 1.5 < verdict.wait <= 2.0
    await asyncio.sleep(verdict.wait)
    assert (await budget.take("app", None, NONE)).wait == 0


async def test_a_refund_gives_the_call_back(make_budget: MakeBudget) -> None:
    budget = await make_budget(3)
    assert await _admitted(budget, "batch", 5) == 2
    await budget.refund("batch")
    assert await _admitted(budget, "batch", 2) == 1


async def test_calls_invoisx_has_not_counted_yet_stay_counted(make_budget: MakeBudget) -> None:
    budget = await make_budget(10)
    assert await _admitted(budget, "batch", 5) == 5
    # An answer to the first call: InvoisX had counted only it, the other four were in flight.
    await budget.learn(200, 9, int(time.time()) + 30, None)
    assert await _admitted(budget, "batch", 20) == 4  # 10 - 5 - 1 for newcomers


async def test_a_client_cap_survives_invoisx_moving_the_window(make_budget: MakeBudget) -> None:
    budget = await make_budget(60)
    assert await _admitted(budget, "script", 3, cap=3) == 3
    # InvoisX's window ends sooner than the one the first call opened: the same window still.
    await budget.learn(200, 57, int(time.time()) + 30, None)
    assert (await budget.take("script", 3, NONE)).wait > 25
    await budget.learn(429, None, None, 10)
    assert 9 < (await budget.take("script", 3, NONE)).wait <= 10
