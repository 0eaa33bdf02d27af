"""Serving: binding the listen address (one line naming the setting), and graceful shutdown:
SIGTERM stops accepting, lets calls in flight finish, exits 0."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from proxy.config.settings import ConfigError
from proxy.server.serving import bind
from tests.conftest import TOKEN, ProxyProcess, Recorder, Reply, StartRedis


def _call_in_background(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[threading.Thread, list[httpx.Response | Exception]]:
    outcome: list[httpx.Response | Exception] = []

    def call() -> None:
        try:
            outcome.append(httpx.request(method, url, headers=headers, timeout=30))
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


def test_an_idempotent_call_cut_off_by_the_grace_period_is_never_sent_again(
    recorder: tuple[Recorder, str],
    spawn_proxy: Callable[..., ProxyProcess],
    start_redis: StartRedis,
) -> None:
    stand_in, upstream = recorder
    stand_in.reply = lambda request: Reply(delay=20)
    settings = {
        "INVOISX_API_TOKEN": TOKEN,
        "INVOISX_API_URL": upstream,
        "INVOISX_TOKEN_PERMISSIONS": "create,read,update,delete",
        "INVOISX_PROXY_REDIS_URL": start_redis().url,
    }
    proxy = spawn_proxy(**settings, INVOISX_PROXY_SHUTDOWN_GRACE="0.5")
    submit = f"{proxy.url}/api/v1/invoices/inv_1/submit"
    thread, outcome = _call_in_background(submit, "POST", {"Idempotency-Key": "cut-off"})
    _wait_for_requests(stand_in, 1)
    assert proxy.stop(timeout=10) == 0
    thread.join()
    response = outcome[0]
    assert isinstance(response, httpx.Response) and response.status_code == 503
    (line,) = [line for line in proxy.lines() if line["event"] == "request"]
    assert (line["decision"], line["idempotency"]) == ("aborted", "unknown")
    # InvoisX may have acted: after a restart the repeat is refused, not sent.
    again = spawn_proxy(**settings)
    repeat = httpx.post(
        f"{again.url}/api/v1/invoices/inv_1/submit", headers={"Idempotency-Key": "cut-off"}
    )
    assert (repeat.status_code, repeat.json()["error_code"]) == (409, "IDEMPOTENCY_OUTCOME_UNKNOWN")
    assert len(stand_in.requests) == 1


@pytest.mark.parametrize(
    ("host", "family", "address"),
    [
        ("localhost", socket.AF_INET, "127.0.0.1"),  # as clients are told, even if ::1 is first
        ("[::1]", socket.AF_INET6, "::1"),
        ("::1", socket.AF_INET6, "::1"),
    ],
)
def test_bind_takes_the_host_as_written_and_prefers_ipv4(
    host: str, family: socket.AddressFamily, address: str
) -> None:
    with bind(host, 0) as sock:
        assert (sock.family, sock.getsockname()[0]) == (family, address)


@pytest.mark.parametrize(
    ("host", "setting", "reason"),
    [
        ("fe80::1", "--host", "Invalid argument"),  # link-local without its interface
        ("192.0.2.1", "--host", "Cannot assign requested address"),
        ("nosuch.invalid", "--host", "cannot resolve 'nosuch.invalid'"),
    ],
)
def test_bind_blames_the_host_for_an_address_it_cannot_take(
    host: str, setting: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        bind(host, 0, host_setting="--host", port_setting="--port")
    assert refused.value.setting == setting and reason in str(refused.value)


def test_bind_blames_the_port_when_it_is_taken_on_any_address() -> None:
    with bind("127.0.0.1", 0) as taken:
        taken.listen()
        port = taken.getsockname()[1]
        # localhost may also be ::1, where the port is free: taken on 127.0.0.1 is taken.
        with pytest.raises(ConfigError) as refused:
            bind("localhost", port, host_setting="--host", port_setting="--port")
    assert refused.value.setting == "--port" and "Address already in use" in str(refused.value)
