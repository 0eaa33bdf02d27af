"""The client side of the wire: upgrade offers, heads bounded as they arrive, parser refusals.

Raw sockets throughout, since a client library would frame the bytes its own way; plus the
real clients whose bytes these are (Java's HttpClient, curl --http2).
"""

from __future__ import annotations

import json
import resource
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from proxy.server.listener import idle_bound
from tests.conftest import Recorded, Recorder, Reply, RunningProxy
from tests.wire import assert_proxy_error, exchange, parse_response

Upstream = tuple[Recorder, str]
STACKS = Path(__file__).parents[1] / "stacks"
BODY = b'{"name":"Syarikat Contoh","tin":"C1234567890"}'
H2C = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAEAAEAAAAIAAAAAAAMAAAAAAAQBAAAAAAUAAEAAAAYABgAA\r\n"
)


def _port(proxy: RunningProxy) -> int:
    return int(proxy.url.rsplit(":", 1)[1])


def _h2c_post(body: bytes, *, extra: bytes = b"", framing: bytes | None = None) -> bytes:
    framing = b"Content-Length: %d\r\n" % len(body) if framing is None else framing
    return (
        b"POST /api/v1/buyers HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + H2C
        + b"Content-Type: application/json\r\n"
        + extra
        + framing
        + b"\r\n"
    )


def _send_in_writes(port: int, writes: list[bytes], *, read_until_close: bool = True) -> bytes:
    """Each item its own write, a moment apart, then read the answer(s) until the close."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        for data in writes:
            conn.sendall(data)
            time.sleep(0.05)
        while read_until_close and (chunk := conn.recv(65536)):
            received += chunk
    return received


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "body-later"])
def test_an_h2c_offer_is_ignored_and_the_body_forwarded(
    proxy: RunningProxy, recorder: Upstream, split: bool
) -> None:
    stand_in, _ = recorder
    head = _h2c_post(BODY, extra=b"Connection: close\r\n")
    raw = _send_in_writes(_port(proxy), [head, BODY] if split else [head + BODY])
    assert parse_response(raw).status == 200
    (request,) = stand_in.requests
    assert request.body == BODY
    assert request.header("content-length") == [str(len(BODY))]
    assert not request.header("upgrade") and not request.header("http2-settings")


def test_an_h2c_offer_with_a_chunked_body_and_a_pipelined_call(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    stand_in, _ = recorder
    chunked = b"%x\r\n%b\r\n0\r\n\r\n" % (len(BODY), BODY)
    second = b"GET /api/v1/buyers HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    offer = _h2c_post(BODY, framing=b"Transfer-Encoding: chunked\r\n")
    raw = _send_in_writes(_port(proxy), [offer + chunked + second])
    assert raw.count(b"HTTP/1.1 200 ") == 2, raw
    assert [(r.method, r.body) for r in stand_in.requests] == [("POST", BODY), ("GET", b"")]


def test_a_body_shorter_than_its_content_length_is_never_forwarded(
    recorder: Upstream, start_proxy: Callable[..., RunningProxy]
) -> None:
    """Independently of the parser: uvicorn's own httptools protocol drops the body of an
    upgrade offer, and the forward stage then refuses what arrived instead of sending it."""
    stand_in, url = recorder
    # Its connections close when idle, so each exchange below reads to the close.
    proxy = start_proxy(url, server={"http": "httptools"}, keepalive_timeout=0.5)
    offers = [_h2c_post(BODY), _h2c_post(BODY, extra=b"Idempotency-Key: order-1\r\n")]
    for offer in offers:
        _send_in_writes(_port(proxy), [offer + BODY])
    assert stand_in.requests == []
    lines = proxy.audit_lines(at_least=2)
    assert [(line["status"], line["error_code"]) for line in lines] == [(400, "BAD_REQUEST")] * 2
    # The key was not kept for the broken call: the same key now goes out, once.
    response = httpx.post(
        f"{proxy.url}/api/v1/buyers", content=BODY, headers={"Idempotency-Key": "order-1"}
    )
    assert response.status_code == 200
    assert [r.body for r in stand_in.requests] == [BODY]


def test_java_http_client_creates_through_the_proxy(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    """InvoisX's Java example: the JDK's HttpClient offers h2c on every plain-http request."""
    java = shutil.which("java")
    assert java, "needs a JDK (default-jdk-headless, .ci/run)"
    stand_in, _ = recorder
    stand_in.reply = lambda request: Reply(201, chunks=[b'{"success":true,"data":{"id":"b1"}}'])
    program = [java, str(STACKS / "PostJson.java"), f"{proxy.url}/api/v1/buyers", BODY.decode()]
    for key in ([], ["java-order-1"], ["java-order-1"]):
        run = subprocess.run([*program, *key], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        status, body = run.stdout.splitlines()
        assert (status, json.loads(body)["data"]["id"]) == ("201", "b1")
    # The third call repeated the second's key: answered from the proxy, not sent again.
    assert [r.body for r in stand_in.requests] == [BODY, BODY]
    assert all(r.header("content-length") == [str(len(BODY))] for r in stand_in.requests)


def test_curl_http2_prior_offer_posts_its_body(proxy: RunningProxy, recorder: Upstream) -> None:
    curl = shutil.which("curl")
    assert curl, "needs curl (.ci/run)"
    stand_in, _ = recorder
    command = [
        curl,
        "-sS",
        "--http2",
        "-H",
        "Content-Type: application/json",
        "-w",
        "\n%{http_code}",
    ]
    run = subprocess.run(
        [*command, "--data-binary", BODY.decode(), f"{proxy.url}/api/v1/buyers"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "200"
    assert [r.body for r in stand_in.requests] == [BODY]


def test_what_the_parser_refuses_is_an_envelope_with_an_audit_line(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    raw = exchange(
        _port(proxy), b"POST /api/v1/buyers HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"
    )
    response = parse_response(raw)
    body = assert_proxy_error(response)
    assert body is not None and body["error_code"] == "BAD_REQUEST"
    line = proxy.last_audit()
    assert (line["status"], line["decision"], line["error_code"]) == (400, "invalid", "BAD_REQUEST")
    assert line["peer"] == "127.0.0.1"
    metrics = httpx.get(f"{proxy.url}/metrics").text
    assert 'status="400"' in metrics and 'decision="invalid"' in metrics
    assert recorder[0].requests == []


def _stream_until_answered(port: int, head: bytes, filler: bytes, total: int) -> tuple[bytes, int]:
    """Send `head`, then `filler` until `total` bytes or the server answers; what came back
    and how many bytes it took."""
    sent = 0
    with socket.socket() as conn:
        # A small send buffer, so `sent` counts what the proxy read, not what kernels hold.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        conn.settimeout(10)
        conn.connect(("127.0.0.1", port))
        conn.sendall(head)
        conn.setblocking(False)
        received = b""
        try:
            while sent < total:
                try:
                    received += conn.recv(65536)
                    if received:
                        break
                except BlockingIOError:
                    pass
                try:
                    sent += conn.send(filler)
                except BlockingIOError:
                    time.sleep(0.001)
        except (BrokenPipeError, ConnectionResetError):
            pass
        conn.settimeout(10)  # blocking again, but never for ever
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received, sent


def test_a_header_of_tens_of_megabytes_is_cut_off_as_it_arrives(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    head = b"GET /api/v1/buyers HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: "
    raw, sent = _stream_until_answered(_port(proxy), head, b"a" * 65536, 48 * 1024 * 1024)
    body = assert_proxy_error(parse_response(raw))
    assert body is not None and body["error_code"] == "HEADERS_TOO_LARGE"
    # The default limit is 32 KiB; at most a few reads more arrive before the answer.
    assert sent < 4 * 1024 * 1024, sent
    assert recorder[0].requests == []


def test_a_target_of_tens_of_megabytes_is_cut_off_as_it_arrives(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    raw, sent = _stream_until_answered(
        _port(proxy), b"GET /api/v1/buyers?q=", b"a" * 65536, 48 * 1024 * 1024
    )
    body = assert_proxy_error(parse_response(raw))
    assert body is not None and body["error_code"] == "URI_TOO_LONG"
    assert sent < 4 * 1024 * 1024, sent
    assert proxy.last_audit()["status"] == 414


def test_heads_within_the_limits_pass(proxy: RunningProxy, recorder: Upstream) -> None:
    target = "/api/v1/buyers?search=" + "a" * 8000
    response = httpx.get(proxy.url + target, headers={"X-Filler": "b" * 30_000})
    assert response.status_code == 200
    request: Recorded = recorder[0].requests[-1]
    assert request.header("x-filler") == ["b" * 30_000]


def test_endless_request_trailers_are_cut_off(proxy: RunningProxy, recorder: Upstream) -> None:
    head = (
        b"POST /api/v1/buyers HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\nX-Trailer: "
    )
    _, sent = _stream_until_answered(_port(proxy), head, b"a" * 65536, 48 * 1024 * 1024)
    assert sent < 4 * 1024 * 1024, sent
    # The call was under way, so the connection is closed rather than answered; both the
    # refusal and the call (its client gone) are audited.
    lines = proxy.audit_lines(at_least=2)
    outcomes = {(line["status"], line["error_code"]) for line in lines}
    assert outcomes == {(431, "HEADERS_TOO_LARGE"), (400, "CLIENT_BODY_INCOMPLETE")}
    assert recorder[0].incomplete + len(recorder[0].requests) <= 1
    assert httpx.get(f"{proxy.url}/healthz").status_code == 200


def test_a_head_that_does_not_arrive_in_time_gets_408(
    recorder: Upstream, start_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = start_proxy(recorder[1], client_timeout=0.5)
    with socket.create_connection(("127.0.0.1", _port(proxy)), timeout=10) as slow:
        slow.sendall(b"GET /api/v1/buyers HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        started = time.monotonic()
        answer = parse_response(slow.recv(65536))
        waited = time.monotonic() - started
    body = assert_proxy_error(answer)
    assert body is not None and body["error_code"] == "CLIENT_TIMEOUT"
    assert 0.3 < waited < 3
    with socket.create_connection(("127.0.0.1", _port(proxy)), timeout=10) as silent:
        assert silent.recv(65536) == b""  # closed, nothing said: there was no request
    assert recorder[0].requests == []


def test_a_refused_pipelined_request_is_never_answered_as_the_one_in_flight(
    recorder: Upstream, start_proxy: Callable[..., RunningProxy]
) -> None:
    stand_in, url = recorder
    stand_in.reply = lambda request: Reply(201, delay=0.5)
    proxy = start_proxy(url)
    first = b"POST /api/v1/buyers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}"
    second = b"GET /api/v1/buyers?q=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    raw = _send_in_writes(_port(proxy), [first, second])
    # The 414 is the second request's; sent now, the client would read it as the POST's.
    assert b"414" not in raw.split(b"\r\n", 1)[0]
    assert not raw or raw.startswith(b"HTTP/1.1 201 ")


def test_many_pipelined_upgrade_offers_are_all_answered(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    offer = b"GET /api/v1/buyers HTTP/1.1\r\nHost: 127.0.0.1\r\n" + H2C + b"\r\n"
    last = b"GET /api/v1/buyers HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    raw = _send_in_writes(_port(proxy), [offer * 600 + last])
    assert raw.count(b"HTTP/1.1 200 ") == 601
    assert len(recorder[0].requests) == 601


# --- keep-alive ---------------------------------------------------------------------------

GET_BUYERS = b"GET /api/v1/buyers HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _call_on(conn: socket.socket, request: bytes = GET_BUYERS) -> int:
    """One call on an open connection, its answer read whole; the answer's status."""
    conn.sendall(request)
    received = b""
    while True:
        chunk = conn.recv(65536)
        assert chunk, "the connection closed before answering"
        received += chunk
        if b"\r\n\r\n" in received and (answer := parse_response(received)).complete:
            return answer.status


def _closed_within(conn: socket.socket, seconds: float) -> bool:
    conn.settimeout(seconds)
    try:
        return conn.recv(1) == b""
    except TimeoutError:
        return False


def _local_port(response: httpx.Response) -> int:
    stream = response.extensions["network_stream"]
    return int(stream.get_extra_info("client_addr")[1])


def test_an_idle_connection_outlives_a_client_that_waits_retry_after(
    proxy: RunningProxy,
) -> None:
    # A client that keeps idle connections 5 s or more (httpx: 5, .NET: 60, curl: 118) and
    # comes back after `Retry-After: 5` found uvicorn's default closing it at that moment.
    with httpx.Client(limits=httpx.Limits(keepalive_expiry=60)) as client:
        first = client.get(f"{proxy.url}/api/v1/buyers")
        first_port = _local_port(first)
        time.sleep(5.5)
        second = client.get(f"{proxy.url}/api/v1/buyers")
        assert _local_port(second) == first_port  # the same connection, not a new one
    assert (first.status_code, second.status_code) == (200, 200)


def test_an_idle_connection_closes_after_the_keepalive_timeout(
    recorder: Upstream, start_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = start_proxy(recorder[1], keepalive_timeout=2)
    with socket.create_connection(("127.0.0.1", _port(proxy)), timeout=10) as conn:
        assert _call_on(conn) == 200
        assert not _closed_within(conn, 1)
        assert _closed_within(conn, 4)


@pytest.mark.parametrize(
    ("request_bytes", "then"),
    [
        (GET_BUYERS, b"\r\n"),  # blank lines start no request
        # Answered 404 before its body came: the rest of the body starts no request either.
        (b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n", b"x" * 10),
    ],
    ids=["blank-line", "body-after-an-early-answer"],
)
def test_bytes_that_start_no_call_leave_a_connection_idle_and_counted(
    recorder: Upstream, start_proxy: Callable[..., RunningProxy], request_bytes: bytes, then: bytes
) -> None:
    proxy = start_proxy(recorder[1], keepalive_timeout=2, max_idle_connections=1)
    with socket.create_connection(("127.0.0.1", _port(proxy)), timeout=10) as conn:
        assert _call_on(conn, request_bytes) in (200, 404)
        time.sleep(0.2)
        conn.sendall(then)
        # Still on the keep-alive clock, which the read restarted...
        assert not _closed_within(conn, 1)
        assert _closed_within(conn, 4)
    with socket.create_connection(("127.0.0.1", _port(proxy)), timeout=10) as first:
        assert _call_on(first, request_bytes) in (200, 404)
        first.sendall(then)
        time.sleep(0.2)
        # ...and still counted: the next idle connection pushes it out.
        with socket.create_connection(("127.0.0.1", _port(proxy)), timeout=10) as second:
            assert _call_on(second) == 200
            assert _closed_within(first, 1)


def test_past_the_idle_bound_the_connection_idle_longest_closes(
    recorder: Upstream, start_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = start_proxy(recorder[1], max_idle_connections=2)
    conns = [socket.create_connection(("127.0.0.1", _port(proxy)), timeout=10) for _ in range(4)]
    try:
        for conn in conns[:3]:
            assert _call_on(conn) == 200
        assert _closed_within(conns[0], 2)
        # A connection that never made a call is not idle between calls: it is not counted.
        assert [_call_on(conn) for conn in conns[1:]] == [200, 200, 200]
        assert _closed_within(conns[1], 2)  # now the one idle longest of three
        assert [_call_on(conn) for conn in conns[2:]] == [200, 200]
    finally:
        for conn in conns:
            conn.close()


def test_the_idle_bound_stays_under_half_the_file_descriptor_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft != resource.RLIM_INFINITY and soft >= 4
    assert (idle_bound(10 * soft), idle_bound(2)) == (soft // 2, 2)
