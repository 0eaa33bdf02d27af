"""Header policy through real sockets: the token and JSON headers injected, the client's
credentials, routing and hop-by-hop headers stripped both ways, values only as UTF-8."""

from __future__ import annotations

import socket

import httpx

from proxy import __version__
from proxy.upstream.headers import request_headers, response_headers
from tests.conftest import (
    TOKEN,
    Recorded,
    Recorder,
    Reply,
    RunningProxy,
)

Upstream = tuple[Recorder, str]


def _address(host_port: str) -> tuple[str, int]:
    host, port = host_port.split(":")
    return host, int(port)


def test_injects_token_and_json_headers(proxy: RunningProxy, recorder: Upstream) -> None:
    stand_in, _ = recorder
    response = httpx.get(f"{proxy.url}/api/v1/buyers", params={"search": "acme", "page": "2"})
    assert response.status_code == 200
    seen = stand_in.requests[-1]
    assert seen.method == "GET"
    assert seen.raw_path == b"/api/v1/buyers"
    assert seen.query_string == b"search=acme&page=2"
    assert seen.header("authorization") == [f"Bearer {TOKEN}"]
    assert seen.header("accept") == ["application/json"]
    assert seen.header("content-type") == []
    assert seen.header("x-request-id") == [response.headers["x-request-id"]]


def test_client_accept_kept_unless_wildcard(proxy: RunningProxy, recorder: Upstream) -> None:
    stand_in, _ = recorder
    httpx.get(f"{proxy.url}/api/v1/invoices/1/pdf", headers={"Accept": "application/pdf"})
    assert stand_in.requests[-1].header("accept") == ["application/pdf"]
    httpx.get(f"{proxy.url}/api/v1/invoices", headers={"Accept": "*/*"})
    assert stand_in.requests[-1].header("accept") == ["application/json"]


def test_body_gets_json_content_type_when_missing(proxy: RunningProxy, recorder: Upstream) -> None:
    stand_in, _ = recorder
    httpx.post(f"{proxy.url}/api/v1/buyers", content=b'{"name":"A"}')
    assert stand_in.requests[-1].header("content-type") == ["application/json"]
    httpx.post(f"{proxy.url}/api/v1/buyers", content=b"a=1", headers={"Content-Type": "text/plain"})
    assert stand_in.requests[-1].header("content-type") == ["text/plain"]


def test_client_credentials_and_routing_headers_never_reach_upstream(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    stand_in, upstream = recorder
    sent = {
        "Authorization": "Bearer client-supplied-token",
        "Proxy-Authorization": "Basic cHJveHk6cHc=",
        "Cookie": "session=abc",
        "Forwarded": "for=10.0.0.1;host=evil.example",
        "X-Forwarded-For": "10.0.0.1",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "http",
        "X-Real-IP": "10.0.0.1",
        "X-Proxy-Key": "client-key",
        "X-HTTP-Method-Override": "DELETE",
        "X-HTTP-Method": "DELETE",
        "X-Method-Override": "DELETE",
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "must-not-pass",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Upgrade": "websocket",
        "X-Custom": "kept",
        "User-Agent": "erp-job/1.0",
    }
    httpx.get(f"{proxy.url}/api/v1/buyers", headers=sent)
    seen = stand_in.requests[-1]
    names = {name for name, _ in seen.headers}
    for dropped in (
        b"proxy-authorization",
        b"cookie",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-real-ip",
        b"x-proxy-key",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-secret-hop",
        b"keep-alive",
        b"te",
        b"upgrade",
    ):
        assert dropped not in names
    assert seen.header("authorization") == [f"Bearer {TOKEN}"]
    assert seen.header("host") == [upstream.split("/")[2]]
    assert seen.header("x-custom") == ["kept"]
    assert seen.header("user-agent") == ["erp-job/1.0"]


def test_response_passes_through_minus_cookies_and_hop_headers(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    stand_in, _ = recorder
    stand_in.reply = lambda request: Reply(
        status=422,
        headers=[
            (b"content-type", b"application/json"),
            (b"x-ratelimit-limit", b"60"),
            (b"x-ratelimit-remaining", b"41"),
            (b"x-ratelimit-reset", b"1767225600"),
            (b"retry-after", b"60"),
            (b"set-cookie", b"laravel_session=secret; HttpOnly"),
            (b"connection", b"x-upstream-hop"),
            (b"x-upstream-hop", b"1"),
        ],
        chunks=[b'{"success":false,"message":"The given data was invalid.",', b'"errors":{}}'],
    )
    response = httpx.post(f"{proxy.url}/api/v1/buyers", json={})
    assert response.status_code == 422
    assert response.content == (
        b'{"success":false,"message":"The given data was invalid.","errors":{}}'
    )
    assert response.headers["x-ratelimit-limit"] == "60"
    assert response.headers["x-ratelimit-remaining"] == "41"
    assert response.headers["x-ratelimit-reset"] == "1767225600"
    assert response.headers["retry-after"] == "60"
    assert "set-cookie" not in response.headers
    assert "x-upstream-hop" not in response.headers
    assert response.headers["x-request-id"]


def test_no_compression_or_client_identity_the_client_did_not_ask_for(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    stand_in, _ = recorder
    host_port = proxy.url.removeprefix("http://")
    with socket.create_connection(_address(host_port)) as raw:
        raw.sendall(
            b"GET /api/v1/buyers HTTP/1.1\r\nHost: "
            + host_port.encode()
            + b"\r\nConnection: close\r\n\r\n"
        )
        while raw.recv(65536):
            pass
    seen = stand_in.requests[-1]
    assert seen.header("accept-encoding") == ["identity"]
    assert seen.header("user-agent") == [f"invoisx-proxy/{__version__}"]
    # Not even when asked: the token scrub must be able to read every answer.
    httpx.get(f"{proxy.url}/api/v1/buyers", headers={"Accept-Encoding": "gzip"})
    assert stand_in.requests[-1].header("accept-encoding") == ["identity"]


def test_request_header_helpers_are_pure() -> None:
    headers = [(b"Connection", b"close, X-A"), (b"X-A", b"1"), (b"Accept", b"text/csv")]
    out = request_headers(headers, b"Bearer t", has_body=False, request_id="r1")
    assert out == [
        (b"accept", b"text/csv"),
        (b"accept-encoding", b"identity"),
        (b"user-agent", f"invoisx-proxy/{__version__}".encode()),
        (b"x-request-id", b"r1"),
        (b"authorization", b"Bearer t"),
    ]
    assert response_headers([(b"Set-Cookie", b"a=b"), (b"ETag", b'"1"')], "r2") == [
        (b"etag", b'"1"'),
        (b"x-request-id", b"r2"),
    ]


def test_recorded_helper_reads_headers() -> None:
    seen = Recorded("GET", b"/", b"", [(b"a", b"1"), (b"a", b"2")], b"")
    assert seen.header("A") == ["1", "2"]


def test_header_values_pass_as_utf8_or_are_refused(proxy: RunningProxy, recorder: Upstream) -> None:
    stand_in, _ = recorder
    host_port = proxy.url.removeprefix("http://")
    for value, status in ((b"caf\xc3\xa9", b"200"), (b"caf\xe9", b"400")):
        with socket.create_connection(_address(host_port)) as raw:
            raw.sendall(
                b"GET /api/v1/buyers HTTP/1.1\r\nHost: "
                + host_port.encode()
                + b"\r\nX-Note: "
                + value
                + b"\r\nConnection: close\r\n\r\n"
            )
            answer = b""
            while chunk := raw.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 " + status)
    assert len(stand_in.requests) == 1
    assert (b"x-note", b"caf\xc3\xa9") in stand_in.requests[0].headers
