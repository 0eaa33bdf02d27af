"""The rate limit's waiting: bounded in time and number, fair to light apps, and what a
refusal tells. The budget's own rules are tests/stages/test_budget.py's."""

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
from proxy.stages.ratelimit import Admission, MemoryBudget, RateLimiter
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


_EPOCH = 1_800_000_000.0  # virtual Unix time, for InvoisX's resets


def _limiter(per_minute: int, **options: Any) -> RateLimiter:
    """A limiter in memory on the running loop's clock, which `_run` makes virtual."""
    loop = asyncio.get_running_loop()

    def wall() -> float:
        return _EPOCH + loop.time()

    return RateLimiter(MemoryBudget(per_minute, wall=wall), clock=loop.time, wall=wall, **options)


def test_a_call_waits_for_capacity_that_comes_in_time() -> None:
    async def scenario() -> tuple[float, float]:
        limiter = _limiter(60, max_wait=5, max_queue=10)
        await limiter.learn(429, {b"retry-after": b"3"})
        started = _now()
        return await limiter.acquire("app"), _now() - started

    waited, elapsed = _run(scenario())
    assert 2.9 < waited < 3.2 and abs(waited - elapsed) < 0.01


def test_a_call_that_cannot_be_admitted_in_time_is_refused_at_once() -> None:
    async def scenario() -> tuple[ProxyError, float]:
        limiter = _limiter(10, max_wait=5, max_queue=10)
        while not isinstance(await _outcome(limiter.acquire("batch")), ProxyError):
            pass
        started = _now()
        refusal = await _outcome(limiter.acquire("batch"))
        assert isinstance(refusal, ProxyError)
        return refusal, _now() - started

    refusal, elapsed = _run(scenario())
    assert elapsed == 0  # nothing comes within 5 s, so it does not wait for nothing
    assert (refusal.status, refusal.error_code, refusal.decision) == (
        429,
        "RATE_LIMIT_EXCEEDED",
        "rate_limited",
    )
    assert "no capacity comes up in time" in refusal.message
    assert 55 <= int(refusal.headers["retry-after"]) <= 61
    assert refusal.headers["x-ratelimit-limit"] == "10"
    assert refusal.headers["x-ratelimit-remaining"] == "0"
    assert int(refusal.headers["x-ratelimit-reset"]) > _EPOCH + 1000


async def _outcome(call: Coroutine[Any, Any, float]) -> float | ProxyError:
    try:
        return await call
    except ProxyError as error:
        return error


def test_the_queue_of_waiting_calls_is_bounded() -> None:
    async def scenario() -> list[float | ProxyError]:
        limiter = _limiter(60, max_wait=5, max_queue=2)
        await limiter.learn(429, {b"retry-after": b"2"})
        return await asyncio.gather(*(_outcome(limiter.acquire("app")) for _ in range(5)))

    outcomes = _run(scenario())
    refusals = [outcome for outcome in outcomes if isinstance(outcome, ProxyError)]
    assert len(refusals) == 3
    assert all("queue of waiting calls is full" in refusal.message for refusal in refusals)
    assert sorted(outcome for outcome in outcomes if isinstance(outcome, float))[0] > 1.9


def test_a_cancelled_wait_leaves_the_queue() -> None:
    async def scenario() -> float:
        limiter = _limiter(60, max_wait=5, max_queue=1)
        await limiter.learn(429, {b"retry-after": b"1"})
        waiting = asyncio.create_task(limiter.acquire("app"))
        await asyncio.sleep(0.5)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return await limiter.acquire("app")  # the queue of one has room again

    assert 0.4 < _run(scenario()) < 0.6


def test_an_app_calling_every_5_s_is_never_kept_waiting_by_a_batch_job() -> None:
    """Two minutes of a batch job (8 callers, honouring Retry-After) and an app's call every
    5 s: every one of the app's calls passes at once, the batch gets the rest."""

    async def scenario() -> tuple[list[float], int]:
        limiter = _limiter(60, max_wait=10, max_queue=100)
        end = _now() + 120
        app_waits: list[float] = []
        batch = 0

        async def batch_caller() -> None:
            nonlocal batch
            while _now() < end:
                outcome = await _outcome(limiter.acquire("batch"))
                if isinstance(outcome, ProxyError):
                    await asyncio.sleep(int(outcome.headers["retry-after"]))
                else:
                    batch += 1
                    await asyncio.sleep(0.05)  # InvoisX's answer

        async def app() -> None:
            while _now() < end:
                app_waits.append(await limiter.acquire("app"))
                await asyncio.sleep(5)

        await asyncio.gather(app(), *(batch_caller() for _ in range(8)))
        return app_waits, batch

    app_waits, batch = _run(scenario())
    assert len(app_waits) == 24 and max(app_waits) == 0
    # The first call opened a window: two in two minutes, 120 calls, the app's 24 among them.
    assert 114 <= batch + len(app_waits) <= 120


def test_a_reserved_app_keeps_its_calls_in_a_burst_through_a_real_proxy(
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
        + "reserved_per_minute = 10\n"
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
    assert max(took for _, took in interactive) < 2
    for _, response, _ in results:
        line = audit[response.headers["x-request-id"]]
        if response.status_code == 429:
            # Only ever the proxy's own 429: InvoisX never had to refuse a call.
            assert line["decision"] == "rate_limited"
            assert int(response.headers["retry-after"]) >= 1
        else:
            assert (response.status_code, line["decision"]) == (200, "forwarded")
    forwarded = sum(response.status_code == 200 for _, response, _ in results)
    # The window the burst landed in (and, near its end, the next): 60 each, newcomers'
    # room aside.
    assert 45 <= forwarded <= 120


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


def test_a_refusal_tells_when_invoisx_resets_on_the_wall_clock() -> None:
    async def scenario() -> ProxyError:
        limiter = _limiter(60, max_wait=5, max_queue=10)
        reset = str(int(_EPOCH + _now()) + 30).encode()
        await limiter.learn(200, {b"x-ratelimit-remaining": b"0", b"x-ratelimit-reset": reset})
        refusal = await _outcome(limiter.acquire("app"))
        assert isinstance(refusal, ProxyError)
        return refusal

    refusal = _run(scenario())
    # InvoisX's reset, and the second the proxy leaves for clocks that differ.
    assert refusal.headers["retry-after"] == "31"
    assert int(refusal.headers["x-ratelimit-reset"]) == int(_EPOCH + 1000) + 31


def test_an_admission_without_a_limiter_always_passes() -> None:
    async def scenario() -> float:
        admission = Admission(None, "app", None, {})
        await admission.learn(429, {b"retry-after": b"60"})
        await admission.refund()
        return await admission.admit()

    assert _run(scenario()) == 0.0


def test_an_admission_refund_gives_back_what_it_took() -> None:
    async def scenario() -> list[float | ProxyError]:
        limiter = _limiter(60, max_wait=0, max_queue=10)
        admission = Admission(limiter, "app", 2, {})
        taken = [await admission.admit(), await admission.admit()]
        await admission.refund()  # the second call never went out: the app has one again
        return [*taken, await admission.admit(), await _outcome(admission.admit())]

    *passed, refused = _run(scenario())
    assert passed == [0.0, 0.0, 0.0] and isinstance(refused, ProxyError)


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
