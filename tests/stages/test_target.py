"""Path safety: what may be forwarded, decided on the raw request target."""

from __future__ import annotations

import socket

import pytest

from proxy.errors import ProxyError
from proxy.stages.target import KNOWN_NAMES, parse_target, route_template
from tests.conftest import Recorder, RunningProxy

ATTACKS = [
    b"/api/v1/buyers/../admin",
    b"/api/v1/..",
    b"/api/v1/./buyers",
    b"/api/v1/buyers/%2e%2e/admin",
    b"/api/v1/buyers/%2E%2E/admin",
    b"/api/v1/buyers/.%2e/admin",
    b"/api/v1/buyers/%252e%252e/admin",
    b"/api/v1/buyers/%2e",
    b"/api/v1/buyers/a..b",
    b"/api/v1/buyers\\..\\admin",
    b"/api/v1/buyers/%5c..%5cadmin",
    b"/api/v1/buyers/%5C",
    b"/api/v1/buyers//admin",
    b"/api/v1//buyers",
    b"/api/v1/buyers/%2fadmin",
    b"/api/v1/buyers/%2Fadmin",
    b"/api/v1/buyers/%252fadmin",
    b"/api/v1/buyers/%00",
    b"/api/v1/buyers/%0d%0aX-Injected:1",
    b"/api/v1/buyers/%250a",
    b"/api/v1/buyers/%7f",
    b"/api/v1/buyers/\x01",
    b"/api/v1/buyers/caf\xc3\xa9",
]


@pytest.mark.parametrize("raw", ATTACKS)
def test_unsafe_paths_are_bad_requests(raw: bytes) -> None:
    with pytest.raises(ProxyError) as caught:
        parse_target(raw)
    assert (caught.value.status, caught.value.error_code) == (400, "BAD_REQUEST")


@pytest.mark.parametrize(
    "raw", [b"/", b"/api/v1", b"/api/v1/", b"/api/v2/buyers", b"/api/v10/x", b"/API/V1/buyers"]
)
def test_outside_the_api_is_not_found(raw: bytes) -> None:
    with pytest.raises(ProxyError) as caught:
        parse_target(raw)
    assert (caught.value.status, caught.value.error_code) == (404, "NOT_FOUND")


NO_RESOURCE = "The path names no resource: add one after /api/v1/, for example /api/v1/buyers."
OUTSIDE = "Only paths below /api/v1/ are served by this proxy, for example /api/v1/buyers."


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"/api/v1/", NO_RESOURCE),
        (b"/api/v1", NO_RESOURCE),
        (b"/", OUTSIDE),
        (b"/api/v2/buyers", OUTSIDE),
        (b"/api/v1buyers", OUTSIDE),
    ],
)
def test_a_404_says_what_is_wrong_with_the_path(raw: bytes, message: str) -> None:
    with pytest.raises(ProxyError) as caught:
        parse_target(raw)
    assert caught.value.message == message


@pytest.mark.parametrize(
    ("raw", "forwarded", "segments"),
    [
        (b"/api/v1/buyers", "/buyers", ("buyers",)),
        (b"/api/v1/buyers/", "/buyers/", ("buyers",)),
        (b"/api/v1/buyers/a%20b", "/buyers/a%20b", ("buyers", "a b")),
        (b"/api/v1/invoices/1/%73ubmit", "/invoices/1/%73ubmit", ("invoices", "1", "submit")),
        (b"/api/v1/a.b/c.d.e", "/a.b/c.d.e", ("a.b", "c.d.e")),
    ],
)
def test_safe_paths_keep_their_encoding(
    raw: bytes, forwarded: str, segments: tuple[str, ...]
) -> None:
    target = parse_target(raw)
    assert target.raw == forwarded
    assert target.segments == segments


def _raw_request(proxy: RunningProxy, request_line: bytes, host: bytes | None = None) -> bytes:
    host_port = proxy.url.removeprefix("http://").split(":")
    host = host or proxy.url.removeprefix("http://").encode()
    with socket.create_connection((host_port[0], int(host_port[1]))) as conn:
        conn.sendall(request_line + b"\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
    return response


@pytest.mark.parametrize(
    "target",
    [
        b"/api/v1/buyers/../../admin",
        b"/api/v1/buyers/%2e%2e/%2e%2e/admin",
        b"/api/v1/buyers/%252e%252e/admin",
        b"/api/v1/buyers/%2fadmin",
        b"/api/v1//buyers",
        b"/api/v1/buyers\\admin",
    ],
)
def test_attacks_over_the_wire_never_reach_upstream(
    proxy: RunningProxy, recorder: tuple[Recorder, str], target: bytes
) -> None:
    response = _raw_request(proxy, b"GET " + target + b" HTTP/1.1")
    assert response.startswith(b"HTTP/1.1 400 ")
    assert b'"error_code":"BAD_REQUEST"' in response
    assert recorder[0].requests == []
    assert proxy.last_audit()["decision"] == "invalid"


def test_absolute_form_and_host_header_do_not_choose_the_upstream(
    proxy: RunningProxy, recorder: tuple[Recorder, str]
) -> None:
    stand_in, upstream = recorder
    own_host = proxy.url.removeprefix("http://").encode()
    response = _raw_request(proxy, b"GET http://evil.example/api/v1/buyers HTTP/1.1", host=own_host)
    assert response.startswith(b"HTTP/1.1 200 ")
    seen = stand_in.requests[-1]
    assert seen.raw_path == b"/api/v1/buyers"
    assert seen.header("host") == [upstream.split("/")[2]]


def test_outside_api_over_the_wire_is_404_envelope(
    proxy: RunningProxy, recorder: tuple[Recorder, str]
) -> None:
    response = _raw_request(proxy, b"GET /api%2fv1/buyers HTTP/1.1")
    assert response.startswith(b"HTTP/1.1 404 ")
    assert b'"error_code":"NOT_FOUND"' in response
    assert recorder[0].requests == []


@pytest.mark.parametrize(
    ("segments", "template"),
    [
        (("buyers",), "/buyers"),
        (("buyers", "5f0c2a9e-1b7d-4c1e-9a55-2f7e3c1d9b10"), "/buyers/{id}"),
        (("invoices", "inv_7", "submit"), "/invoices/{id}/submit"),
        (("invoices", "inv_7", "pdf-export"), "/invoices/{id}/{name}"),
        (("zz-unknown-resource",), "/{name}"),
        (("invoices", "a", "cancel", "b", "c", "d"), "/invoices/{id}/cancel/{id}/*"),
    ],
)
def test_route_template_keeps_names_and_hides_ids(segments: tuple[str, ...], template: str) -> None:
    assert route_template(segments) == template


def test_route_templates_are_a_bounded_set() -> None:
    # Whatever a client sends, at most (names + 1)^2 templates of each depth exist.
    made = {route_template((f"r{i}", f"id{i}", f"a{i}", f"x{i}", f"y{i}")) for i in range(1000)}
    assert made == {"/{name}/{id}/{name}/{id}/*"}
    assert route_template(("reports",), KNOWN_NAMES | {"reports"}) == "/reports"
