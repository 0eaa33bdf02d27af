"""The local rate limit: a minute's burst, steady refill, a bounded fair queue, InvoisX's word."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from proxy.config.keys import config_block
from proxy.errors import ProxyError
from proxy.stages.ratelimit import RateLimiter
from tests.conftest import RunningProxy, Sandbox

T = TypeVar("T")


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def test_half_a_minute_passes_at_once_the_rest_in_rounds_then_steady_refill() -> None:
    async def scenario() -> tuple[list[float], float, float]:
        limiter = RateLimiter(60, max_wait=5, max_queue=100)
        started = time.monotonic()
        waits = await asyncio.gather(*(limiter.acquire("app") for _ in range(60)))
        whole_minute = time.monotonic() - started
        return sorted(waits), whole_minute, await limiter.acquire("app")

    waits, whole_minute, next_one = _run(scenario())
    assert 30 <= waits.count(0.0) <= 31  # the first half at once
    assert all(wait < 1.5 for wait in waits)  # the rest in 20 ms rounds
    assert whole_minute < 1.5
    assert 0.1 < next_one < 1.5  # then one a second


def test_the_queue_is_bounded_and_waiting_is_bounded() -> None:
    async def scenario() -> tuple[list[float | BaseException], float]:
        limiter = RateLimiter(60, max_wait=0.3, max_queue=3)
        for _ in range(60):
            await limiter.acquire("app")
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(limiter.acquire("app") for _ in range(5)), return_exceptions=True
        )
        return outcomes, time.monotonic() - started

    outcomes, elapsed = _run(scenario())
    refusals = [outcome for outcome in outcomes if isinstance(outcome, ProxyError)]
    assert len(refusals) == 5  # two turned away at once (queue full), three after 0.3 s
    assert sum("queue of waiting calls is full" in r.message for r in refusals) == 2
    assert 0.25 <= elapsed < 1.0
    for refusal in refusals:
        assert (refusal.status, refusal.error_code, refusal.decision) == (
            429,
            "RATE_LIMIT_EXCEEDED",
            "rate_limited",
        )
        assert int(refusal.headers["retry-after"]) >= 1
        assert refusal.headers["x-ratelimit-limit"] == "60"
        assert refusal.headers["x-ratelimit-remaining"] == "0"
        assert int(refusal.headers["x-ratelimit-reset"]) > time.time()


def test_waiting_clients_take_turns_least_used_first() -> None:
    async def scenario() -> list[str]:
        limiter = RateLimiter(60, max_wait=5, max_queue=1000)
        for _ in range(31):  # below half: from now on calls queue
            await limiter.acquire("batch")
        order: list[str] = []

        async def call(client: str) -> None:
            await limiter.acquire(client)
            order.append(client)

        batch = [asyncio.create_task(call("batch")) for _ in range(20)]
        await asyncio.sleep(0.005)
        interactive = [asyncio.create_task(call("interactive")) for _ in range(3)]
        await asyncio.gather(*batch, *interactive)
        return order

    order = _run(scenario())
    # The interactive app queued last but used nothing: it goes first in each round.
    assert order[:6] == ["interactive", "batch"] * 3  # type: ignore[index]


def test_a_client_limit_holds_within_the_shared_one() -> None:
    async def scenario() -> tuple[int, int]:
        limiter = RateLimiter(6000, max_wait=0.2, max_queue=100)
        granted = 0
        for _ in range(15):
            try:
                await limiter.acquire("small", client_per_minute=10)
            except ProxyError:
                break
            granted += 1
        other = sum([await limiter.acquire("other") == 0.0 for _ in range(50)])
        return granted, other

    assert _run(scenario()) == (10, 50)


def test_invoisx_429_stops_calls_until_retry_after() -> None:
    async def scenario() -> tuple[float, float]:
        limiter = RateLimiter(600, max_wait=5, max_queue=10)
        limiter.learn(429, {b"retry-after": b"1"})
        started = time.monotonic()
        await limiter.acquire("app")
        blocked = time.monotonic() - started
        limiter.learn(200, {b"x-ratelimit-remaining": b"0", b"x-ratelimit-reset": b"0"})
        started = time.monotonic()
        await limiter.acquire("app")  # nothing remaining: wait for the refill
        return blocked, time.monotonic() - started

    blocked, refill = _run(scenario())
    assert 0.95 <= blocked < 1.5
    assert 0.05 <= refill < 0.5


def test_a_cancelled_wait_leaves_the_queue() -> None:
    async def scenario() -> float:
        limiter = RateLimiter(60, max_wait=5, max_queue=1)
        for _ in range(60):
            await limiter.acquire("app")
        waiting = asyncio.create_task(limiter.acquire("app"))
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        # The cancelled call's place is free again: one more may queue, for the refill.
        return await limiter.acquire("app")

    assert 0.05 < _run(scenario()) < 1.6


def test_burst_from_two_apps_against_invoisx_limit(
    tmp_path: Path,
    start_sandbox_upstream: Callable[..., Sandbox],
    start_proxy: Callable[..., RunningProxy],
) -> None:
    sandbox = start_sandbox_upstream(rate_limit_per_minute=60)
    config = tmp_path / "proxy.toml"
    batch_key, interactive_key = "ipk_batch_job_key_0123456789", "ipk_interactive_key_012345"
    config.write_text(
        config_block("batch", batch_key, ["read"])
        + config_block("interactive", interactive_key, ["read"])
    )
    proxy = start_proxy(
        sandbox.url,
        api_token=sandbox.token.value,
        config=config,
        rate_limit_per_minute=60,
        rate_limit_max_wait=10,
    )

    async def burst() -> list[tuple[str, httpx.Response, float]]:
        started = time.monotonic()
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=proxy.url, limits=limits, timeout=30) as client:

            async def call(name: str, key: str) -> tuple[str, httpx.Response, float]:
                headers = {"Authorization": f"Bearer {key}"}
                response = await client.get("/api/v1/buyers", headers=headers)
                return name, response, time.monotonic() - started

            # The interactive app's calls are among the batch job's, as when both run at once.
            calls = [call("batch", batch_key) for _ in range(140)]
            for index in range(10):
                calls.insert(index * 14, call("interactive", interactive_key))
            return await asyncio.gather(*calls)

    results = asyncio.run(burst())
    audit = {line["request_id"]: line for line in proxy.audit_lines(at_least=150)}
    interactive = [(response, took) for name, response, took in results if name == "interactive"]
    assert [response.status_code for response, _ in interactive] == [200] * 10
    assert max(took for _, took in interactive) < 8
    for _, response, _ in results:
        line = audit[response.headers["x-request-id"]]
        if response.status_code == 429:
            # Only ever the proxy's own 429: InvoisX never had to refuse a call.
            assert line["decision"] == "rate_limited"
            assert int(response.headers["retry-after"]) >= 1
        else:
            assert (response.status_code, line["decision"]) == (200, "forwarded")
    assert sum(response.status_code == 200 for _, response, _ in results) >= 60
    waited = [line["waited_ms"] for line in audit.values() if line["status"] == 200]
    assert max(waited) >= 20  # the second half of the minute went through the fair queue


@pytest.mark.parametrize("per_minute", [0])
def test_zero_turns_the_limit_off(
    per_minute: int,
    start_sandbox_upstream: Callable[..., Sandbox],
    start_proxy: Callable[..., RunningProxy],
) -> None:
    sandbox = start_sandbox_upstream(rate_limit_per_minute=0)
    proxy = start_proxy(
        sandbox.url, api_token=sandbox.token.value, rate_limit_per_minute=per_minute
    )
    with httpx.Client(base_url=proxy.url) as client:
        statuses = {client.get("/api/v1/buyers").status_code for _ in range(80)}
    assert statuses == {200}


def test_a_steady_stream_of_newcomers_cannot_postpone_the_rounds() -> None:
    async def scenario() -> int:
        limiter = RateLimiter(600, max_wait=2, max_queue=1000)  # 10 a second
        for _ in range(301):  # below half: every further call queues
            await limiter.acquire("batch")
        granted = 0

        async def call() -> None:
            nonlocal granted
            try:
                await limiter.acquire("batch")
                granted += 1
            except ProxyError:
                pass

        calls = []
        for _ in range(100):  # a newcomer every 5 ms, four times a round
            calls.append(asyncio.create_task(call()))
            await asyncio.sleep(0.005)
        await asyncio.gather(*calls)
        return granted

    assert _run(scenario()) >= 50
