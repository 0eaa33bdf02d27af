"""The local rate limit: a minute's burst, steady refill, a bounded fair queue, InvoisX's word."""

from __future__ import annotations

import asyncio
import selectors
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from proxy.config.keys import config_block
from proxy.errors import ProxyError
from proxy.stages.ratelimit import Admission, RateLimiter
from tests.conftest import Recorder, Reply, RunningProxy, Sandbox

T = TypeVar("T")


class _JumpingSelector(selectors.DefaultSelector):
    """Polls without blocking; when nothing is ready, moves the loop's clock to its next
    timer instead of sleeping until then."""

    def __init__(self, loop: _VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready: list[tuple[selectors.SelectorKey, int]] = super().select(
            None if timeout is None else 0
        )
        if not ready and timeout:
            self._loop.now += timeout
        return ready


class _VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: timers (the limiter's rounds, `asyncio.timeout`,
    `asyncio.sleep`) fire in order at exactly their time, without waiting for it. The
    limiter reads the same clock (`_limiter`), so the tests below are deterministic."""

    def __init__(self) -> None:
        self.now = 1000.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=_VirtualTimeLoop) as runner:
        return runner.run(coroutine)


def _now() -> float:
    return asyncio.get_running_loop().time()


def _limiter(per_minute: int, **options: Any) -> RateLimiter:
    """A limiter on the running loop's clock, which `_run` makes virtual."""
    return RateLimiter(per_minute, clock=asyncio.get_running_loop().time, **options)


def test_half_a_minute_passes_at_once_the_rest_in_rounds_then_steady_refill() -> None:
    async def scenario() -> tuple[list[float], float, float]:
        limiter = _limiter(60, max_wait=5, max_queue=100)
        started = _now()
        waits = await asyncio.gather(*(limiter.acquire("app") for _ in range(60)))
        whole_minute = _now() - started
        return sorted(waits), whole_minute, await limiter.acquire("app")

    waits, whole_minute, next_one = _run(scenario())
    assert 30 <= waits.count(0.0) <= 31  # the first half at once
    assert all(wait < 1.5 for wait in waits)  # the rest in 20 ms rounds
    assert whole_minute < 1.5
    assert 0.1 < next_one < 1.5  # then one a second


def test_the_queue_is_bounded_and_waiting_is_bounded() -> None:
    wall = _Clock(1_800_000_000.0)

    async def scenario() -> tuple[list[float | BaseException], float]:
        limiter = _limiter(60, max_wait=0.3, max_queue=3, wall=wall)
        for _ in range(60):
            await limiter.acquire("app")
        started = _now()
        outcomes = await asyncio.gather(
            *(limiter.acquire("app") for _ in range(5)), return_exceptions=True
        )
        return outcomes, _now() - started

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
        assert int(refusal.headers["x-ratelimit-reset"]) > wall.now


def test_waiting_clients_take_turns_least_used_first() -> None:
    async def scenario() -> list[str]:
        limiter = _limiter(60, max_wait=5, max_queue=1000)
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
        limiter = _limiter(6000, max_wait=0.2, max_queue=100)
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
        limiter = _limiter(600, max_wait=5, max_queue=10)
        limiter.learn(429, {b"retry-after": b"1"})
        started = _now()
        await limiter.acquire("app")
        blocked = _now() - started
        limiter.learn(200, {b"x-ratelimit-remaining": b"0", b"x-ratelimit-reset": b"0"})
        started = _now()
        await limiter.acquire("app")  # nothing remaining: wait for the refill
        return blocked, _now() - started

    blocked, refill = _run(scenario())
    assert 0.95 <= blocked < 1.5
    assert 0.05 <= refill < 0.5


def test_a_cancelled_wait_leaves_the_queue() -> None:
    async def scenario() -> float:
        limiter = _limiter(60, max_wait=5, max_queue=1)
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
        limiter = _limiter(600, max_wait=2, max_queue=1000)  # 10 a second
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


class _Clock:
    """A clock the test moves by hand, so the limiter's arithmetic needs no waiting."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_capacity_refills_on_the_limiters_own_clock() -> None:
    async def scenario() -> tuple[list[float], list[float]]:
        clock = _Clock(1000.0)
        limiter = RateLimiter(60, max_wait=5, max_queue=10, clock=clock)
        first = [await limiter.acquire("app") for _ in range(31)]
        clock.now += 60  # a whole minute on the limiter's clock, none on the wall's
        again = [await limiter.acquire("app") for _ in range(31)]
        return first, again

    first, again = _run(scenario())
    # Without the refill the 32nd call would queue and wait; every one passed at once.
    assert first == again == [0.0] * 31


def test_a_refusal_tells_when_invoisx_resets_on_the_wall_clock() -> None:
    async def scenario() -> ProxyError:
        wall = _Clock(1_800_000_000.0)
        limiter = RateLimiter(60, max_wait=0.01, max_queue=10, clock=_Clock(5.0), wall=wall)
        limiter.learn(200, {b"x-ratelimit-remaining": b"0", b"x-ratelimit-reset": b"1800000030"})
        with pytest.raises(ProxyError) as refused:
            await limiter.acquire("app")
        return refused.value

    refusal = _run(scenario())
    assert refusal.headers["retry-after"] == "30"
    assert refusal.headers["x-ratelimit-reset"] == "1800000030"


def test_an_admission_without_a_limiter_always_passes() -> None:
    admission = Admission(None, "app", None)
    assert _run(admission.admit()) == 0.0
    admission.learn(429, {b"retry-after": b"60"})
    admission.refund()


def test_an_admission_refund_gives_back_what_it_took() -> None:
    async def scenario() -> list[float]:
        limiter = RateLimiter(60, max_wait=5, max_queue=10, clock=_Clock(0.0))
        admission = Admission(limiter, "app", 2)
        taken = [await admission.admit(), await admission.admit()]
        admission.refund()  # the second call never went out: the client's budget has one again
        return [*taken, await admission.admit()]

    assert _run(scenario()) == [0.0, 0.0, 0.0]


def _raw_call(proxy: RunningProxy, request: bytes, leave_after: float) -> None:
    """Send `request` on a socket of its own and hang up after `leave_after` seconds."""
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(request)
        time.sleep(leave_after)


@pytest.mark.parametrize(
    ("request_bytes", "request_id", "outcome"),
    [
        (b"GET /api/v1/buyers HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: gone-get\r\n\r\n",
         "gone-get", (499, "CLIENT_DISCONNECTED")),
        # A bodiless POST that acts on a document: sent after its client left, the client's
        # retry would act twice.
        (b"POST /api/v1/invoices/abc/submit HTTP/1.1\r\nHost: 127.0.0.1\r\n"
         b"X-Request-ID: gone-submit\r\nContent-Length: 0\r\n\r\n", "gone-submit",
         (499, "CLIENT_DISCONNECTED")),
        # Admitted before its body is read: its client is missed when the body is read.
        (b"POST /api/v1/invoices/abc/submit HTTP/1.1\r\nHost: 127.0.0.1\r\n"
         b"X-Request-ID: gone-keyed\r\nIdempotency-Key: k1\r\n\r\n", "gone-keyed",
         (400, "CLIENT_BODY_INCOMPLETE")),
    ],
    ids=["get", "post", "post-with-idempotency-key"],
)  # fmt: skip
def test_a_client_that_leaves_while_its_call_waits_for_the_rate_limit_is_not_forwarded(
    recorder: tuple[Recorder, str],
    start_proxy: Callable[..., RunningProxy],
    request_bytes: bytes,
    request_id: str,
    outcome: tuple[int, str],
) -> None:
    stand_in, upstream = recorder
    reset = str(int(time.time()) + 4).encode()
    # InvoisX says nothing remains until its reset: the next call waits for it.
    stand_in.reply = lambda request: Reply(
        headers=[
            (b"content-type", b"application/json"),
            (b"x-ratelimit-remaining", b"0"),
            (b"x-ratelimit-reset", reset),
        ]
    )
    proxy = start_proxy(upstream, rate_limit_per_minute=60, rate_limit_max_wait=10)
    assert httpx.get(f"{proxy.url}/api/v1/buyers").status_code == 200
    _raw_call(proxy, request_bytes, leave_after=1.5)
    line = None
    deadline = time.monotonic() + 10
    while line is None and time.monotonic() < deadline:
        lines = [entry for entry in proxy.audit_lines() if entry.get("request_id") == request_id]
        line = lines[0] if lines else None
        time.sleep(0.05)
    assert line is not None
    assert (line["status"], line["error_code"]) == outcome
    time.sleep(3)  # past InvoisX's reset: a call still queued would have gone out by now
    assert len(stand_in.requests) == 1  # the first call only
