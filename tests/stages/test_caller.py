"""The caller checks: no foreign Host names on a loopback listener, no cross-site browser calls."""

from __future__ import annotations

import socket

import httpx
import pytest

from proxy.errors import ProxyError
from proxy.stages.caller import check_caller, peer_address
from tests.conftest import Recorder, RunningProxy


def _scope(*headers: tuple[bytes, bytes]) -> dict[str, object]:
    return {"type": "http", "headers": list(headers), "client": ("127.0.0.1", 5000)}


@pytest.mark.parametrize(
    "host", [b"localhost:8080", b"127.0.0.1:8080", b"127.9.9.9", b"[::1]:8080", b"LOCALHOST"]
)
def test_loopback_hosts_pass(host: bytes) -> None:
    check_caller(_scope((b"host", host)), loopback_listener=True)


@pytest.mark.parametrize("host", [b"evil.example", b"evil.example:8080", b"10.0.0.5:8080", b""])
def test_foreign_hosts_are_refused_on_a_loopback_listener(host: bytes) -> None:
    with pytest.raises(ProxyError) as caught:
        check_caller(_scope((b"host", host)), loopback_listener=True)
    assert (caught.value.status, caught.value.error_code) == (400, "BAD_REQUEST")
    # Listening beyond loopback (a sidecar), the Host names the service: not checked here.
    check_caller(_scope((b"host", host)), loopback_listener=False)


@pytest.mark.parametrize(
    "headers",
    [
        ((b"host", b"127.0.0.1:8080"), (b"origin", b"https://evil.example")),
        ((b"host", b"127.0.0.1:8080"), (b"origin", b"null")),
        ((b"host", b"127.0.0.1:8080"), (b"origin", b"http://127.0.0.1:9999")),
        ((b"host", b"127.0.0.1:8080"), (b"sec-fetch-site", b"cross-site")),
        ((b"host", b"127.0.0.1:8080"), (b"sec-fetch-site", b"same-site")),
    ],
)
def test_cross_site_browser_requests_are_refused(headers: tuple[tuple[bytes, bytes], ...]) -> None:
    with pytest.raises(ProxyError) as caught:
        check_caller(_scope(*headers), loopback_listener=True)
    assert (caught.value.status, caught.value.decision) == (403, "denied")


def test_same_origin_and_non_browser_requests_pass() -> None:
    host = (b"host", b"127.0.0.1:8080")
    check_caller(_scope(host), loopback_listener=True)
    check_caller(_scope(host, (b"origin", b"http://127.0.0.1:8080")), loopback_listener=True)
    check_caller(_scope(host, (b"sec-fetch-site", b"same-origin")), loopback_listener=True)
    check_caller(_scope(host, (b"sec-fetch-site", b"none")), loopback_listener=True)


def test_peer_address() -> None:
    assert peer_address(_scope()) == "127.0.0.1"
    assert peer_address({"type": "http", "headers": []}) == "unknown"


def test_dns_rebinding_and_cross_site_over_http(
    proxy: RunningProxy, recorder: tuple[Recorder, str]
) -> None:
    rebound = httpx.get(f"{proxy.url}/api/v1/buyers", headers={"Host": "evil.example"})
    assert rebound.status_code == 400
    assert rebound.json()["error_code"] == "BAD_REQUEST"
    cross_site = httpx.post(
        f"{proxy.url}/api/v1/buyers", json={}, headers={"Origin": "https://evil.example"}
    )
    assert cross_site.status_code == 403
    assert cross_site.json()["error_code"] == "FORBIDDEN"
    assert recorder[0].requests == []
    assert httpx.get(f"{proxy.url}/api/v1/buyers", headers={"Host": "localhost"}).status_code == 200


def test_websocket_upgrade_is_refused(proxy: RunningProxy, recorder: tuple[Recorder, str]) -> None:
    host_port = proxy.url.removeprefix("http://")
    host, port = host_port.split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(
            b"GET /api/v1/buyers HTTP/1.1\r\nHost: " + host_port.encode() + b"\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        answer = raw.recv(65536)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert recorder[0].requests == []
