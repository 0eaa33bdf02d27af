"""Idempotency-Keys on a real Redis, through real proxy processes, in front of the stand-in:
one submission to InvoisX however many proxies the repeats reach, a holder killed with its
call in flight, proxy and Redis restarts between a call and its repeat, and Redis gone."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import TOKEN, ProxyProcess, Recorded, Recorder, Reply, StartRedis

SUBMIT = "/api/v1/invoices/inv_1/submit"
SUBMITTED = b'{"success":true,"data":{"id":"inv_1","status":"submitted","uuid":"LHDN-42"}}'
BODY = b'{"reason":"month end"}'

SpawnProxy = Callable[..., ProxyProcess]


def _proxy_env(upstream: str, redis_url: str, **extra: str) -> dict[str, str]:
    """A proxy in front of the stand-in with every permission, its keys in `redis_url`; no
    rate limit, so that the repeats themselves are never throttled."""
    return {
        "INVOISX_API_URL": upstream,
        "INVOISX_API_TOKEN": TOKEN,
        "INVOISX_TOKEN_PERMISSIONS": "create,read,update,delete",
        "INVOISX_RATE_LIMIT_PER_MINUTE": "0",
        "INVOISX_PROXY_REDIS_URL": redis_url,
        **extra,
    }


def _submitted_after(delay: float) -> Callable[[Recorded], Reply]:
    return lambda request: Reply(201, chunks=(SUBMITTED,), delay=delay)


def _post(proxy: ProxyProcess, key: str, body: bytes = BODY) -> httpx.Response:
    return httpx.post(
        f"{proxy.url}{SUBMIT}", content=body, headers={"Idempotency-Key": key}, timeout=20
    )


def _posts(stand_in: Recorder) -> list[Recorded]:
    return [request for request in stand_in.requests if request.method == "POST"]


def _audit_of(proxy: ProxyProcess, response: httpx.Response) -> dict[str, Any]:
    """The proxy's audit line for `response`, found by its X-Request-ID."""
    request_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in proxy.lines():
            if line["event"] == "request" and line["request_id"] == request_id:
                return line
        time.sleep(0.02)
    raise AssertionError(f"no audit line for request {request_id}")


def _audit(proxy: ProxyProcess, count: int) -> list[dict[str, Any]]:
    """The proxy's `count` audit lines (each is written just after its response)."""
    _wait_until(lambda: len(_requests(proxy)) >= count, 5, f"{count} audit lines from {proxy.url}")
    lines = _requests(proxy)
    assert len(lines) == count, lines
    return lines


def _requests(proxy: ProxyProcess) -> list[dict[str, Any]]:
    return [line for line in proxy.lines() if line["event"] == "request"]


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.005)


async def _burst(proxies: list[ProxyProcess], key: str, calls: int) -> list[httpx.Response]:
    """`calls` identical POSTs with one Idempotency-Key at once, spread over the proxies."""
    clients = [
        httpx.AsyncClient(base_url=proxy.url, timeout=30, limits=httpx.Limits(max_connections=100))
        for proxy in proxies
    ]
    try:
        return await asyncio.gather(
            *(
                clients[index % len(clients)].post(
                    SUBMIT, content=BODY, headers={"Idempotency-Key": key}
                )
                for index in range(calls)
            )
        )
    finally:
        for client in clients:
            await client.aclose()


def test_a_hundred_repeats_over_two_proxies_make_one_submission(
    recorder: tuple[Recorder, str], start_redis: StartRedis, spawn_proxy: SpawnProxy
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = _submitted_after(0.5)
    redis = start_redis()
    proxies = [spawn_proxy(**_proxy_env(upstream, redis.url)) for _ in range(2)]

    responses = asyncio.run(_burst(proxies, "month-end-inv_1", 100))

    assert len(_posts(stand_in)) == 1
    assert [(r.status_code, r.content) for r in responses] == [(201, SUBMITTED)] * 100
    replayed = [r.headers.get("idempotent-replayed") for r in responses]
    assert replayed.count("true") == 99 and replayed.count(None) == 1
    # Each proxy answered its half, and one forwarded for both: the key is shared.
    kinds = [line["idempotency"] for proxy in proxies for line in _audit(proxy, 50)]
    assert sorted(kinds) == ["kept"] + ["replayed"] * 99

    other = _post(proxies[1], "month-end-inv_1", b'{"reason":"another"}')
    assert other.status_code == 422
    assert other.json()["error_code"] == "IDEMPOTENCY_KEY_REUSED"
    assert len(_posts(stand_in)) == 1


def test_a_holder_killed_mid_call_leaves_the_key_unknown_once_its_lease_ends(
    recorder: tuple[Recorder, str], start_redis: StartRedis, spawn_proxy: SpawnProxy
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = _submitted_after(30)  # InvoisX is slow: the call is in flight at the kill
    redis = start_redis()
    # A 1 s upstream timeout: a claim's lease is 6 s.
    env = _proxy_env(upstream, redis.url, INVOISX_PROXY_UPSTREAM_TIMEOUT="1")
    holder, other = spawn_proxy(**env), spawn_proxy(**env)

    answered: list[httpx.Response] = []  # stays empty: its proxy is killed under it

    def first_call() -> None:
        with contextlib.suppress(httpx.TransportError):
            answered.append(_post(holder, "submit-inv_1"))

    caller = threading.Thread(target=first_call)
    caller.start()
    _wait_until(
        lambda: len(_posts(stand_in)) == 1 or not caller.is_alive(), 10, "the submission went out"
    )
    claimed = time.monotonic()
    assert not answered, answered[0].content
    # Before the holder's own upstream timeout (1 s) could mark the key unknown itself.
    holder.process.kill()
    holder.process.wait()
    caller.join(10)

    asked = time.monotonic()
    repeat = _post(other, "submit-inv_1")
    waited = time.monotonic() - asked
    assert repeat.status_code == 409
    assert repeat.json()["error_code"] == "IDEMPOTENCY_OUTCOME_UNKNOWN"
    # It waited for the lease to end (6 s from the claim): not 409 at once, nor a resend.
    lease_ended = time.monotonic() - claimed
    assert lease_ended >= 5 and waited < 10, (lease_ended, waited)
    assert len(_posts(stand_in)) == 1
    audit = _audit_of(other, repeat)
    assert (audit["status"], audit["error_code"], audit["idempotency"]) == (
        409,
        "IDEMPOTENCY_OUTCOME_UNKNOWN",
        "unknown",
    )

    restarted = spawn_proxy(**env)
    asked = time.monotonic()
    again = _post(restarted, "submit-inv_1")
    assert again.status_code == 409
    assert again.json()["error_code"] == "IDEMPOTENCY_OUTCOME_UNKNOWN"
    assert time.monotonic() - asked < 2  # settled as unknown: no lease to wait out
    assert len(_posts(stand_in)) == 1


def test_a_repeat_after_a_proxy_restart_is_replayed(
    recorder: tuple[Recorder, str], start_redis: StartRedis, spawn_proxy: SpawnProxy
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = _submitted_after(0)
    redis = start_redis()
    first_proxy = spawn_proxy(**_proxy_env(upstream, redis.url))
    first = _post(first_proxy, "submit-inv_1")
    assert (first.status_code, first.content) == (201, SUBMITTED)
    assert first_proxy.stop() == 0

    restarted = spawn_proxy(**_proxy_env(upstream, redis.url))
    again = _post(restarted, "submit-inv_1")
    assert (again.status_code, again.content) == (201, SUBMITTED)
    assert again.headers["idempotent-replayed"] == "true"
    assert _audit_of(restarted, again)["idempotency"] == "replayed"
    assert len(_posts(stand_in)) == 1


def test_a_repeat_after_a_redis_restart_is_replayed_from_the_append_only_file(
    recorder: tuple[Recorder, str], start_redis: StartRedis, spawn_proxy: SpawnProxy
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = _submitted_after(0)
    redis = start_redis(appendonly=True)
    proxy = spawn_proxy(**_proxy_env(upstream, redis.url))
    first = _post(proxy, "submit-inv_1")
    assert (first.status_code, first.content) == (201, SUBMITTED)

    redis.stop()
    redis.start()
    # The proxy may notice only now, on a connection from before the restart: a repeat then
    # gets 503 (not sent) until its heartbeat finds Redis again, within about a second.
    deadline = time.monotonic() + 10
    while (again := _post(proxy, "submit-inv_1")).status_code == 503:
        assert again.json()["error_code"] == "IDEMPOTENCY_STORE_UNAVAILABLE"
        assert time.monotonic() < deadline, "still 503 ten seconds after Redis came back"
        time.sleep(0.25)
    if any(line["event"] == "state_store_unavailable" for line in proxy.lines()):
        proxy.wait_for("state_store_recovered")

    assert (again.status_code, again.content) == (201, SUBMITTED)
    assert again.headers["idempotent-replayed"] == "true"
    assert len(_posts(stand_in)) == 1


def test_without_redis_a_keyed_call_is_refused_and_not_sent_but_others_go_through(
    recorder: tuple[Recorder, str], start_redis: StartRedis, spawn_proxy: SpawnProxy
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = _submitted_after(0)
    redis = start_redis()
    proxy = spawn_proxy(**_proxy_env(upstream, redis.url))
    # A call first, so that the proxy holds a connection that Redis's exit breaks.
    assert _post(proxy, "submit-inv_0").status_code == 201
    redis.stop()

    # The first meets the broken connection, the second the open breaker: both refused.
    for _ in range(2):
        refused = _post(proxy, "submit-inv_1")
        assert refused.status_code == 503
        assert refused.json()["error_code"] == "IDEMPOTENCY_STORE_UNAVAILABLE"
        assert refused.headers["retry-after"] == "2"
        audit = _audit_of(proxy, refused)
        assert (audit["error_code"], audit["idempotency"]) == (
            "IDEMPOTENCY_STORE_UNAVAILABLE",
            None,
        )
    assert proxy.wait_for("state_store_unavailable")["level"] == "warning"
    assert len(stand_in.requests) == 1  # the call before the outage only

    stand_in.reply = lambda request: Reply()
    listed = httpx.get(f"{proxy.url}/api/v1/buyers")
    assert listed.status_code == 200
    assert [(r.method, r.raw_path) for r in stand_in.requests[1:]] == [("GET", b"/api/v1/buyers")]
