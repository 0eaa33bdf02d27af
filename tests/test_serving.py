"""Graceful shutdown: SIGTERM stops accepting, lets calls in flight finish, exits 0."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import TOKEN, ProxyProcess, Recorder, Reply


def _call_in_background(url: str) -> tuple[threading.Thread, list[httpx.Response | Exception]]:
    outcome: list[httpx.Response | Exception] = []

    def call() -> None:
        try:
            outcome.append(httpx.get(url, timeout=30))
        except httpx.HTTPError as error:
            outcome.append(error)

    thread = threading.Thread(target=call)
    thread.start()
    return thread, outcome


def _wait_for_requests(stand_in: Recorder, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(stand_in.requests) < count:
        assert time.monotonic() < deadline, "the call never reached the stand-in"
        time.sleep(0.01)


def test_sigterm_lets_the_call_in_flight_finish(
    recorder: tuple[Recorder, str], spawn_proxy: Callable[..., ProxyProcess]
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = lambda request: Reply(delay=1.5, chunks=(b'{"success":true,"slow":1}',))
    proxy = spawn_proxy(INVOISX_API_TOKEN=TOKEN, INVOISX_API_URL=upstream)
    thread, outcome = _call_in_background(f"{proxy.url}/api/v1/buyers")
    _wait_for_requests(stand_in, 1)
    stopped_at = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # No new connections once shutting down.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{proxy.url}/healthz")
    thread.join()
    assert proxy.process.wait(10) == 0
    response = outcome[0]
    assert isinstance(response, httpx.Response)
    assert (response.status_code, response.json()) == (200, {"success": True, "slow": 1})
    assert time.monotonic() - stopped_at >= 1.0
    audit = [line for line in proxy.lines() if line["event"] == "request"]
    assert [(line["status"], line["decision"]) for line in audit] == [(200, "forwarded")]
    assert "shutdown" in [line["event"] for line in proxy.lines()]


def test_grace_period_bounds_the_wait(
    recorder: tuple[Recorder, str], spawn_proxy: Callable[..., ProxyProcess]
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = lambda request: Reply(delay=20)
    proxy = spawn_proxy(
        INVOISX_API_TOKEN=TOKEN, INVOISX_API_URL=upstream, INVOISX_PROXY_SHUTDOWN_GRACE="0.5"
    )
    thread, outcome = _call_in_background(f"{proxy.url}/api/v1/buyers")
    _wait_for_requests(stand_in, 1)
    stopped_at = time.monotonic()
    assert proxy.stop(timeout=10) == 0
    assert time.monotonic() - stopped_at < 5
    thread.join()
    # Cut off, and told so honestly: InvoisX may or may not have acted on it.
    response = outcome[0]
    assert isinstance(response, httpx.Response)
    assert response.status_code == 503
    assert response.json()["error_code"] == "PROXY_SHUTTING_DOWN"
    assert "retry-after" not in response.headers
    audit = [line for line in proxy.lines() if line["event"] == "request"]
    assert [(line["status"], line["decision"]) for line in audit] == [(503, "aborted")]
    assert "Traceback" not in proxy.output_path.read_text()
    assert "shutdown" in [line["event"] for line in proxy.lines()]
